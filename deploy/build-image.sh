#!/usr/bin/env bash
# deploy/build-image.sh OUT.tar [TAG]: builds the kata-rs node installer image as an OCI image layout tar, for
# `ctr -n k8s.io image import OUT.tar` on each node (no registry needed). The image is named
# docker.io/library/kata-rs-deploy:TAG (what `image: kata-rs-deploy:TAG` in deploy/kata-deploy.yaml means);
# TAG defaults to kata-runtime's version.
#
# It holds the release layout under /opt/kata-rs (the `--payload` of `kata-runtime install`), and what the
# installer runs in the container: kata-runtime itself (its entrypoint), busybox-static as /bin/sh and sleep,
# nsenter (to restart the host's containerd) and ctr (to check the CRI plugin), each with the libraries ldd lists.
#
# Where the files come from (defaults: where scripts/setup.sh installs them):
#   KATA_RS_BIN       kata-runtime, containerd-shim-kata-v2          (/usr/local/bin)
#   KATA_RS_HELPERS   virtiofsd, vhost-device-vsock                   (/usr/local/bin)
#   KATA_RS_ASSETS    vmlinux.container, kata-containers-initrd.img   (/usr/share/kata-containers)
#   KATA_RS_DEFAULTS  configuration-qemu.toml                         (/usr/share/defaults/kata-containers)
# The output is reproducible: fixed mtimes and owners, sorted entries, gzip without a timestamp.
set -euo pipefail

die() { echo "build-image.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: deploy/build-image.sh OUT.tar [TAG]"
out=$1
tag=${2:-}
bin=${KATA_RS_BIN:-/usr/local/bin}
helpers=${KATA_RS_HELPERS:-/usr/local/bin}
assets=${KATA_RS_ASSETS:-/usr/share/kata-containers}
defaults=${KATA_RS_DEFAULTS:-/usr/share/defaults/kata-containers}

for tool in tar gzip sha256sum jq ldd; do
    command -v "$tool" >/dev/null || die "needs $tool"
done
busybox=$(command -v busybox) || die "needs busybox (Debian package busybox-static)"
ldd "$busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked; install busybox-static"
nsenter=$(command -v nsenter) || die "needs nsenter (Debian package util-linux)"
ctr=$(command -v ctr) || die "needs ctr (Debian package containerd)"

"$bin/kata-runtime" install --help >/dev/null 2>&1 ||
    die "$bin/kata-runtime has no install command: build this tree and point KATA_RS_BIN at it"
[ -n "$tag" ] || tag=$("$bin/kata-runtime" --version | awk '{print $2}')
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "TAG $tag is not a valid image tag"
name=docker.io/library/kata-rs-deploy:$tag

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

# The payload, in the layout `kata-runtime install --payload` expects.
payload=$rootfs/opt/kata-rs
for f in "$bin/kata-runtime" "$bin/containerd-shim-kata-v2" "$helpers/virtiofsd" "$helpers/vhost-device-vsock"; do
    [ -f "$f" ] || die "missing $f"
    install -D -m 0755 "$f" "$payload/bin/$(basename "$f")"
done
for f in vmlinux.container kata-containers-initrd.img; do
    [ -f "$assets/$f" ] || die "missing $assets/$f"
    install -D -m 0644 "$assets/$f" "$payload/share/kata-containers/$f"
done
[ -f "$defaults/configuration-qemu.toml" ] || die "missing $defaults/configuration-qemu.toml"
install -D -m 0644 "$defaults/configuration-qemu.toml" "$payload/share/defaults/kata-containers/configuration-qemu.toml"

# copy_with_libs BINARY DEST: the binary at DEST in the image, with every library ldd lists at its own path.
copy_with_libs() {
    install -D -m 0755 "$1" "$rootfs$2"
    local lib
    for lib in $(ldd "$1" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
        [ -e "$rootfs$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
    done
}
copy_with_libs "$bin/kata-runtime" /opt/kata-rs/bin/kata-runtime
copy_with_libs "$nsenter" /usr/bin/nsenter
copy_with_libs "$ctr" /usr/bin/ctr
install -D -m 0755 "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
ln -s busybox "$rootfs/bin/sleep"
mkdir -p "$rootfs/host" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
chmod 1777 "$rootfs/tmp"

# reproducible_tar OUT (in the current directory) ENTRIES...
reproducible_tar() {
    local o=$1
    shift
    tar --sort=name --mtime=@946684800 --owner=0 --group=0 --numeric-owner --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$o" "$@"
}
sha() { sha256sum "$1" | awk '{print $1}'; }
size() { stat -c %s "$1"; }

layout=$work/layout
mkdir -p "$layout/blobs/sha256"
(cd "$rootfs" && reproducible_tar "$work/layer.tar" .)
diff_id=$(sha "$work/layer.tar")
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
layer=$(sha "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$layout/blobs/sha256/$layer"

# blob FILE: moves FILE into the layout under its digest and prints the digest.
blob() {
    local d
    d=$(sha "$1")
    mv "$1" "$layout/blobs/sha256/$d"
    echo "$d"
}

jq -cn --arg diff "sha256:$diff_id" '{
    architecture: "amd64", os: "linux", created: "2000-01-01T00:00:00Z",
    config: {
        Entrypoint: ["/opt/kata-rs/bin/kata-runtime"],
        Env: ["PATH=/opt/kata-rs/bin:/usr/bin:/bin"],
        WorkingDir: "/"
    },
    rootfs: { type: "layers", diff_ids: [$diff] },
    history: [{ created: "2000-01-01T00:00:00Z", created_by: "deploy/build-image.sh" }]
}' >"$work/config.json"
config_size=$(size "$work/config.json")
config=$(blob "$work/config.json")

jq -cn --arg config "sha256:$config" --argjson config_size "$config_size" \
    --arg layer "sha256:$layer" --argjson layer_size "$(size "$layout/blobs/sha256/$layer")" '{
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $config, size: $config_size },
    layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $layer, size: $layer_size }]
}' >"$work/manifest.json"
manifest_size=$(size "$work/manifest.json")
manifest=$(blob "$work/manifest.json")

jq -cn --arg manifest "sha256:$manifest" --argjson size "$manifest_size" --arg name "$name" --arg tag "$tag" '{
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $manifest, size: $size,
        platform: { architecture: "amd64", os: "linux" },
        annotations: { "io.containerd.image.name": $name, "org.opencontainers.image.ref.name": $tag }
    }]
}' >"$layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

out_abs=$(realpath -m "$out")
(cd "$layout" && reproducible_tar "$out_abs.tmp" oci-layout index.json blobs)
mv "$out_abs.tmp" "$out_abs"
echo "built $name (manifest sha256:$manifest) in $out"
echo "import on each node: ctr -n k8s.io image import $out"
