#!/usr/bin/env bash
# Build a Debian 12 VM image for tapstack from Debian's package mirror alone: no Vagrant
# Cloud, no prebuilt box. debootstrap makes the root filesystem, a kernel comes from
# Debian (linux-image-amd64), the repository is copied to /vagrant (where Vagrant would
# sync it) and vagrant/provision.sh runs inside, exactly as a Vagrant provisioner would.
#
# Output, in build/vm/ (VM_OUT to change it):
#   disk.raw     ext4 root filesystem (sparse, VM_DISK_SIZE, default 8G), label tapstack-root
#   vmlinuz, initrd.img   the image's own kernel and initramfs, for qemu's direct boot
# vagrant/test-image.sh boots it under qemu and runs `make test` inside.
#
# With --box, also a Vagrant box for the libvirt provider, added to Vagrant as
# tapstack/bookworm: the disk as qcow2, booted directly with the image's kernel and
# initramfs (libvirt's kernel/initrd/cmd_line, so the disk needs no partition table and
# no boot loader; both files go to /var/lib/libvirt/boot on this host), and Vagrant's
# well-known insecure key for the vagrant user, which Vagrant replaces with a fresh key
# pair on the first `vagrant up`. Then:
#   TAPSTACK_BOX=tapstack/bookworm make vm-test VM_PROVIDER=libvirt
#
# The debootstrap stage is cached in build/vm/base (80 s the first time, here);
# `rm -rf build/vm` starts over. Needs root (chroot, device nodes).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${VM_OUT:-$repo/build/vm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
size=${VM_DISK_SIZE:-8G}
suite=bookworm
box=no
case ${1:-} in
    "") ;;
    --box) box=yes ;;
    *) echo "usage: $0 [--box]" >&2; exit 2 ;;
esac

say() { printf '%s build-image: %s\n' "$(date -u +%H:%M:%S)" "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "build-image.sh needs root (debootstrap, chroot); run: sudo $0" >&2
    exit 1
fi

# Host tools, installed only when missing.
declare -A pkg_of=([debootstrap]=debootstrap [qemu-system-x86_64]=qemu-system-x86
                   [mkfs.ext4]=e2fsprogs [git]=git [qemu-img]=qemu-utils)
[ "$box" = yes ] && pkg_of[vagrant]=vagrant
missing=()
for cmd in "${!pkg_of[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    "$repo/tools/apt-install.sh" "${missing[@]}"
fi

mkdir -p "$out"
base=$out/base
rootfs=$out/rootfs

# 1. The Debian base system, with a kernel, systemd and an ssh server (for Vagrant).
if [ ! -f "$base/.tapstack-complete" ]; then
    rm -rf "$base"
    say "debootstrap $suite from $mirror"
    debootstrap --variant=minbase \
        --include=systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,openssh-server,sudo,iproute2,procps,less,ca-certificates \
        "$suite" "$base" "$mirror" >"$out/debootstrap.log" 2>&1 \
        || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
    touch "$base/.tapstack-complete"
else
    say "reusing the debootstrap stage in $base"
fi

say "copying the base system to $rootfs"
rm -rf "$rootfs"
cp -a "$base" "$rootfs"
rm -f "$rootfs/.tapstack-complete"

# 2. The machine: name, root filesystem, DHCP on any NIC (for Vagrant), a vagrant user.
echo tapstack >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\ttapstack\n' >"$rootfs/etc/hosts"
echo 'LABEL=tapstack-root / ext4 defaults,errors=remount-ro 0 1' >"$rootfs/etc/fstab"
cat >"$rootfs/etc/systemd/network/80-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
# A root shell on the serial console for `test-image.sh --shell` (a disposable local VM).
mkdir -p "$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d"
# Not during the self-test: agetty's vhangup() would cut the test's output off the console.
cat >"$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Unit]
ConditionKernelCommandLine=!tapstack.selftest=1

[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF

# 3. The self-test (vagrant/selftest.sh): with tapstack.selftest=1 on the kernel command
# line, run `make test` once after boot, print the result on the serial console, power off.
install -m 755 "$here/selftest.sh" "$rootfs/usr/local/sbin/tapstack-selftest"
cat >"$rootfs/etc/systemd/system/tapstack-selftest.service" <<'EOF'
[Unit]
Description=tapstack: make test in /vagrant, result on ttyS0, then power off
ConditionKernelCommandLine=tapstack.selftest=1
After=network.target systemd-user-sessions.service

[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/usr/local/sbin/tapstack-selftest

[Install]
WantedBy=multi-user.target
EOF

# 4. The repository, as Vagrant's rsync would leave it in /vagrant: tracked and untracked
# files, nothing that .gitignore names (no .venv, no build/).
say "copying the repository to /vagrant"
mkdir -p "$rootfs/vagrant"
(cd "$repo" && git ls-files -z -c -o --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$rootfs/vagrant"

# 5. Provision inside the image, as Vagrant would: chroot with /proc, /sys and /dev, the
# host's resolver for the duration, and no service started by a package's postinst.
mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
    rm -f "$rootfs/usr/sbin/policy-rc.d" "$rootfs/tmp/host-ca.crt"
}
trap cleanup EXIT
for m in proc sys dev dev/pts; do
    case $m in
        proc) mount -t proc proc "$rootfs/proc" ;;
        sys) mount -t sysfs sys "$rootfs/sys" ;;
        dev) mount --bind /dev "$rootfs/dev" ;;
        dev/pts) mount -t devpts devpts "$rootfs/dev/pts" ;;
    esac
    mounted+=("$rootfs/$m")
