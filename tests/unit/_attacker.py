"""A second process for the security tests: an engine with the secret that does what it is
told on stdin (one JSON command a line) and answers one JSON line each.

Run as ``python _attacker.py SECRET [JSON engine options]``. Commands: ``write``, ``read``,
``maps``, ``grab``, ``alloc``, ``register``, ``address``, ``stats``, ``quit``.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import sys
import threading

import tensorfabric as tf
from tensorfabric import _wire as w
from tensorfabric._ops import WireOp, simple_chunk
from tensorfabric._region import RegionDescriptor
from tensorfabric._transfer import Transfer
from tensorfabric.transports._shm_grant import GRANT, redeem


def _desc(cmd: dict) -> RegionDescriptor:
    return RegionDescriptor.from_bytes(bytes.fromhex(cmd["desc"]))


def _grab(eng: tf.Engine, cmd: dict) -> dict:
    """Ask for a region's memory the raw way, then try to do more than the grant allows."""
    desc = _desc(cmd)
    peer = eng._peer(desc.owner)
    check = Transfer("shm-open")
    wop = WireOp(next(eng._tcp.op_ids), check, str(peer))
    eng._tcp.submit(peer, [simple_chunk(wop, w.Op.SHM_OPEN, region=desc.region_id,
                                        imm=int(cmd["need"]), ext=desc.key)])
    try:
        check.wait(10)
    except tf.TensorFabricError as exc:
        return {"granted": False, "error": type(exc).__name__}
    grant = bytes(check.value)
    ticket, _ = GRANT.unpack_from(grant)
    status, nbytes, fd = redeem(grant[GRANT.size:], ticket, 5)
    out: dict = {"granted": fd >= 0, "nbytes": nbytes}
    if fd < 0:
        return out
    again = redeem(grant[GRANT.size:], ticket, 5)  # a ticket works once
    out["second_redeem"] = again[2] >= 0
    try:
        out["mode"] = "rw" if _writable(fd) else "ro"
        for name, attempt in (("reopen_rw", lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
                              ("pwrite", lambda: os.pwrite(fd, b"X", 0)),
                              ("truncate", lambda: os.ftruncate(fd, 0))):
            try:
                res = attempt()
                if name == "reopen_rw":
                    try:
                        m = mmap.mmap(res, nbytes, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
                        m[:1] = b"X"
                        m.close()
                        out[name] = "wrote"
                    except OSError:
                        out[name] = "refused"
                    finally:
                        os.close(res)
                else:
                    out[name] = "did"
            except OSError:
                out[name] = "refused"
    finally:
        os.close(fd)
    return out


def _writable(fd: int) -> bool:
    import fcntl
    return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) == os.O_RDWR


def _stats(eng: tf.Engine) -> dict:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t = eng._tcp
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "rss": rss, "peers": len(t._peers), "accepted": len(t._accepted),
            "pending": t.gate.pending(), "maps": len(eng._shm._maps) if eng._shm else 0,
            "partials": len(eng._partial), "imm": len(eng._imm_counts),
            "inbox": eng._inbox_bytes, "gone": len(t._gone)}


def main() -> None:
    opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    nofile = opts.pop("nofile", None)
    eng = tf.Engine(sys.argv[1], name="attacker", **opts)
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    regions: list = []
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "write":
                data = bytes.fromhex(cmd["data"]) * cmd.get("repeat", 1)
                eng.write(data, _desc(cmd), dst_offset=cmd.get("offset", 0)).wait(10)
                out: dict = {"ok": True}
            elif op == "read":
                buf = bytearray(cmd["n"])
                eng.read(_desc(cmd), buf).wait(10)
                out = {"ok": True, "data": buf.hex()}
            elif op == "maps":
                out = {"ok": True, "maps": len(eng._shm._maps) if eng._shm else 0}
            elif op == "grab":
                out = {"ok": True, **_grab(eng, cmd)}
            elif op in ("alloc", "register"):
                acc = tf.Access(cmd.get("access", 3))
                r = (eng.alloc(cmd["n"], acc) if op == "alloc"
                     else eng.register(bytearray(cmd["n"]), acc))
                regions.append(r)
                out = {"ok": True, "desc": r.descriptor().to_bytes().hex()}
            elif op == "head":
                out = {"ok": True, "data": bytes(regions[cmd["i"]].array[:cmd["n"]]).hex()}
            elif op == "address":
                out = {"ok": True, "address": eng.address.hex()}
            elif op == "stats":
                out = {"ok": True, **_stats(eng)}
            elif op == "quit":
                break
            else:
                out = {"ok": False, "error": "unknown"}
        except tf.TensorFabricError as exc:
            out = {"ok": False, "error": type(exc).__name__, "msg": str(exc)}
        print(json.dumps(out), flush=True)
    eng.close()


if __name__ == "__main__":
    main()
