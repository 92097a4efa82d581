#!/usr/bin/env bash
# Build the kata-rs guest initrd: a newc cpio whose /init is the agent.
#
# usage: guest/build-initrd.sh [--compression none|gzip] [--add SRC:/DEST]... AGENT_BINARY OUTPUT
#
#   --compression  default: ${KATA_RS_INITRD_COMPRESSION:-none}. Uncompressed
#                  boots faster under TCG (the in-guest gunzip is emulated);
#                  see guest/README.md for the numbers.
#   --add SRC:DEST extra file copied into the image at DEST (mode kept), e.g.
#                  a busybox for debugging images. May be repeated.
#
# Layout: /init (the agent, 0755), the directories the agent mounts on
# (/proc /sys /dev /run /tmp /etc /root), and /etc/passwd, /etc/group and
# /etc/nsswitch.conf with root, so glibc's static NSS "files" backend resolves
# uid/gid 0. The kernel's built-in initramfs already provides /dev/console.
#
# The archive is deterministic: entries sorted, owner 0:0, mtime 0, fixed
# modes, cpio --reproducible, gzip -n. Equal inputs give byte-equal output.
set -euo pipefail

compression="${KATA_RS_INITRD_COMPRESSION:-none}"
extras=()
usage() { echo "usage: $0 [--compression none|gzip] [--add SRC:/DEST]... AGENT_BINARY OUTPUT" >&2; exit 2; }
while (($#)); do
    case "$1" in
        --compression) (($# >= 2)) || usage; compression="$2"; shift 2 ;;
        --compression=*) compression="${1#*=}"; shift ;;
        --add) (($# >= 2)) || usage; extras+=("$2"); shift 2 ;;
        --add=*) extras+=("${1#*=}"); shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) break ;;
    esac
done
(($# == 2)) || usage
agent="$1"
output="$2"
case "$compression" in none|gzip) ;; *) echo "--compression must be none or gzip, not '$compression'" >&2; exit 2 ;; esac
[[ -f "$agent" ]] || { echo "agent binary not found: $agent" >&2; exit 1; }

stage="$(mktemp -d)"
tmpout=""
cleanup() { rm -rf "$stage"; [[ -z "$tmpout" ]] || rm -f "$tmpout"; }
trap cleanup EXIT

umask 022
for d in proc sys dev run tmp etc root; do mkdir -p "$stage/$d"; done
chmod 1777 "$stage/tmp"
chmod 0700 "$stage/root"
install -m 0755 "$agent" "$stage/init"
# Symbols are of no use in the guest, and every byte of /init costs guest memory twice (the initrd and its
# unpacked copy).
strip --strip-all "$stage/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$stage/etc/nsswitch.conf"
chmod 0644 "$stage/etc/passwd" "$stage/etc/group" "$stage/etc/nsswitch.conf"

for spec in "${extras[@]}"; do
    src="${spec%%:*}"; dst="${spec#*:}"
    [[ "$spec" == *:* && -f "$src" && "$dst" == /* ]] || { echo "bad --add '$spec' (want SRC:/DEST with SRC a file)" >&2; exit 1; }
    mkdir -p "$stage$(dirname "$dst")"
    cp "$src" "$stage$dst"
    chmod "$(stat -c %a "$src")" "$stage$dst"
done

# Fixed mtimes on everything (directories last-touched by the copies above).
find "$stage" -exec touch -h -d @0 {} +

mkdir -p "$(dirname "$output")"
tmpout="$(mktemp "$output.tmp.XXXXXX")"
(
    cd "$stage"
    find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
        cpio --create --null --format=newc --reproducible --owner=0:0 --quiet
) | if [[ "$compression" == gzip ]]; then gzip -n -9; else cat; fi >"$tmpout"
chmod 0644 "$tmpout"
mv -f "$tmpout" "$output"
tmpout=""
echo "$output"
