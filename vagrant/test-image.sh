#!/usr/bin/env bash
# Boot the image vagrant/build-image.sh made under qemu (KVM where the CPU allows it,
# VM_ACCEL=auto|kvm|tcg), with 2 CPUs and 2 GB as the Vagrantfile asks, run `make test`
# inside it (CI=true, as .ci/run does), and report.
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
if [ "${VM_ACCEL:-auto}" = kvm ] && [ ! -c /dev/kvm ]; then
    echo "test-image.sh: VM_ACCEL=kvm but this machine has no /dev/kvm" >&2
    exit 1
fi
if [ ! -f "$out/disk.raw" ]; then
    "$here/build-image.sh"
fi

# KVM when the CPU offers hardware virtualization; otherwise qemu's emulator (TCG),
# about ten times slower. Some machines have a /dev/kvm that cannot boot a stock kernel
# (a PVM-only nested hypervisor, no vmx/svm flag): there too, auto picks tcg.
accel=${VM_ACCEL:-auto}
if [ "$accel" = auto ]; then
    if [ -c /dev/kvm ] && grep -q -w -E 'vmx|svm' /proc/cpuinfo; then
        accel=kvm
    else
        accel=tcg
        echo "test-image: no usable KVM here (no vmx/svm flag); emulating with TCG"
    fi
fi
case $accel in
    kvm) cpu=(-enable-kvm -cpu host) ;;
    tcg) cpu=(-accel "tcg,thread=multi" -cpu max) ;;
    *) echo "test-image.sh: VM_ACCEL is auto, kvm or tcg, not $accel" >&2; exit 2 ;;
esac
qemu=(qemu-system-x86_64 "${cpu[@]}" -smp 2 -m 2048
      -kernel "$out/vmlinuz" -initrd "$out/initrd.img"
      -drive "file=$out/disk.raw,format=raw,if=virtio,snapshot=on"
      -nic none -display none -no-reboot)
cmdline="root=/dev/vda rw console=ttyS0"

if [ "$mode" = shell ]; then
    exec "${qemu[@]}" -serial mon:stdio -append "$cmdline"
fi

# VM_TEST_CMD, if set, runs instead of `CI=true make test` (in /vagrant), handed over on
# a small second disk, e.g. VM_TEST_CMD='.venv/bin/pytest -x tests/integration/test_tcp.py'.
extra=()
if [ -n "${VM_TEST_CMD:-}" ]; then
    printf '%s' "$VM_TEST_CMD" >"$out/cmd.img"
    truncate -s 4096 "$out/cmd.img"
    extra=(-drive "file=$out/cmd.img,format=raw,if=virtio,readonly=on")
fi

log=$out/selftest-$(date -u +%Y%m%dT%H%M%SZ).log
echo "test-image: booting $out/disk.raw (commit $(cat "$out/commit" 2>/dev/null || echo '?'))," \
     "console in $log"
start=$(date +%s)
set +e
timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" "${extra[@]}" -serial stdio -monitor none \
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
    echo "test-image: PASS: ${VM_TEST_CMD:-make test} passed inside the VM ($result; boot to power-off ${elapsed} s)"
    exit 0
fi
echo "test-image: FAIL: ${VM_TEST_CMD:-make test} exited $rc inside the VM ($result); see $log" >&2
exit 1
