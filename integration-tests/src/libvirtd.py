#!/usr/bin/python3
"""A private libvirtd for the tests and benches (integration-tests/src/libvirtd.rs
starts it, and stops it by pid).

  libvirtd.py DIR

Runs libvirtd and its virtlogd so that nothing outside DIR changes and
another libvirtd (the system's, another test's) is neither seen nor
disturbed: in their own mount namespace, DIR/qemu.conf (the system one
plus user/group root, so QEMU can read files under /tmp), DIR/qemu
(domain XML) and DIR/hooks are bind-mounted over /etc/libvirt's, and
DIR/run, DIR/lib, DIR/cache and DIR/log over /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt; their pid
files are in DIR. Clients connect to DIR/run/libvirt-sock
(qemu:///system?socket=...). This process stays their parent as a child
subreaper and reaps at once every QEMU libvirt daemonizes (PID 1 here
reaps orphans about once a second, and libvirt's destroy waits for the
zombie to go; systemd does this on a real host). SIGTERM stops them; it
exits when libvirtd does. libvirtd logs warnings and errors to
DIR/libvirtd.log.
"""

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000


def daemon(workdir):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER): errno %d" % ctypes.get_errno())
    binds = (
        ("qemu.conf", "/etc/libvirt/qemu.conf"),
        ("qemu", "/etc/libvirt/qemu"),
        ("hooks", "/etc/libvirt/hooks"),
        ("run", "/run/libvirt"),
        ("lib", "/var/lib/libvirt"),
        ("cache", "/var/cache/libvirt"),
        ("log", "/var/log/libvirt"),
    )
    for src, dst in binds:
        if src != "qemu.conf":
            os.makedirs(os.path.join(workdir, src), exist_ok=True)
            # A mount point the package's tmpfiles.d would create at boot
            # (/run/libvirt), missing where systemd is not PID 1: the
            # empty directory, as tmpfiles makes it.
            os.makedirs(dst, mode=0o755, exist_ok=True)
    conf = os.path.join(workdir, "qemu.conf")
    shutil.copyfile("/etc/libvirt/qemu.conf", conf)
    with open(conf, "a") as f:
        f.write('\nuser = "root"\ngroup = "root"\n')
    # This process (single-threaded) moves into a mount namespace of its
    # own; every child below inherits it.
    if libc.unshare(CLONE_NEWNS) != 0:
        sys.exit("unshare(CLONE_NEWNS): errno %d" % ctypes.get_errno())
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for src, dst in binds:
        subprocess.run(["mount", "--bind", os.path.join(workdir, src), dst], check=True)
    children = []
    children.append(subprocess.Popen(
        ["virtlogd", "-p", os.path.join(workdir, "virtlogd.pid")],
        stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while not os.path.exists("/run/libvirt/virtlogd-sock"):
        if time.monotonic() > deadline or children[0].poll() is not None:
            sys.exit("virtlogd did not create /run/libvirt/virtlogd-sock")
        time.sleep(0.02)
    env = dict(os.environ)
    env["LIBVIRT_LOG_OUTPUTS"] = "3:file:%s" % os.path.join(workdir, "libvirtd.log")
    libvirtd = subprocess.Popen(
        ["libvirtd", "-p", os.path.join(workdir, "libvirtd.pid")],
        stdin=subprocess.DEVNULL, env=env)
    children.append(libvirtd)

    def stop(_sig, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Reap everything that ends below us (QEMUs libvirt daemonized too).
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == libvirtd.pid:
            libvirtd.returncode = os.waitstatus_to_exitcode(status)
            stop(None, None)
        for c in children:
            if c.pid == pid and c.returncode is None:
                c.returncode = os.waitstatus_to_exitcode(status)
    sys.exit(0)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    daemon(sys.argv[1])
