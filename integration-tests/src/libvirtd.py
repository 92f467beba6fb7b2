#!/usr/bin/python3
"""A private libvirtd for the tests and benches (integration-tests/src/libvirtd.rs
starts it, and stops it by pid).

  libvirtd.py DIR

Runs libvirtd so that nothing in /etc changes: in its own mount
namespace, DIR/qemu.conf (the system one plus user/group root, so QEMU
can read files under /tmp), DIR/qemu (domain XML) and DIR/hooks are
bind-mounted over /etc/libvirt's. This process stays libvirtd's parent
as a child subreaper and reaps at once every QEMU libvirt daemonizes
(PID 1 here reaps orphans about once a second, and libvirt's destroy
waits for the zombie to go; systemd does this on a real host). virtlogd
is started too when none runs. SIGTERM stops them; it exits when
libvirtd does. libvirtd logs warnings and errors to DIR/libvirtd.log.
"""

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def daemon(workdir):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER): errno %d" % ctypes.get_errno())
    for d in ("qemu", "hooks"):
        os.makedirs(os.path.join(workdir, d), exist_ok=True)
    conf = os.path.join(workdir, "qemu.conf")
    shutil.copyfile("/etc/libvirt/qemu.conf", conf)
    with open(conf, "a") as f:
        f.write('\nuser = "root"\ngroup = "root"\n')
    children = []
    if not os.path.exists("/run/libvirt/virtlogd-sock"):
        children.append(subprocess.Popen(["virtlogd"], stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not os.path.exists("/run/libvirt/virtlogd-sock"):
            if time.monotonic() > deadline:
                sys.exit("virtlogd did not create /run/libvirt/virtlogd-sock")
            time.sleep(0.02)
    mounts = " && ".join(
        "mount --bind %s %s" % (os.path.join(workdir, src), dst)
        for src, dst in (
            ("qemu.conf", "/etc/libvirt/qemu.conf"),
            ("qemu", "/etc/libvirt/qemu"),
            ("hooks", "/etc/libvirt/hooks"),
        )
    )
    env = dict(os.environ)
    env["LIBVIRT_LOG_OUTPUTS"] = "3:file:%s" % os.path.join(workdir, "libvirtd.log")
    libvirtd = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         mounts + " && exec libvirtd"],
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
