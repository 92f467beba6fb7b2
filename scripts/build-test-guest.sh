#!/usr/bin/env bash
# Builds a tiny guest for end-to-end tests and the `make run` demo:
# Debian's kernel as an ELF vmlinux (QEMU boots it through its PVH entry: no
# decompressor, ~2 s to userspace under TCG) and an initramfs holding
# busybox, the virtio-serial modules and a guest agent, which /init starts
# on the org.qemu.guest_agent.0 port. Nothing is installed on the host: the
# two Debian packages are fetched with `apt-get download` and what the
# guest needs from them is kept in OUTDIR/cache for the next run.
#
# Usage: scripts/build-test-guest.sh OUTDIR AGENT
#   AGENT: a qemu-ga compatible agent (qvirt-ga from `make static-ga`, or
#   Debian's dynamically linked qemu-ga, whose libraries are copied from
#   the host at the same paths); the guest runs
#   `AGENT -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run`.
# The guest has a root user (/etc/passwd, /etc/shadow, /root) as a real
# one does, for the agent's user commands.
# Writes OUTDIR/vmlinux and OUTDIR/initramfs, and prints one line ending
# with the kernel package's name in parentheses. Boot with
#   -machine q35 -accel tcg -m 128 -kernel vmlinux -initrd initramfs
#   -append 'console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check'
# (integration-tests/src/guest.rs defines the test guest with them).
#
# Exit status: 0 built; 77 the packages cannot be fetched here (no package
# lists or no mirror: callers may skip); anything else is a failure.
set -euo pipefail

die() { echo "build-test-guest: $*" >&2; exit 1; }
cannot_fetch() { echo "build-test-guest: $*" >&2; exit 77; }
[ $# -eq 2 ] || die "usage: $0 OUTDIR AGENT"
out=$1
agent=$2
[ -x "$agent" ] || die "$agent is not an executable file"
for tool in apt-get apt-cache dpkg-deb python3 flock; do
    command -v "$tool" >/dev/null || cannot_fetch "$tool is missing (a Debian host is needed)"
done
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache
# One build at a time per OUTDIR (tests and `make run` may share one).
exec 9>"$out/.lock"
flock -w 600 9 || die "$out is locked by another build for 10 minutes"

# Every virtio driver is a module in Debian's kernel; in dependency order.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console"

# The kernel package linux-image-amd64 points at, and busybox-static.
# apt-cache takes ~2 s; its answer changes only when apt's package lists
# do (apt-get update renames new lists into place, which changes the
# directory's mtime), so it is kept beside the image with that mtime.
lists=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none)
kpkg=""
if [ -f "$out/.kernel-package" ] && [ "$(sed -n 2p "$out/.kernel-package")" = "$lists" ]; then
    kpkg=$(sed -n 1p "$out/.kernel-package")
fi
if [ -z "$kpkg" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1) || true
    [ -n "$kpkg" ] || cannot_fetch "apt-cache knows no kernel behind linux-image-amd64 (run apt-get update)"
    printf '%s\n%s\n' "$kpkg" "$lists" >"$out/.kernel-package"
fi
if [ ! -e "$cache/$kpkg.done" ]; then
    rm -rf "$cache"
    mkdir -p "$cache"
    if ! (cd "$cache" && timeout 600 apt-get download -qq "$kpkg" busybox-static) >"$out/apt.log" 2>&1; then
        cannot_fetch "apt-get download $kpkg busybox-static failed: $(tail -n 3 "$out/apt.log")"
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
    # Modules are plain .ko on bookworm; later releases compress them.
    mkdir -p "$cache/modules"
    for m in $modules; do
        ko=$(find "$cache/kernel" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)
        [ -n "$ko" ] || die "module $m is not in $kpkg (neither .ko nor .ko.xz)"
        python3 - "$ko" "$cache/modules/$m.ko" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
if sys.argv[1].endswith(".xz"):
    data = lzma.decompress(data)
open(sys.argv[2], "wb").write(data)
PY
    done
    rm -rf "$cache/kernel"
    touch "$cache/$kpkg.done"
fi
ln -f "$cache/vmlinux" "$out/vmlinux"

busybox=$cache/busybox/bin/busybox
[ -x "$busybox" ] || die "no busybox in $cache/busybox"
root=$(mktemp -d "$out/root.XXXXXX")
image=$(mktemp "$out/initramfs.XXXXXX")
trap 'rm -rf "$root" "$image"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,lib/modules,etc,var,root}
ln -s ../run "$root/var/run"
chmod 700 "$root/root"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
chmod 600 "$root/etc/shadow"
cp "$busybox" "$root/bin/busybox"
# Without debug info: a smaller initramfs to load.
strip -o "$root/bin/qvirt-ga" "$agent" 2>/dev/null || cp "$agent" "$root/bin/qvirt-ga"
# A dynamically linked agent (Debian's qemu-ga) gets its libraries at the
# paths ldd names.
if ldd "$agent" >/dev/null 2>&1; then
    for lib in $(ldd "$agent" | grep -oE '/[^ ]+\.so[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
fi
for m in $modules; do
    cp "$cache/modules/$m.ko" "$root/lib/modules/"
done

cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $modules; do insmod /lib/modules/\$m.ko || echo "qvirt-test-guest: insmod \$m failed"; done
# No udev here: name the agent's port as udev would.
mkdir -p /dev/virtio-ports
port=/dev/virtio-ports/org.qemu.guest_agent.0
i=0
while [ ! -e \$port ] && [ \$i -lt 600 ]; do
    for p in /sys/class/virtio-ports/vport*; do
        [ -e "\$p/name" ] && ln -sf "/dev/\${p##*/}" "/dev/virtio-ports/\$(cat "\$p/name")"
    done
    i=\$((i + 1))
    sleep 0.1
done
[ -e \$port ] || echo "qvirt-test-guest: no \$port after 60 s"
echo "qvirt-test-guest: starting the agent"
# Restarted if it ever exits, as a service manager would.
while true; do
    /bin/qvirt-ga -m virtio-serial -p \$port -t /run
    echo "qvirt-test-guest: the agent exited (\$?); restarting it"
    sleep 1
done
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
# guest-set-user-password runs `chpasswd [-e]` with `USER:PASSWORD` on
# stdin; Debian's busybox has no chpasswd applet. This one does what
# shadow's does for one line: an unknown user fails, the entry in
# /etc/shadow gets the (given or SHA-512) crypted password.
cat >"$root/usr/sbin/chpasswd" <<'EOF'
#!/bin/sh
crypted=
[ "$1" = -e ] && crypted=1
IFS=: read -r user pass || exit 1
if ! grep -q "^$user:" /etc/passwd; then
    echo "chpasswd: line 1: user '$user' does not exist" >&2
    echo "chpasswd: error detected, changes ignored" >&2
    exit 1
fi
[ -n "$crypted" ] || pass=$(mkpasswd -m sha512 "$pass") || exit 1
sed -i "s|^$user:[^:]*:|$user:$pass:|" /etc/shadow
EOF
chmod 755 "$root/init" "$root/sbin/shutdown" "$root/usr/sbin/chpasswd"
(cd "$root" && find . -print0 | "$busybox" cpio -o -0 -H newc -R 0:0 2>/dev/null) >"$image"
chmod 644 "$image"
mv "$image" "$out/initramfs"
echo "build-test-guest: $out/vmlinux, $out/initramfs, $(du -k "$out/initramfs" | cut -f1) KiB ($kpkg)"
