#!/usr/bin/env bash
# deploy/test-image.sh IMAGE.tar [TAG]: checks an image from deploy/build-image.sh end to end, as root, without
# touching this host's containerd: the OCI layout's digests and sizes, then a private containerd whose config
# and socket live in a scratch host root imports the image and runs the installer from it (`ctr run`, the
# scratch root bind-mounted at /host, as the DaemonSet mounts the node's /). The installer must put the
# payload in place and the kata runtime in that containerd's config, and its in-image ctr must see the CRI
# plugin up; after a restart containerd must load the runtime; uninstall from the image must leave the
# scratch root byte-identical to before.
set -euo pipefail

die() { echo "test-image.sh: FAIL: $*" >&2; exit 1; }
[ $# -ge 1 ] || die "usage: deploy/test-image.sh IMAGE.tar [TAG]"
[ "$(id -u)" = 0 ] || { echo "test-image.sh: skipped: needs root (a private containerd and ctr run)"; exit 0; }
image_tar=$(realpath "$1")
tag=${2:-}

work=$(mktemp -d /var/tmp/kata-rs-deploy-test.XXXXXX)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The layout: every digest and size the index and manifest name is the blob's.
layout=$work/layout
mkdir -p "$layout"
tar -xf "$image_tar" -C "$layout"
jq -e '.imageLayoutVersion == "1.0.0"' "$layout/oci-layout" >/dev/null || die "oci-layout"
check_blob() { # DIGEST SIZE
    local f=$layout/blobs/sha256/${1#sha256:}
    [ -f "$f" ] || die "missing blob $1"
    [ "sha256:$(sha256sum "$f" | cut -d' ' -f1)" = "$1" ] || die "blob $1 does not match its digest"
    [ "$(stat -c %s "$f")" = "$2" ] || die "blob $1 is not $2 bytes"
}
name=$(jq -r '.manifests[0].annotations["io.containerd.image.name"]' "$layout/index.json")
[[ $name == docker.io/library/kata-rs-deploy:* ]] || die "image name $name"
[ -z "$tag" ] || [ "$name" = "docker.io/library/kata-rs-deploy:$tag" ] || die "image name $name, not tag $tag"
manifest=$layout/blobs/sha256/$(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2)
check_blob "$(jq -r '.manifests[0].digest' "$layout/index.json")" "$(jq -r '.manifests[0].size' "$layout/index.json")"
check_blob "$(jq -r .config.digest "$manifest")" "$(jq -r .config.size "$manifest")"
check_blob "$(jq -r '.layers[0].digest' "$manifest")" "$(jq -r '.layers[0].size' "$manifest")"
config=$layout/blobs/sha256/$(jq -r .config.digest "$manifest" | cut -d: -f2)
layer=$layout/blobs/sha256/$(jq -r '.layers[0].digest' "$manifest" | cut -d: -f2)
[ "sha256:$(gzip -dc "$layer" | sha256sum | cut -d' ' -f1)" = "$(jq -r '.rootfs.diff_ids[0]' "$config")" ] ||
    die "the layer's diff_id is not the digest of its uncompressed tar"
echo "ok: OCI layout of $name"

# 2. A private containerd serving a scratch host root.
host=$work/host
mkdir -p "$host/etc/containerd" "$host/run/containerd" "$work/cni"
cat >"$host/etc/containerd/config.toml" <<EOF
version = 2
root = "$work/root"
state = "$work/state"

[grpc]
  address = "$host/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$work/cni"
  [plugins."io.containerd.internal.v1.opt"]
    path = "$work/opt"
EOF
sock=$host/run/containerd/containerd.sock
start_containerd() {
    containerd --config "$host/etc/containerd/config.toml" >>"$work/containerd.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        ctr --address "$sock" version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    tail -20 "$work/containerd.log" >&2
    die "containerd did not start"
}
stop_containerd() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
cri_status() { ctr --address "$sock" plugins ls | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" { print $NF }'; }
snapshot() { (cd "$host" && find . -path ./run -prune -o -printf '%p %y %m %l\n' | sort && find . -path ./run -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum); }

start_containerd
ctr --address "$sock" -n k8s.io image import "$image_tar" >/dev/null
before=$(snapshot)

# The restart command only proves nsenter runs in the image (its libraries are there); this script restarts
# its containerd itself. The CRI check is the installer's own, through the image's ctr and the socket under /host.
run_in_image() { # ID ARGS...
    local id=$1
    shift
    ctr --address "$sock" -n k8s.io run --rm --privileged \
        --mount "type=bind,src=$host,dst=/host,options=rbind:rw" "$name" "$id" \
        /opt/kata-rs/bin/kata-runtime "$@" --host-root /host --restart-command "/usr/bin/nsenter --version"
}
run_in_image kata-install install --payload /opt/kata-rs | tee "$work/install.out"
grep -q "CRI plugin is up" "$work/install.out" || die "the installer did not check CRI"
for f in usr/local/bin/kata-runtime usr/local/bin/containerd-shim-kata-v2 usr/local/bin/virtiofsd \
    usr/local/bin/vhost-device-vsock usr/share/kata-containers/vmlinux.container \
    usr/share/kata-containers/kata-containers-initrd.img usr/share/defaults/kata-containers/configuration-qemu.toml; do
    [ -f "$host/$f" ] || die "$f was not installed"
done
grep -qF '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]' "$host/etc/containerd/config.toml" ||
    die "no kata runtime in the config"
echo "ok: installed from the image"

stop_containerd
start_containerd
[ "$(cri_status)" = ok ] || die "CRI is not ok after the restart: $(tail -5 "$work/containerd.log")"
containerd --config "$host/etc/containerd/config.toml" config dump 2>/dev/null |
    grep -qF '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]' ||
    die "containerd does not load the kata runtime"
echo "ok: containerd restarted with the kata runtime, CRI ok"

run_in_image kata-uninstall uninstall
[ "$(snapshot)" = "$before" ] || { diff <(echo "$before") <(snapshot) >&2; die "uninstall left the host root changed"; }
echo "ok: uninstalled from the image; the host root is as before"
