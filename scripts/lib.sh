# Shared helpers for the set-up and test scripts. Sourced, not run.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KATA_RS_CACHE=${KATA_RS_CACHE:-/var/cache/kata-rs}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
export PATH=$HOME/.cargo/bin:$PATH

# Where `scripts/setup.sh` installs things; the shipped configuration points here.
ASSET_DIR=/usr/share/kata-containers
DEFAULTS_DIR=/usr/share/defaults/kata-containers
BIN_DIR=/usr/local/bin

# Pinned helper daemons, installed with `cargo install --locked`.
VIRTIOFSD_VERSION=1.14.0
VSOCK_VERSION=0.3.0

# step NAME CMD...: run CMD with a visible header and its duration.
step() {
    local name=$1 start end
    shift
    start=$(date +%s)
    echo "==> [$(date +%H:%M:%S)] $name"
    "$@"
    end=$(date +%s)
    echo "<== $name done in $((end - start))s"
}
