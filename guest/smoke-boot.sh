#!/usr/bin/env bash
# Smoke-test a guest kernel: boot it with a throw-away busybox initrd and wait
# for the init script to print KATA_RS_BOOT_OK and the kernel release.
#
# usage: guest/smoke-boot.sh [--machine microvm|q35] [--compression none|gzip]
#                            [--accel tcg|kvm] [--payload FILE] [--timeout SECS] VMLINUX
#
#   --machine      microvm (virtio-mmio, default) or q35 (virtio-pci path)
#   --compression  initrd compression (default: build-initrd.sh's default)
#   --accel        tcg (default; see DESIGN.md: KVM here is kvm_pvm) or kvm
#   --payload      extra file packed into the initrd as /payload (e.g. a ~9 MB
#                  binary, to measure how initrd size/compression affects boot)
#   --timeout      seconds before giving up (default 60)
#
# Prints "boot-to-init <seconds>s" (from QEMU launch to the marker on the
# serial console). Exits non-zero, with the last console lines, on failure.
# QEMU is always killed by its PID on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
machine=microvm
compression=""
accel=tcg
payload=""
timeout=60
usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while (($#)); do
    case "$1" in
        --machine) machine="$2"; shift 2 ;;
        --compression) compression="$2"; shift 2 ;;
        --accel) accel="$2"; shift 2 ;;
        --payload) payload="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) break ;;
    esac
done
(($# == 1)) || usage
vmlinux="$1"
[[ -f "$vmlinux" ]] || { echo "vmlinux not found: $vmlinux" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 not installed" >&2; exit 1; }
busybox="${BUSYBOX:-/bin/busybox}"
[[ -x "$busybox" ]] || { echo "busybox not found at $busybox (apt-get install busybox-static)" >&2; exit 1; }

tmp="$(mktemp -d)"
qpid=""
cleanup() {
    if [[ -n "$qpid" ]] && kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$qpid" 2>/dev/null || true
    fi
    [[ -z "$qpid" ]] || wait "$qpid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$tmp/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "KATA_RS_BOOT_OK $(/bin/busybox uname -r)"
/bin/busybox poweroff -f
EOF
chmod 0755 "$tmp/init"
initrd_args=(--add "$busybox:/bin/busybox")
[[ -z "$payload" ]] || initrd_args+=(--add "$payload:/payload")
[[ -z "$compression" ]] || initrd_args+=(--compression "$compression")
"$here/build-initrd.sh" "${initrd_args[@]}" "$tmp/init" "$tmp/initrd.cpio" >/dev/null

# TCG on microvm needs the TSC frequency given (else it may hang at "Marking
# TSC unstable"); harmless elsewhere.
khz="$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)"
cmdline="console=ttyS0 reboot=t panic=-1 quiet"
[[ -z "$khz" ]] || cmdline+=" tsc_early_khz=$khz"
case "$machine" in
    microvm) mopts=(-M microvm,pit=on,pic=off,isa-serial=on,rtc=on) ;;
    q35) mopts=(-M q35) ;;
    *) echo "--machine must be microvm or q35" >&2; exit 2 ;;
esac
case "$accel" in
    tcg) aopts=(-accel tcg -cpu max) ;;
    kvm) aopts=(-accel kvm -cpu host) ;;
    *) echo "--accel must be tcg or kvm" >&2; exit 2 ;;
esac

log="$tmp/console.log"
: >"$log"
t0="$(date +%s%N)"
qemu-system-x86_64 "${mopts[@]}" "${aopts[@]}" -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial stdio -kernel "$vmlinux" -initrd "$tmp/initrd.cpio" -append "$cmdline" \
    </dev/null >"$log" 2>&1 &
qpid=$!

deadline=$((SECONDS + timeout))
result=timeout
while ((SECONDS < deadline)); do
    if grep -q "KATA_RS_BOOT_OK" "$log"; then result=ok; break; fi
    if ! kill -0 "$qpid" 2>/dev/null; then
        grep -q "KATA_RS_BOOT_OK" "$log" && result=ok || result=exited
        break
    fi
    sleep 0.02
done
t1="$(date +%s%N)"

if [[ "$result" != ok ]]; then
    echo "smoke-boot: FAILED ($result after $(( (t1 - t0) / 1000000 )) ms; machine=$machine accel=$accel)" >&2
    echo "---- last console lines ----" >&2
    tail -n 40 "$log" | tr -d '\r' >&2
    exit 1
fi
release="$(grep -a -m1 "KATA_RS_BOOT_OK" "$log" | tr -d '\r' | awk '{print $2}')"
# Let it power off by itself (proves ACPI power-off works); the trap kills it otherwise.
for _ in $(seq 1 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$qpid" 2>/dev/null; then poweroff=no; else poweroff=yes; fi
ms=$(( (t1 - t0) / 1000000 ))
printf 'smoke-boot: KATA_RS_BOOT_OK release=%s machine=%s accel=%s initrd=%s powered-off=%s\n' \
    "$release" "$machine" "$accel" "${compression:-default}" "$poweroff"
printf 'boot-to-init %d.%03ds\n' "$((ms / 1000))" "$((ms % 1000))"
