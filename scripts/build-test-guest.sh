#!/usr/bin/env bash
# Builds a tiny guest for end-to-end tests: Debian's kernel as an ELF
# vmlinux (QEMU boots it through its PVH entry: no decompressor, ~2 s to
# userspace under TCG) and an initramfs holding busybox, the virtio-serial
# modules and a guest agent, which /init starts on the
# org.qemu.guest_agent.0 port. Nothing is installed on the host: the two
# Debian packages are fetched with `apt-get download` and unpacked into
# OUTDIR/cache, which is reused on the next run.
#
# Usage: scripts/build-test-guest.sh OUTDIR AGENT
#   AGENT: a statically linked qemu-ga compatible agent (qvirt-ga from
#   `make static-ga`); it is started as
#   `AGENT -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run`.
# Writes OUTDIR/vmlinux and OUTDIR/initramfs. Boot with
#   -machine q35 -accel tcg -m 128 -kernel vmlinux -initrd initramfs
#   -append 'console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check'
# (see ../shared/research/e2e.md for why each argument is there).
set -euo pipefail

die() { echo "build-test-guest: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 OUTDIR AGENT"
out=$1
agent=$2
[ -x "$agent" ] || die "$agent is not an executable file"
for tool in apt-get apt-cache dpkg-deb python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (a Debian host is needed)"
done
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache

# Every virtio driver is a module in Debian's kernel; in dependency order.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console"

# The kernel package linux-image-amd64 points at, and busybox-static.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)
[ -n "$kpkg" ] || die "apt-cache knows no kernel behind linux-image-amd64 (run apt-get update)"
if [ ! -e "$cache/$kpkg.done" ]; then
    rm -rf "$cache"/*
    if ! (cd "$cache" && apt-get download -qq "$kpkg" busybox-static) >"$out/apt.log" 2>&1; then
        die "apt-get download $kpkg busybox-static failed: $(tail -n 3 "$out/apt.log")"
    fi
    dpkg-deb -x "$cache/$kpkg"_*.deb "$cache/kernel"
    dpkg-deb -x "$cache"/busybox-static_*.deb "$cache/busybox"
    rm -f "$cache"/*.deb
    # The bzImage's payload is xz; the ELF inside boots through PVH.
    python3 - "$cache"/kernel/boot/vmlinuz-* "$cache/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz payload in " + sys.argv[1])
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the payload of " + sys.argv[1] + " is not an ELF file")
open(sys.argv[2], "wb").write(elf)
PY
    # Keep what the guest needs, not the 400 MB of the unpacked package.
    mkdir -p "$cache/modules"
    for m in $modules; do
        ko=$(find "$cache/kernel/lib/modules" -name "$m.ko" | head -n 1)
        [ -n "$ko" ] || die "module $m.ko is not in $kpkg"
        cp "$ko" "$cache/modules/"
    done
    rm -rf "$cache/kernel"
    touch "$cache/$kpkg.done"
fi
ln -f "$cache/vmlinux" "$out/vmlinux"

busybox=$cache/busybox/bin/busybox
[ -x "$busybox" ] || die "no busybox in $cache/busybox"
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
# Without debug info: a smaller initramfs to load.
strip -o "$root/bin/qvirt-ga" "$agent" 2>/dev/null || cp "$agent" "$root/bin/qvirt-ga"
for m in $modules; do
    cp "$cache/modules/$m.ko" "$root/lib/modules/"
done

cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $modules; do insmod /lib/modules/\$m.ko; done
# No udev here: name the agent's port as udev would.
mkdir -p /dev/virtio-ports
i=0
while [ ! -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && [ \$i -lt 100 ]; do
    for port in /sys/class/virtio-ports/vport*; do
        [ -e "\$port/name" ] && ln -sf "/dev/\${port##*/}" "/dev/virtio-ports/\$(cat "\$port/name")"
    done
    i=\$((i + 1))
    sleep 0.1
done
echo "qvirt-test-guest: starting the agent"
/bin/qvirt-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run &
while true; do sleep 3600; done
EOF
# guest-shutdown runs `shutdown -h -P|-H|-r +0 MESSAGE`; busybox has no
# shutdown applet.
cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
case " $* " in
*" -r "*) exec reboot -f ;;
*" -H "*) exec halt -f ;;
*) exec poweroff -f ;;
esac
EOF
chmod 755 "$root/init" "$root/sbin/shutdown"
(cd "$root" && find . -print0 | "$busybox" cpio -o -0 -H newc -R 0:0 2>/dev/null) >"$out/initramfs.tmp"
mv "$out/initramfs.tmp" "$out/initramfs"
echo "build-test-guest: $out/vmlinux ($kpkg), $out/initramfs ($(du -k "$out/initramfs" | cut -f1) KiB)"
