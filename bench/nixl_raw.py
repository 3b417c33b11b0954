"""Raw NIXL baseline: DRAM -> DRAM write and read between two processes.

Two spawned children, each with one NIXL agent (UCX backend, progress thread off):
a *target* that owns a registered buffer and keeps its UCX worker progressing, and an
*initiator* that writes into it (each write carries a notification, as a write with an
immediate does in tensorfabric) and reads from it. Metadata travels over a pipe. Every
figure is bytes / wall time for back-to-back ops, one in flight, with one prepared
transfer handle reused per size (NIXL's fastest path).

    python bench/nixl_raw.py                      # UCX over shm (cma) and tcp, 4 KiB..1 GiB
    python bench/nixl_raw.py --tls shm --max-size 256MiB --ops write

This is the baseline `tensorfabric bench --transport nixl` compares the wrapper with.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import numpy as np

# UCX_TLS presets. "shm": bulk data over UCX's shared-memory transports (cma for
# registered DRAM); tcp stays in the list because NIXL asks UCX for peer-failure
# detection, which only tcp offers for UCX's control (active) messages here.
TLS_PRESETS = {"shm": "sm,tcp,self", "tcp": "tcp,self"}
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def ucx_env(tls: str, net_devices: str = "lo") -> dict[str, str]:
    """The UCX environment for one preset (or a raw UCX_TLS string)."""
    env = {"UCX_TLS": TLS_PRESETS.get(tls, tls)}
    if net_devices:
        # Without this UCX also routes loopback tcp through the external address.
        env["UCX_NET_DEVICES"] = net_devices
    return env


def import_nixl_api(module: str | None = None) -> Any:
    """Import NIXL's Python API module (nixl_cu13._api, nixl_cu12._api or nixl._api)."""
    import importlib

    names = [module] if module else ["nixl_cu13", "nixl_cu12", "nixl"]
    err: Exception | None = None
    for name in names:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError as exc:
            err = exc
    raise ImportError(
        "NIXL is not installed: pip install --no-deps nixl-cu13==1.5.1 "
        "(or pip install 'tensorfabric[nixl]')"
    ) from err


