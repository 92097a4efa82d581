#!/usr/bin/env bash
# Installs everything kata-rs needs on a Debian bookworm host and builds and installs kata-rs itself.
# Idempotent: slow artefacts (guest kernel, helper daemons) are cached under $KATA_RS_CACHE by their inputs.
source "$(dirname "$0")/lib.sh"

DEBIAN_PACKAGES=(
    qemu-system-x86 containerd runc containernetworking-plugins busybox-static protobuf-compiler
    libcap-ng-dev libseccomp-dev pkg-config linux-source-6.1 bc bison flex libelf-dev libssl-dev
    cpio xz-utils make gcc iproute2 iptables kmod procps file fonts-dejavu-core
    golang-1.19-go etcd-server dpkg-dev openssl jq
)

install_debian_packages() {
    local missing=()
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "all ${#DEBIAN_PACKAGES[@]} Debian packages present"
        return
    fi
    echo "installing: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# install_helper CRATE VERSION: cargo install into a cache keyed by name and version, then copy to $BIN_DIR.
install_helper() {
    local crate=$1 version=$2 root="$KATA_RS_CACHE/helpers/$1-$2"
    if [ ! -x "$root/bin/$crate" ]; then
        echo "building $crate $version (several minutes on 2 cores)"
        cargo install --locked --root "$root.tmp" "$crate" --version "$version"
        rm -rf "$root" && mv "$root.tmp" "$root"
    fi
    install -m 0755 "$root/bin/$crate" "$BIN_DIR/$crate"
    echo "$crate $version -> $BIN_DIR/$crate"
}

build_kata() {
    cd "$REPO"
    cargo build --release --workspace --exclude kata-agent
    RUSTFLAGS="-C target-feature=+crt-static" \
        LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
        cargo build --profile guest -p kata-agent --target x86_64-unknown-linux-gnu
}

install_kata() {
    local rel="$CARGO_TARGET_DIR/release" kernel
    for bin in kata-runtime containerd-shim-kata-v2; do
        [ -x "$rel/$bin" ] && install -m 0755 "$rel/$bin" "$BIN_DIR/$bin"
    done
    mkdir -p "$ASSET_DIR" "$DEFAULTS_DIR"
    kernel=$(bash "$REPO/guest/build-kernel.sh" | tail -n 1)
    install -m 0644 "$kernel" "$ASSET_DIR/vmlinux.container"
    bash "$REPO/guest/build-initrd.sh" "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/guest/kata-agent" \
        "$ASSET_DIR/kata-containers-initrd.img"
    install -m 0644 "$REPO/crates/types/configuration-qemu.toml" "$DEFAULTS_DIR/configuration-qemu.toml"
    ln -sf configuration-qemu.toml "$DEFAULTS_DIR/configuration.toml"
    echo "installed binaries to $BIN_DIR, guest assets to $ASSET_DIR, configuration to $DEFAULTS_DIR"
}

step "Debian packages" install_debian_packages
step "virtiofsd $VIRTIOFSD_VERSION" install_helper virtiofsd "$VIRTIOFSD_VERSION"
step "vhost-device-vsock $VSOCK_VERSION" install_helper vhost-device-vsock "$VSOCK_VERSION"
step "guest kernel (cached by its config fragment)" bash "$REPO/guest/build-kernel.sh"
step "build kata-rs" build_kata
step "install kata-rs" install_kata
