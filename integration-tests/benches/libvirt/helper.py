#!/usr/bin/python3
"""libvirt's side of `cargo bench --bench libvirt`, through its Python API.

Started (and stopped by pid) by the Rust bench, as a client of the
private libvirtd the harness runs (integration-tests/src/libvirtd.rs):

  helper.py client URI
      Reads one JSON command per line on stdin and answers one JSON line
      on stdout: {"ok": true, "s": SECONDS, ...} or {"ok": false,
      "error": TEXT}. Each time is taken around the API call alone, with
      time.perf_counter(). Commands (key "cmd"):
        define {xml}; start_paused {name}; destroy {name}; undefine {name};
        resume {name}; state {name};
        stop_event {name}: suspend, timed to the STOP event's arrival at a
          qemuMonitorEventRegister callback (libvirt's event loop on its
          own thread), split at QEMU's timestamp of the event (wall
          clock): "to_qemu" and "from_qemu";
        agent_ping {name, n}: n guest-pings by qemuAgentCommand, each
          timed ("samples");
        wait_agent {name, timeout}: guest-pings until one answers.
"""

import json
import sys
import threading
import time


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

    def on_event(_conn, dom, event, secs, micros, _details, _opaque):
        now = time.perf_counter()
        wall = time.time()
        if event == "STOP":
            with lock:
                w = stops.get(dom.name())
            if w is not None and "at" not in w:
                w["at"] = now
                w["wall"] = wall
                w["qemu"] = secs + micros / 1e6
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
            wall = time.time()
            t = time.perf_counter()
            dom.suspend()
            if not w["done"].wait(10):
                raise RuntimeError("no STOP event within 10 s")
            with lock:
                del stops[dom.name()]
            return {
                "s": w["at"] - t,
                "to_qemu": w["qemu"] - wall,
                "from_qemu": w["wall"] - w["qemu"],
            }
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
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        client(sys.argv[2])
    else:
        sys.exit(__doc__)
