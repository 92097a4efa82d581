#!/usr/bin/env bash
# Build (or fetch from the cache) the Kubernetes binaries the Kubernetes end-to-end test runs: kubelet,
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl v1.20.2, from Debian bookworm's
# `kubernetes` source package (the full upstream tree with vendor/), with Debian's Go 1.19.
#
# usage: scripts/build-kubernetes.sh        prints the directory holding the binaries (last line of stdout)
#
# Cache: $KATA_RS_CACHE/kubernetes-<key>/bin, key = sha256(this script + source package version + Go version).
# The build runs in a temporary directory under the cache and is renamed into place when complete.
# Needs: a deb-src line for bookworm (added here when missing), dpkg-dev, golang-1.19-go.
set -euo pipefail

cache="${KATA_RS_CACHE:-/var/cache/kata-rs}"
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
go_root=/usr/lib/go-1.19
binaries=(kubelet kube-apiserver kube-controller-manager kube-scheduler kubectl)
version=v1.20.2

start=$SECONDS
log() { printf '[kubernetes] %4ds %s\n' "$((SECONDS - start))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

src_list=/etc/apt/sources.list.d/kata-rs-src.sources
ensure_deb_src() {
    if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version: 1.20'; then
        return
    fi
    log "adding a deb-src line for bookworm ($src_list)"
    cat >"$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -q >&2
}

ensure_deb_src
[[ -x "$go_root/bin/go" ]] || die "Go 1.19 is missing (apt-get install golang-1.19-go)"
command -v dpkg-source >/dev/null || die "dpkg-source is missing (apt-get install dpkg-dev)"
src_version="$(apt-cache showsrc kubernetes | sed -n 's/^Version: //p' | sort -V | tail -n 1)"
go_version="$("$go_root/bin/go" env GOVERSION)"
key="$({ cat "$script"; echo "kubernetes=$src_version"; echo "go=$go_version"; } | sha256sum | cut -c1-16)"
dest="$cache/kubernetes-$key"

if [[ -x "$dest/bin/kubelet" ]]; then
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$dest.lock"
flock 9
if [[ -x "$dest/bin/kubelet" ]]; then
    echo "$dest/bin"
    exit 0
fi

work="$dest.tmp"
rm -rf "$work"
mkdir -p "$work/dl" "$work/gopath/src/k8s.io"
log "fetching the source package kubernetes $src_version"
(cd "$work/dl" && apt-get source -q "kubernetes=$src_version" >&2)
tree="$(find "$work/dl" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
[[ -d "$tree/vendor" ]] || die "the source package has no vendor/ tree"
mv "$tree" "$work/gopath/src/k8s.io/kubernetes"
rm -rf "$work/dl"

k8s="$work/gopath/src/k8s.io/kubernetes"
export GOPATH="$work/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOCACHE="$work/gocache"
export PATH="$go_root/bin:$PATH"
cd "$k8s"

# The tarball lacks the generated OpenAPI definitions the API server serves: generate them, as the upstream
# Makefile does, from every package tagged +k8s:openapi-gen=.
log "building openapi-gen"
go build -o "$work/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
inputs="$(grep -rl --include='*.go' '+k8s:openapi-gen=' pkg staging/src/k8s.io |
    xargs -n1 dirname | sort -u |
    sed -e 's#^staging/src/#k8s.io/kubernetes/vendor/#' -e 's#^pkg/#k8s.io/kubernetes/pkg/#' |
    paste -sd, -)"
log "generating pkg/generated/openapi ($(tr ',' '\n' <<<"$inputs" | wc -l) packages)"
"$work/openapi-gen" --logtostderr -v 0 -i "$inputs" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h hack/boilerplate/boilerplate.generatego.txt -r "$work/openapi-violations.txt" \
    -o "$GOPATH/src" >&2

ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
done
mkdir -p "$work/bin"
for b in "${binaries[@]}"; do
    log "building $b"
    go build -ldflags "$ldflags" -o "$work/bin/$b" "k8s.io/kubernetes/cmd/$b"
done
"$work/bin/kubectl" version --client >&2

# Keep only the binaries: the source and Go cache are several GB.
mkdir -p "$work.done"
mv "$work/bin" "$work.done/bin"
rm -rf "$work" "$dest"
mv "$work.done" "$dest"
log "done: $dest/bin"
echo "$dest/bin"
