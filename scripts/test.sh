#!/usr/bin/env bash
# Runs the whole test suite: unit tests, then VM and containerd tests against the installed guest assets.
source "$(dirname "$0")/lib.sh"

# Habits first: cheap, and a formatting slip or a lint fails CI just as a broken test does.
cd "$REPO"
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
step "cargo fmt --check" cargo fmt --all --check
bash "$REPO/scripts/setup.sh"
# After set-up: the agent's crates need the Debian -dev packages it installs.
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings

# VM tests find their parts here; each test skips with a reason when one is missing.
export KATA_TEST_KERNEL=$ASSET_DIR/vmlinux.container
export KATA_TEST_INITRD=$ASSET_DIR/kata-containers-initrd.img
export KATA_TEST_VIRTIOFSD=$BIN_DIR/virtiofsd
export KATA_TEST_VSOCK_DAEMON=$BIN_DIR/vhost-device-vsock
# The shim containerd starts in the end-to-end tests: the release build setup.sh just made and installed.
export KATA_TEST_SHIM_DIR=$CARGO_TARGET_DIR/release
# The Kubernetes test's kubelet and control plane, built from Debian's source package (cached by its inputs).
step "Kubernetes v1.20.2 (cached)" bash "$REPO/scripts/build-kubernetes.sh"
KATA_TEST_K8S_BIN=$(bash "$REPO/scripts/build-kubernetes.sh" 2>/dev/null | tail -n 1)
export KATA_TEST_K8S_BIN

cd "$REPO"
# Two test threads: VM tests under TCG must not run more than two at a time on 2 cores.
step "cargo test" cargo test --workspace --no-fail-fast -- --test-threads=2