done
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
rm -f "$rootfs/etc/resolv.conf"
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
# pip inside trusts what the host trusts (a host behind a TLS-inspecting proxy has its
# CA in its bundle), for the build only: the bundle is removed afterwards.
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/tmp/host-ca.crt"
passenv=(PIP_CERT=/tmp/host-ca.crt)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!v:-}" ] && passenv+=("$v=${!v}")
done

in_image() {
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 "${passenv[@]}" "$@"
}

say "provisioning (vagrant/provision.sh inside the image)"
in_image /vagrant/vagrant/provision.sh /vagrant >"$out/provision.log" 2>&1 \
    || { tail -30 "$out/provision.log" >&2; exit 1; }
say "provisioned: $(tail -1 "$out/provision.log")"

if ! in_image id vagrant >/dev/null 2>&1; then
    in_image useradd -m -s /bin/bash vagrant
fi
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$rootfs/etc/sudoers.d/vagrant"
chmod 440 "$rootfs/etc/sudoers.d/vagrant"
if [ "$box" = yes ]; then
    insecure=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant \
        -path '*/keys/vagrant.pub' 2>/dev/null | head -1 || true)
    if [ -z "$insecure" ]; then
        echo "build-image: Vagrant's insecure public key (keys/vagrant.pub) not found" >&2
        exit 1
    fi
    install -d -m 700 "$rootfs/home/vagrant/.ssh"
    install -m 600 "$insecure" "$rootfs/home/vagrant/.ssh/authorized_keys"
    in_image chown -R vagrant:vagrant /home/vagrant/.ssh
fi
in_image systemctl enable systemd-networkd.service tapstack-selftest.service >/dev/null 2>&1
in_image apt-get clean

cleanup
trap - EXIT
mounted=()
# No host resolver left behind: the VM's own DHCP lease (networkd) provides one if any.
rm -f "$rootfs/etc/resolv.conf"

# 6. The kernel for direct boot, and the disk: an ext4 filesystem made from the folder
# (mke2fs -d, so no loop device and no mount is needed).
kernel=$(find "$rootfs/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -1)
initrd=$(find "$rootfs/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -1)
if [ -z "$kernel" ] || [ -z "$initrd" ]; then
    echo "build-image: no kernel or initramfs in $rootfs/boot" >&2
    exit 1
fi
cp "$kernel" "$out/vmlinuz"
cp "$initrd" "$out/initrd.img"
say "making $out/disk.raw ($size, ext4, from $(du -sh "$rootfs" | cut -f1) of files)"
rm -f "$out/disk.raw"
mkfs.ext4 -q -F -L tapstack-root -d "$rootfs" "$out/disk.raw" "$size"
git -C "$repo" rev-parse --short HEAD >"$out/commit" 2>/dev/null || true
say "done: $out/disk.raw, $out/vmlinuz ($(basename "$kernel")), $out/initrd.img"

# 7. The Vagrant box (libvirt provider, direct kernel boot).
if [ "$box" = yes ]; then
    boxdir=$out/box
    rm -rf "$boxdir"
    mkdir -p "$boxdir"
    say "making the Vagrant box"
    qemu-img convert -O qcow2 "$out/disk.raw" "$boxdir/box.img"
    # libvirt's qemu runs as its own user and cannot read a kernel under ~/.vagrant.d:
    # the kernel and initramfs go where libvirt keeps boot files.
    install -d -m 711 /var/lib/libvirt/boot
    install -m 644 "$out/vmlinuz" /var/lib/libvirt/boot/tapstack-bookworm-vmlinuz
    install -m 644 "$out/initrd.img" /var/lib/libvirt/boot/tapstack-bookworm-initrd.img
    gib=$(($(stat -c %s "$out/disk.raw") / 1024 / 1024 / 1024))
    printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$gib" \
        >"$boxdir/metadata.json"
    cat >"$boxdir/Vagrantfile" <<'VAGRANTFILE'
# tapstack/bookworm, built by vagrant/build-image.sh --box on this host: boots the image's
# own kernel directly (installed in /var/lib/libvirt/boot by the same script).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = "/var/lib/libvirt/boot/tapstack-bookworm-vmlinuz"
    lv.initrd = "/var/lib/libvirt/boot/tapstack-bookworm-initrd.img"
    lv.cmd_line = "root=/dev/vda rw console=ttyS0"
  end
end
VAGRANTFILE
    tar -C "$boxdir" -cf "$out/tapstack-bookworm.box" \
        metadata.json Vagrantfile box.img
    rm -rf "$boxdir"
    VAGRANT_CHECKPOINT_DISABLE=1 vagrant box add --force --name tapstack/bookworm \
        "$out/tapstack-bookworm.box"
    say "box added as tapstack/bookworm; now:" \
        "TAPSTACK_BOX=tapstack/bookworm make vm-test VM_PROVIDER=libvirt"
fi
