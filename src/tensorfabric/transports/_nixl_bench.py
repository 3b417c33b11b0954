"""Benchmark: the nixl transport against raw NIXL, DRAM to DRAM, in the same run.

Both sides run as two fresh processes (a target that owns a registered buffer and an
initiator), one op in flight, back to back, on the same sizes and UCX settings:

* **raw**: one NIXL agent per process, metadata over a pipe, one prepared transfer handle
  reused per size, each write carrying a notification (NIXL's fastest path).
* **wrapper**: two :class:`~tensorfabric.Engine` objects with ``transports=("nixl", "tcp")``;
  ``write(..., imm=1)`` / ``read(...)`` from and into registered regions, each waited for.

Called by ``tensorfabric bench --transport nixl`` (:func:`compare`) and by
``bench/nixl_raw.py`` / ``bench/nixl_compare.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable

import numpy as np

from ._nixl import TLS_PRESETS, load_nixl

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def ucx_env(tls: str, net_devices: str | None = "lo") -> dict[str, str]:
    env = {"UCX_TLS": TLS_PRESETS.get(tls, tls)}
    if tls in TLS_PRESETS:
        env["UCX_MODULES"] = "^ib,rdmacm"  # see NixlTransport: avoids a crash at exit
    if net_devices:
        env["UCX_NET_DEVICES"] = net_devices  # else UCX routes loopback via the external address
    return env


def iters_for(size: int, budget: int = 256 * MiB, least: int = 3) -> int:
    """Back-to-back ops per size: about ``budget`` bytes, ``least``..2000 ops."""
    return max(least, min(2000, budget // size))


def default_sizes(max_size: int = 256 * MiB, min_size: int = 4 * KiB) -> list[int]:
    sizes, s = [], min_size
    while s <= max_size:
        sizes.append(s)
        s *= 4
    return sizes


def _spin(check: Callable[[], str]) -> str:
    state = "PROC"
    while state == "PROC":
        os.sched_yield()  # 2 cores shared with the peer process
        state = check()
    return state


# -- raw NIXL ---------------------------------------------------------------------------------

def _raw_agent(name: str, env: dict[str, str]) -> Any:
    os.environ.update(env)
    api = load_nixl()
    return api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False,
                                                      backends=["UCX"]))


def _raw_target(conn: Any, env: dict[str, str], nbytes: int) -> None:
    agent = _raw_agent(f"raw-target-{os.getpid()}", env)
    buf = np.full(nbytes, 7, np.uint8)  # pre-faulted
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    notifs, spins = 0, 0
    while True:  # progress the worker: UCX over tcp needs the target to poll
        new = agent.get_new_notifs()
        notifs += sum(len(m) for m in new.values())
        spins += 1
        if spins % 256 or not conn.poll():  # a pipe poll is a syscall: only now and then
            if not new:
                os.sched_yield()
            continue
        cmd, arg = conn.recv()
        if cmd == "notifs":
            deadline = time.monotonic() + 60
            while notifs < arg and time.monotonic() < deadline:
                notifs += sum(len(m) for m in agent.get_new_notifs().values())
            conn.send(notifs)
        elif cmd == "sample":
            conn.send(buf[:arg:4096].copy())
        elif cmd == "stop":
            conn.send(True)
            return


def _raw_initiator(out: Any, tconn: Any, env: dict[str, str], sizes: list[int],
                   ops: list[str]) -> None:
    if not tconn.poll(120):
        raise TimeoutError("raw NIXL target did not start in 120 s")
    md, raddr = tconn.recv()
    agent = _raw_agent(f"raw-init-{os.getpid()}", env)
    top = max(sizes)
    src = (np.arange(top, dtype=np.uint64) % 251).astype(np.uint8)
    dst = np.ones(top, np.uint8)
    agent.register_memory([(src.ctypes.data, top, 0, ""), (dst.ctypes.data, top, 0, "")], "DRAM")
    remote = agent.add_remote_agent(md)
    rows, sent = [], 0
    for op in ops:
        local = src if op == "write" else dst
        for size in sizes:
            ld = agent.get_xfer_descs([(local.ctypes.data, size, 0)], "DRAM")
            rd = agent.get_xfer_descs([(raddr, size, 0)], "DRAM")
            h = agent.initialize_xfer(op.upper(), ld, rd, remote, b"n" if op == "write" else b"")
            n = iters_for(size)
            for rep in range(n + 1):  # the first op warms up connection and caches
                if rep == 1:
                    t0 = time.perf_counter()
                state = agent.transfer(h)
                if state == "PROC":
                    state = _spin(lambda: agent.check_xfer_state(h))
                if state != "DONE":
                    raise RuntimeError(f"raw NIXL {op} of {size} bytes failed: {state}")
            dt = time.perf_counter() - t0
            h.release()
            sent += (n + 1) if op == "write" else 0
            rows.append({"impl": "raw", "op": op, "size": size, "iters": n, "seconds": dt})
        if op == "write":
            tconn.send(("notifs", sent))
            got = tconn.recv()
            tconn.send(("sample", top))
            if got != sent or not np.array_equal(tconn.recv(), src[::4096]):
                raise RuntimeError(f"raw write check failed ({got}/{sent} notifications)")
        else:
            tconn.send(("sample", top))
            if not np.array_equal(tconn.recv(), dst[::4096]):
                raise RuntimeError("raw read check failed")
    tconn.send(("stop", None))
    tconn.recv()
    out.send(rows)


# -- the wrapper ------------------------------------------------------------------------------

def _engine(name: str, tls: str, net_devices: str | None, **extra: Any) -> Any:
    from .._engine import Engine

    return Engine("nixl-bench", transports=("nixl", "tcp"), name=name,
                  nixl={"tls": tls, "net_devices": net_devices, **extra}, timeout=300)


def _wrap_target(conn: Any, tls: str, net_devices: str | None, nbytes: int) -> None:
    with _engine("target", tls, net_devices) as eng:
        buf = np.full(nbytes, 7, np.uint8)
        region = eng.register(buf)
        conn.send(region.descriptor().to_bytes())
        while True:
            cmd, arg = conn.recv()
            if cmd == "expect":
                eng.expect(1, arg, timeout=60).wait()
                conn.send(True)
            elif cmd == "sample":
                conn.send(buf[:arg:4096].copy())
            elif cmd == "stop":
                conn.send(True)
                return


def _wrap_initiator(out: Any, tconn: Any, tls: str, net_devices: str | None, sizes: list[int],
                    ops: list[str]) -> None:
    from .._region import RegionDescriptor

    if not tconn.poll(120):
        raise TimeoutError("wrapper target did not start in 120 s")
    desc = RegionDescriptor.from_bytes(tconn.recv())
    top = max(sizes)
    with _engine("initiator", tls, net_devices) as eng:
        if eng._transport_for(eng._peer(desc.owner), desc).name != "nixl":
            raise RuntimeError("the wrapper benchmark would not go through nixl")
        src = eng.register((np.arange(top, dtype=np.uint64) % 251).astype(np.uint8))
        dst = eng.register(np.ones(top, np.uint8))
        rows, sent = [], 0
        for op in ops:
            for size in sizes:
                n = iters_for(size)
                for rep in range(n + 1):
                    if rep == 1:
                        t0 = time.perf_counter()
                    if op == "write":
                        eng.write(src, desc, nbytes=size, imm=1).wait()
                    else:
                        eng.read(desc, dst, nbytes=size).wait()
                dt = time.perf_counter() - t0
                sent += (n + 1) if op == "write" else 0
                rows.append({"impl": "wrapper", "op": op, "size": size, "iters": n,
                             "seconds": dt})
            if op == "write":
                tconn.send(("expect", sent))
                tconn.recv()
                tconn.send(("sample", top))
                if not np.array_equal(tconn.recv(), src.array[::4096]):
                    raise RuntimeError("wrapper write check failed")
            else:
                tconn.send(("sample", top))
                if not np.array_equal(tconn.recv(), dst.array[::4096]):
                    raise RuntimeError("wrapper read check failed")
        tconn.send(("stop", None))
        tconn.recv()
    out.send(rows)


# -- running ----------------------------------------------------------------------------------

def _run_pair(target: Callable[..., None], targs: tuple[Any, ...],
              initiator: Callable[..., None], iargs: tuple[Any, ...], label: str,
              timeout: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    t_parent, t_child = ctx.Pipe()
    r_parent, r_child = ctx.Pipe()
    procs = [ctx.Process(target=target, args=(t_child, *targs), daemon=True),
             ctx.Process(target=initiator, args=(r_child, t_parent, *iargs), daemon=True)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + timeout
        while not r_parent.poll(0.2):
            if not all(p.is_alive() for p in procs):
                raise RuntimeError(f"{label} benchmark: a child process died "
                                   f"(exit codes {[p.exitcode for p in procs]})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label} benchmark did not finish in {timeout:.0f} s")
        rows: list[dict[str, Any]] = r_parent.recv()
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return rows


def run_raw(sizes: list[int], *, tls: str = "shm", ops: tuple[str, ...] = ("write", "read"),
            net_devices: str | None = "lo", timeout: float = 600.0) -> list[dict[str, Any]]:
    """Raw NIXL in two fresh processes; one row per (op, size): impl, op, size, iters,
    seconds, gbps, tls."""
    env = ucx_env(tls, net_devices)
    rows = _run_pair(_raw_target, (env, max(sizes)), _raw_initiator, (env, sizes, list(ops)),
                     f"raw NIXL ({tls})", timeout)
    return _finish_rows(rows, tls)


def run_wrapper(sizes: list[int], *, tls: str = "shm", ops: tuple[str, ...] = ("write", "read"),
                net_devices: str | None = "lo", timeout: float = 600.0) -> list[dict[str, Any]]:
    """The nixl transport (two engines in two processes); rows as :func:`run_raw`."""
    rows = _run_pair(_wrap_target, (tls, net_devices, max(sizes)), _wrap_initiator,
                     (tls, net_devices, sizes, list(ops)), f"nixl wrapper ({tls})", timeout)
    return _finish_rows(rows, tls)


def _finish_rows(rows: list[dict[str, Any]], tls: str) -> list[dict[str, Any]]:
    for r in rows:
        r["tls"] = tls
        r["gbps"] = r["size"] * r["iters"] / r["seconds"] / 1e9
    return rows


# -- raw and wrapper alternated in one pair of processes ---------------------------------------

def _alt_target(conn: Any, tls: str, net_devices: str | None, nbytes: int,
                opts: dict[str, Any]) -> None:
    env = ucx_env(tls, net_devices)
    agent = _raw_agent(f"raw-target-{os.getpid()}", env)
    raw = np.full(nbytes, 7, np.uint8)
    agent.register_memory([(raw.ctypes.data, nbytes, 0, "")], "DRAM")
    with _engine("target", tls, net_devices, **opts) as eng:
        region = eng.register(raw)  # the same memory: placement (huge pages...) cannot differ
        conn.send((agent.get_agent_metadata(), raw.ctypes.data, region.descriptor().to_bytes()))
        mode, spins = "wrapper", 0
        while True:
            if mode == "raw":  # only the raw agent needs this thread to poll it
                new = agent.get_new_notifs()
                spins += 1
                if spins % 256 or not conn.poll():
                    if not new:
                        os.sched_yield()
                    continue
            cmd, arg = conn.recv()
            if cmd == "mode":
                mode = arg
                conn.send(True)
            elif cmd == "stop":
                conn.send(True)
                return


def _alt_initiator(out: Any, tconn: Any, tls: str, net_devices: str | None, sizes: list[int],
                   ops: list[str], rounds: int, opts: dict[str, Any]) -> None:
    from .._region import RegionDescriptor

    if not tconn.poll(120):
        raise TimeoutError("benchmark target did not start in 120 s")
    md, raddr, desc_bytes = tconn.recv()
    desc = RegionDescriptor.from_bytes(desc_bytes)
    top = max(sizes)
    agent = _raw_agent(f"raw-init-{os.getpid()}", ucx_env(tls, net_devices))
    rsrc = (np.arange(top, dtype=np.uint64) % 251).astype(np.uint8)
    rdst = np.ones(top, np.uint8)
    agent.register_memory([(rsrc.ctypes.data, top, 0, ""), (rdst.ctypes.data, top, 0, "")], "DRAM")
    remote = agent.add_remote_agent(md)

    def mode(m: str) -> None:
        tconn.send(("mode", m))
        tconn.recv()

    rows = []
    with _engine("initiator", tls, net_devices, **opts) as eng:
        if eng._transport_for(eng._peer(desc.owner), desc).name != "nixl":
            raise RuntimeError("the wrapper benchmark would not go through nixl")
        src = eng.register(rsrc)  # the raw agent's buffers (see _alt_target)
        dst = eng.register(rdst)
        for op in ops:
            for size in sizes:
                # >= 8 ops a batch: with 3, one stall of a neighbour's process swung a
                # round's ratio from 0.3 to 3 at 64 MiB and up
                n = iters_for(size, 64 * MiB, least=8)
                ld = agent.get_xfer_descs([((rsrc if op == "write" else rdst).ctypes.data,
                                            size, 0)], "DRAM")
                rd = agent.get_xfer_descs([(raddr, size, 0)], "DRAM")
                h = agent.initialize_xfer(op.upper(), ld, rd, remote,
                                          b"n" if op == "write" else b"")

                def raw_op() -> None:
                    state = agent.transfer(h)
                    if state == "PROC":
                        state = _spin(lambda: agent.check_xfer_state(h))
                    if state != "DONE":
                        raise RuntimeError(f"raw NIXL {op} of {size} bytes failed: {state}")

                def wrap_op() -> None:
                    if op == "write":
                        eng.write(src, desc, nbytes=size, imm=1).wait()
                    else:
                        eng.read(desc, dst, nbytes=size).wait()

                times: dict[str, list[float]] = {"raw": [], "wrapper": []}
                for r in range(rounds):
                    order = (("raw", raw_op), ("wrapper", wrap_op))
                    for impl, fn in (order if r % 2 == 0 else order[::-1]):
                        mode(impl)
                        fn()  # warm-up
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn()
                        times[impl].append((time.perf_counter() - t0) / n)
                h.release()
                ratios = sorted(a / b for a, b in zip(times["raw"], times["wrapper"]))
                rows.append({"op": op, "size": size, "iters": n, "rounds": rounds,
                             "raw_gbps": size / float(np.median(times["raw"])) / 1e9,
                             "wrapper_gbps": size / float(np.median(times["wrapper"])) / 1e9,
                             "ratio": float(np.median(ratios)),
                             "ratio_min": ratios[0], "ratio_max": ratios[-1]})
        mode("wrapper")
        tconn.send(("stop", None))
        tconn.recv()
    out.send(rows)


def compare(sizes: list[int] | None = None, *, tls: tuple[str, ...] = ("shm", "tcp"),
            ops: tuple[str, ...] = ("write", "read"), net_devices: str | None = "lo",
            rounds: int = 5, timeout: float = 1200.0, nixl: dict[str, Any] | None = None,
            progress: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
    """Raw NIXL and the nixl transport in the same two processes, alternated batch by batch
    ``rounds`` times per size (the order flips every round), so noise hits both alike.

    Both move the same buffers at both ends. One row per (tls, op, size): ``raw_gbps`` and
    ``wrapper_gbps`` (medians), ``ratio`` (the
    median of the per-round wrapper/raw throughput ratios) and its ``ratio_min``/``ratio_max``.
    A batch is about 64 MiB of ops, and at least 8 ops. Raw NIXL reposts one prepared handle
    per size (each write carrying a notification);
    the wrapper runs ``Engine.write(..., imm=1)`` / ``Engine.read`` from registered regions,
    each waited for (that includes the owner's acknowledgement unless ``nixl`` holds
    ``{"confirm": False}``; ``nixl`` holds further options for both engines).
    """
    sizes = sizes or default_sizes()
    out = []
    for t in tls:
        if progress:
            progress(f"raw NIXL and nixl transport over UCX {t}")
        opts = dict(nixl or {})
        rows = _run_pair(_alt_target, (t, net_devices, max(sizes), opts), _alt_initiator,
                         (t, net_devices, sizes, list(ops), rounds, opts),
                         f"nixl compare ({t})", timeout)
        for r in rows:
            r["tls"] = t
        out += rows
    return out


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


__all__ = ["compare", "run_raw", "run_wrapper", "default_sizes", "fmt_size", "ucx_env"]
