#!/usr/bin/env bash
# Build (or fetch from the cache) the kata-rs guest kernel: a PVH-bootable
# `vmlinux` from Debian's linux-source-6.1, tinyconfig + guest/kernel/config-fragment.
#
# usage: guest/build-kernel.sh [OUTDIR]
#
# Cache: ${KATA_RS_CACHE:-/var/cache/kata-rs}/kernel-<key>/{vmlinux,config,release}
# key = sha256(config fragment + this script + installed linux-source-6.1 version).
# A cache hit prints the vmlinux path and exits immediately. On a miss the
# kernel is built in a temporary directory under the cache and renamed into
# place atomically. The vmlinux path is always the last line on stdout.
# If OUTDIR is given, vmlinux is also copied there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/kernel/config-fragment"
src_pkg="linux-source-6.1"
tarball="/usr/src/${src_pkg}.tar.xz"
cache="${KATA_RS_CACHE:-/var/cache/kata-rs}"
outdir="${1:-}"

start=$SECONDS
log() { printf '[kernel] %4ds %s\n' "$((SECONDS - start))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "$fragment" ]] || die "config fragment not found: $fragment"
pkg_version="$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null)" ||
    die "package $src_pkg is not installed (apt-get install $src_pkg)"
[[ -f "$tarball" ]] || die "kernel source tarball not found: $tarball (package $src_pkg $pkg_version)"

key="$({ cat "$fragment"; cat "$script"; printf '%s=%s\n' "$src_pkg" "$pkg_version"; } |
    sha256sum | cut -c1-16)"
dest="$cache/kernel-$key"

deliver() {
    if [[ -n "$outdir" ]]; then
        mkdir -p "$outdir"
        cp -f "$dest/vmlinux" "$outdir/vmlinux.tmp.$$"
        mv -f "$outdir/vmlinux.tmp.$$" "$outdir/vmlinux"
    fi
    echo "$dest/vmlinux"
}

# Fast path: cache hit.
if [[ -f "$dest/vmlinux" ]]; then
    deliver
    exit 0
fi

mkdir -p "$cache"
# One builder per key; a second caller waits, then takes the cache hit.
exec 9>"$cache/kernel-$key.lock"
if ! flock -n 9; then
    log "another build of kernel-$key is running; waiting for it"
    flock 9
fi
if [[ -f "$dest/vmlinux" ]]; then
    deliver
    exit 0
fi

work="$(mktemp -d "$cache/kernel-$key.build.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

log "cache miss: building kernel-$key ($src_pkg $pkg_version) in $work"
log "extracting $tarball"
tar -xJf "$tarball" -C "$work"
ksrc="$work/$src_pkg"
[[ -d "$ksrc" ]] || die "tarball did not contain $src_pkg/"

# Reproducible build metadata (uname -v), so equal inputs give equal kernels.
export KBUILD_BUILD_USER=kata-rs KBUILD_BUILD_HOST=kata-rs
export KBUILD_BUILD_TIMESTAMP="@0"
export KBUILD_BUILD_VERSION=1
buildlog="$work/build.log"
run_make() {
    if ! make -C "$ksrc" "$@" >>"$buildlog" 2>&1; then
        tail -n 60 "$buildlog" >&2
        die "make $* failed (log above)"
    fi
}

log "configuring (tinyconfig + $(basename "$fragment"))"
run_make tinyconfig
(cd "$ksrc" && ./scripts/kconfig/merge_config.sh -m .config "$fragment") >>"$buildlog" 2>&1 ||
    { tail -n 40 "$buildlog" >&2; die "merge_config.sh failed"; }
run_make olddefconfig

# Verify: every CONFIG_X=y of the fragment must be =y, every "is not set" must
# not be =y. A mismatch means a dependency is missing from the fragment.
missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=y)
            grep -qxF "$line" "$ksrc/.config" ||
                missing+=("${line%%=*} (wanted y, got: $(grep -E "^${line%%=*}=|^# ${line%%=*} is not set" "$ksrc/.config" || echo absent))")
            ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"; opt="${opt%% *}"
            ! grep -qxE "${opt}=[ym]" "$ksrc/.config" ||
                missing+=("$opt (wanted not set, got: $(grep -E "^${opt}=" "$ksrc/.config"))")
            ;;
    esac
done <"$fragment"
if ((${#missing[@]})); then
    log "options from the fragment that did not stick (missing dependencies?):"
    printf '  %s\n' "${missing[@]}" >&2
    die "${#missing[@]} option(s) did not stick"
fi
log "configuration verified: all fragment options stuck"

jobs="$(nproc)"
log "building vmlinux with -j$jobs (takes ~6 min on 2 cores; log: $buildlog)"
run_make -j"$jobs" vmlinux
release="$(make -C "$ksrc" -s kernelrelease)"
log "built $release"

out="$work/out"
mkdir "$out"
cp "$ksrc/vmlinux" "$out/vmlinux"
cp "$ksrc/.config" "$out/config"
echo "$release" >"$out/release"
printf '%s %s\n' "$src_pkg" "$pkg_version" >"$out/source"
# Atomic publish: rename the finished directory into place, then let waiting
# builders (flock) take the cache hit while the build tree is removed.
mv -T "$out" "$dest"
exec 9>&-
log "cached $dest ($(du -h "$dest/vmlinux" | cut -f1)); removing build tree"
rm -rf "$work"
log "done"
deliver
