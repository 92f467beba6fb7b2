#!/usr/bin/python3
"""libvirt's side of `cargo bench --bench libvirt`, through its Python API.

Two modes, both started (and stopped by pid) by the Rust bench:

  helper.py daemon DIR
      Runs a private libvirtd that changes nothing in /etc: in its own
      mount namespace, DIR/qemu.conf (the system one plus user/group root),
      DIR/qemu (domain XML) and DIR/hooks are bind-mounted over
      /etc/libvirt's. This process stays libvirtd's parent as a child
      subreaper and reaps at once every QEMU libvirt daemonizes (PID 1
      here reaps orphans about once a second, and libvirt's destroy waits
      for the zombie to go: without a prompt reaper destroy measures init,
      not libvirt; systemd does this on a real host). virtlogd is started
      too when none runs. SIGTERM stops them; it exits when libvirtd does.

  helper.py client URI
      Reads one JSON command per line on stdin and answers one JSON line
      on stdout: {"ok": true, "s": SECONDS, ...} or {"ok": false,
      "error": TEXT}. Each time is taken around the API call alone, with
      time.perf_counter(). Commands (key "cmd"):
        define {xml}; start_paused {name}; destroy {name}; undefine {name};
        resume {name}; state {name};
        stop_event {name}: suspend, timed to the STOP event's arrival at a
          qemuMonitorEventRegister callback (libvirt's event loop on its
          own thread);
        agent_ping {name, n}: n guest-pings by qemuAgentCommand, each
          timed ("samples");
        wait_agent {name, timeout}: guest-pings until one answers.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
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


def client(uri):
    import libvirt
    import libvirt_qemu

    # Errors reach the bench in the reply; libvirt would also print each.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    conn = libvirt.open(uri)
    stops = {}
    lock = threading.Lock()

    def on_event(_conn, dom, event, _secs, _micros, _details, _opaque):
        now = time.perf_counter()
        if event == "STOP":
            with lock:
                w = stops.get(dom.name())
            if w is not None and "at" not in w:
                w["at"] = now
                w["done"].set()

    libvirt_qemu.qemuMonitorEventRegister(conn, None, "STOP", on_event, None, 0)

    def timed(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    def handle(req):
        cmd = req["cmd"]
        if cmd == "version":
            return {"libvirt": conn.getLibVersion(), "qemu": conn.getVersion()}
        if cmd == "define":
            return {"s": timed(lambda: conn.defineXML(req["xml"]))}
        dom = conn.lookupByName(req["name"])
        if cmd == "start_paused":
            return {"s": timed(lambda: dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED))}
        if cmd == "start":
            return {"s": timed(dom.create)}
        if cmd == "destroy":
            return {"s": timed(dom.destroy)}
        if cmd == "undefine":
            return {"s": timed(dom.undefine)}
        if cmd == "resume":
            return {"s": timed(dom.resume)}
        if cmd == "state":
            return {"state": dom.state()[0]}
        if cmd == "stop_event":
            w = {"done": threading.Event()}
            with lock:
                stops[dom.name()] = w
            t = time.perf_counter()
            dom.suspend()
            if not w["done"].wait(10):
                raise RuntimeError("no STOP event within 10 s")
            with lock:
                del stops[dom.name()]
            return {"s": w["at"] - t}
        if cmd == "agent_ping":
            samples = []
            for _ in range(req["n"]):
                t = time.perf_counter()
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
                samples.append(time.perf_counter() - t)
            return {"samples": samples}
        if cmd == "wait_agent":
            deadline = time.monotonic() + req["timeout"]
            last = None
            while time.monotonic() < deadline:
                try:
                    libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                    return {}
                except libvirt.libvirtError as e:
                    last = str(e)
                    time.sleep(0.2)
            raise RuntimeError("the guest agent never answered: %s" % last)
        raise ValueError("unknown command %r" % cmd)

    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
            reply["ok"] = True
        except Exception as e:  # reported to the bench, which panics
            reply = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "daemon":
        daemon(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "client":
        client(sys.argv[2])
    else:
        sys.exit(__doc__)
