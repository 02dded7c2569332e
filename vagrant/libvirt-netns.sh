#!/usr/bin/env bash
# libvirt for Vagrant on a machine where no service manager starts libvirtd (a container,
# a CI sandbox): start virtlogd and libvirtd by hand inside a network namespace of their
# own, so that the networks vagrant-libvirt creates (virbr*, 192.168.121.0/24, NAT rules)
# live there and never in the machine's root namespace. Vagrant then runs in it too:
#
#   vagrant/libvirt-netns.sh start
#   make vm-test VM_PROVIDER=libvirt VAGRANT_NETNS=tapstack-vm TAPSTACK_BOX=tapstack/bookworm
#   vagrant/libvirt-netns.sh stop      # after make vm-destroy
#
# On an ordinary Debian host, `systemctl start libvirtd` does this job and none of it is
# needed. Installs libvirt-daemon-system, vagrant-libvirt and dnsmasq-base when missing.
set -euo pipefail
ns=${VAGRANT_NETNS:-tapstack-vm}
run=/run/tapstack-vm

if [ "$(id -u)" -ne 0 ]; then
    echo "libvirt-netns.sh needs root; run: sudo $0 ${1:-start}" >&2
    exit 1
fi

alive() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

case ${1:-} in
    start)
        need=()
        command -v libvirtd >/dev/null 2>&1 || need+=(libvirt-daemon-system libvirt-clients)
        command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
        VAGRANT_CHECKPOINT_DISABLE=1 vagrant plugin list 2>/dev/null | grep -q '^vagrant-libvirt' \
            || need+=(vagrant-libvirt)
        if [ "${#need[@]}" -gt 0 ]; then
            echo "libvirt-netns: installing ${need[*]}"
            "$(dirname "$0")/../tools/apt-install.sh" "${need[@]}"
        fi
        mkdir -p "$run"
        if ! ip netns list | grep -q -w "^$ns"; then
            ip netns add "$ns"
            ip -n "$ns" link set lo up
        fi
        alive virtlogd || ip netns exec "$ns" virtlogd -d -p "$run/virtlogd.pid"
        alive libvirtd || ip netns exec "$ns" libvirtd -d -p "$run/libvirtd.pid"
        for _ in $(seq 50); do
            ip netns exec "$ns" virsh -q -c qemu:///system version >/dev/null 2>&1 && break
            sleep 0.2
        done
        ip netns exec "$ns" virsh -q -c qemu:///system version >/dev/null
        echo "libvirt-netns: libvirtd (pid $(cat "$run/libvirtd.pid")) runs in namespace $ns;" \
             "use VAGRANT_NETNS=$ns with make vm-up / vm-test / vm-destroy"
        ;;
    stop)
        for d in libvirtd virtlogd; do
            if alive "$d"; then
                kill "$(cat "$run/$d.pid")"
            fi
            rm -f "$run/$d.pid"
        done
        if ip netns list | grep -q -w "^$ns"; then
            ip netns del "$ns"
        fi
        echo "libvirt-netns: stopped; namespace $ns removed"
        ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
