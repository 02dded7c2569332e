#!/usr/bin/env bash
# Boot the image vagrant/build-image.sh made under qemu with KVM (2 CPUs, 2 GB, as the
# Vagrantfile asks), run `make test` inside it (CI=true, as .ci/run does), and report.
#
#   vagrant/test-image.sh           build the image if there is none, boot, test, power off;
#                                   exit 0 only if `make test` passed inside the VM
#   vagrant/test-image.sh --shell   boot the same image with a root shell on this terminal
#                                   (leave with `poweroff`)
#
# The VM has no network card (-nic none): everything make test needs is in the image, and
# the tests' traffic stays in namespaces inside the VM. The disk is opened with
# snapshot=on, so every boot starts from the same image. The serial console is logged
# to build/vm/selftest-<time>.log. VM_TIMEOUT (seconds, default 3600) bounds the run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${VM_OUT:-$repo/build/vm}
timeout_s=${VM_TIMEOUT:-3600}
mode=selftest
case ${1:-} in
    "") ;;
    --shell) mode=shell ;;
    *) echo "usage: $0 [--shell]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "test-image.sh needs root (/dev/kvm); run: sudo $0" >&2
    exit 1
fi
if [ ! -c /dev/kvm ]; then
    echo "test-image.sh: no /dev/kvm on this machine; the VM would be too slow to test in" >&2
    exit 1
fi
if [ ! -f "$out/disk.raw" ]; then
    "$here/build-image.sh"
fi

qemu=(qemu-system-x86_64 -enable-kvm -cpu host -smp 2 -m 2048
      -kernel "$out/vmlinuz" -initrd "$out/initrd.img"
      -drive "file=$out/disk.raw,format=raw,if=virtio,snapshot=on"
      -nic none -display none -no-reboot)
cmdline="root=/dev/vda rw console=ttyS0"

if [ "$mode" = shell ]; then
    exec "${qemu[@]}" -serial mon:stdio -append "$cmdline"
fi

log=$out/selftest-$(date -u +%Y%m%dT%H%M%SZ).log
echo "test-image: booting $out/disk.raw (commit $(cat "$out/commit" 2>/dev/null || echo '?'))," \
     "console in $log"
start=$(date +%s)
set +e
timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" -serial stdio -monitor none \
    -append "$cmdline quiet tapstack.selftest=1" </dev/null | tee "$log"
qemu_rc=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - start))

result=$(grep -a -o 'TAPSTACK-SELFTEST rc=[0-9]* seconds=[0-9]*' "$log" | tail -1 || true)
if [ -z "$result" ]; then
    echo "test-image: FAIL: no result from the VM after ${elapsed} s (qemu exit $qemu_rc); see $log" >&2
    exit 1
fi
rc=${result#*rc=}
rc=${rc%% *}
if [ "$rc" = 0 ]; then
    echo "test-image: PASS: make test passed inside the VM ($result; boot to power-off ${elapsed} s)"
    exit 0
fi
echo "test-image: FAIL: make test exited $rc inside the VM ($result); see $log" >&2
exit 1