def _quiet_nixl_logs() -> None:
    import logging

    logging.getLogger("nixl").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("nixl"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _agent(api: Any, name: str, prog_thread: bool) -> Any:
    _quiet_nixl_logs()
    cfg = api.nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"])
    agent = api.nixl_agent(name, cfg)
    _quiet_nixl_logs()
    return agent


def _target(conn: Any, env: dict[str, str], nbytes: int, prog_thread: bool) -> None:
    os.environ.update(env)
    api = import_nixl_api()
    agent = _agent(api, f"raw-target-{os.getpid()}", prog_thread)
    buf = np.zeros(nbytes, np.uint8)
    buf[:] = 7  # pre-fault: page faults would otherwise dominate the first writes
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    notifs = 0
    while True:
        # Progress the worker: UCX over tcp emulates RMA with active messages, so the
        # target must poll for initiator ops (and notifications) to complete.
        new = agent.get_new_notifs()
        for msgs in new.values():
            notifs += len(msgs)
        if not conn.poll():
            if not new:
                os.sched_yield()  # 2 cores shared: let the initiator run
            continue
        cmd, arg = conn.recv()
        if cmd == "notifs":  # wait until `arg` notifications arrived in total
            deadline = time.monotonic() + 60
            while notifs < arg and time.monotonic() < deadline:
                for msgs in agent.get_new_notifs().values():
                    notifs += len(msgs)
            conn.send(notifs)
        elif cmd == "sample":  # every 4096th byte of the first arg bytes
            conn.send(buf[:arg:4096].copy())
        elif cmd == "fill":
            buf[:] = arg
            conn.send(True)
        elif cmd == "stop":
            conn.send(True)
            return


def iters_for(size: int, budget: int = 256 * MiB) -> int:
    """Back-to-back ops per size: about `budget` bytes, 3..2000 ops."""
    return max(3, min(2000, budget // size))


def _initiator(conn: Any, env: dict[str, str], sizes: list[int], ops: list[str],
               prog_thread: bool, tconn: Any) -> None:
    os.environ.update(env)
    api = import_nixl_api()
    if not tconn.poll(120):
        raise TimeoutError("raw NIXL target did not start in 120 s")
    md, raddr = tconn.recv()
    agent = _agent(api, f"raw-init-{os.getpid()}", prog_thread)
    top = max(sizes)
    src = (np.arange(top, dtype=np.uint64) % 251).astype(np.uint8)
    dst = np.zeros(top, np.uint8)
    dst[:] = 1
    agent.register_memory([(src.ctypes.data, top, 0, ""), (dst.ctypes.data, top, 0, "")], "DRAM")
    remote = agent.add_remote_agent(md)
    results = []
    sent_notifs = 0
    for op in ops:
        local = src if op == "write" else dst
        if op == "read":
            tconn.send(("fill", 200))
            tconn.recv()
        for size in sizes:
            ldesc = agent.get_xfer_descs([(local.ctypes.data, size, 0)], "DRAM")
            rdesc = agent.get_xfer_descs([(raddr, size, 0)], "DRAM")
            notif = b"n" if op == "write" else b""
            handle = agent.initialize_xfer(op.upper(), ldesc, rdesc, remote, notif)
            n = iters_for(size)
            for rep in range(n + 1):  # first op is a warm-up (connection, caches)
                if rep == 1:
                    t0 = time.perf_counter()
                state = agent.transfer(handle)
                while state == "PROC":
                    os.sched_yield()
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise RuntimeError(f"NIXL {op} of {size} bytes failed: {state}")
            dt = time.perf_counter() - t0
            handle.release()
            if op == "write":
                sent_notifs += n + 1
            results.append({"op": op, "size": size, "iters": n, "seconds": dt,
                            "gbps": size * n / dt / 1e9})
        if op == "write":
            tconn.send(("notifs", sent_notifs))
            got = tconn.recv()
            tconn.send(("sample", top))
            sample = tconn.recv()
            if got != sent_notifs or not np.array_equal(sample, src[::4096]):
                raise RuntimeError(f"write check failed: {got}/{sent_notifs} notifications")
        else:
            if not (dst[: top] == 200).all():
                raise RuntimeError("read check failed: data differs from the target's buffer")
    tconn.send(("stop", None))
    tconn.recv()
    conn.send(results)


def run_raw(sizes: list[int], *, tls: str = "shm", ops: tuple[str, ...] = ("write", "read"),
            net_devices: str = "lo", prog_thread: bool = False,
            timeout: float = 600.0) -> list[dict[str, Any]]:
    """Measure raw NIXL in two fresh processes; one dict per (op, size) with `gbps`."""
    ctx = mp.get_context("spawn")
    env = ucx_env(tls, net_devices)
    t_parent, t_child = ctx.Pipe()
    r_parent, r_child = ctx.Pipe()
    target = ctx.Process(target=_target, args=(t_child, env, max(sizes), prog_thread), daemon=True)
    init = ctx.Process(target=_initiator,
                       args=(r_child, env, sizes, list(ops), prog_thread, t_parent), daemon=True)
    target.start()
    init.start()
    try:
        deadline = time.monotonic() + timeout
        while not r_parent.poll(0.2):
            if not (init.is_alive() and target.is_alive()):
                raise RuntimeError(f"raw NIXL bench ({tls}): a child process died "
                                   f"(initiator {init.exitcode}, target {target.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw NIXL bench ({tls}) did not finish in {timeout:.0f} s")
        results = r_parent.recv()
    except EOFError:
        raise RuntimeError(f"raw NIXL initiator died (exit code {init.exitcode})") from None
    finally:
        for p in (init, target):
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    for r in results:
        r["tls"] = tls
    return results


def parse_size(text: str) -> int:
    units = {"kib": KiB, "mib": MiB, "gib": GiB, "k": KiB, "m": MiB, "g": GiB, "": 1}
    t = text.strip().lower()
    num = t.rstrip("kmigb")
    return int(float(num) * units[t[len(num):]])


def default_sizes(max_size: int = GiB) -> list[int]:
    sizes, s = [], 4 * KiB
    while s <= max_size:
        sizes.append(s)
        s *= 4
    return sizes


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="append", help="shm, tcp or a raw UCX_TLS value (repeatable)")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--max-size", default="1GiB")
    ap.add_argument("--net-devices", default="lo")
    ap.add_argument("--prog-thread", action="store_true", help="enable NIXL's progress thread")
    args = ap.parse_args(argv)
    sizes = default_sizes(parse_size(args.max_size))
    print(f"# raw NIXL, DRAM->DRAM, 2 processes, python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"{'tls':>6} {'op':>6} {'size':>9} {'iters':>6} {'GB/s':>8}")
    for tls in args.tls or ["shm", "tcp"]:
        for r in run_raw(sizes, tls=tls, ops=tuple(args.ops.split(",")),
                         net_devices=args.net_devices, prog_thread=args.prog_thread):
            print(f"{r['tls']:>6} {r['op']:>6} {fmt_size(r['size']):>9} {r['iters']:>6} "
                  f"{r['gbps']:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
