"""The ``tensorfabric bench`` sweep: two engines, every op, every size, baselines in the same run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorfabric import TensorFabricError

from ._baselines import RawSocketPeer, child_env, on_cpus, pin_cpus
from ._engine import engine_from_options
from ._peer import ADDRESS_LINE, CTRL_TAG, DATA_TAG, REPLY_TAG, new_buffer, proc_memory, reset_peak
from ._stats import KiB, MiB, Row, Timing, human_size, window_for

ALL_OPS = ("write", "pages", "read", "imm", "sendrecv")
DEFAULT_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)
QUICK_SIZES = (4 * KiB, 1 * MiB, 64 * MiB)
DEFAULT_PAGE_SIZES = (1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB)
DEFAULT_MSG_SIZES = (64, 4 * KiB, 64 * KiB, 1 * MiB)
IMM_PING, IMM_PONG = 0x7B10, 0x7B11

Progress = Callable[[str], None]


@dataclass
class BenchConfig:
    """What to sweep. ``link_addrs`` are this side's local link addresses (one per NIC);
    ``peer_link_addrs`` the spawned peer's; ``connect`` a remote peer's address (hex) instead
    of spawning one."""

    transports: tuple[str, ...] = ("tcp", "shm")
    ops: tuple[str, ...] = ALL_OPS
    links: int = 1
    link_addrs: list[str] = field(default_factory=list)
    peer_link_addrs: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    page_sizes: tuple[int, ...] = DEFAULT_PAGE_SIZES
    pages_bytes: int = 16 * MiB
    msg_sizes: tuple[int, ...] = DEFAULT_MSG_SIZES
    budget_s: float = 0.25
    host: str = "127.0.0.1"
    connect: str | None = None
    baselines: bool = True
    timeout: float = 60.0
    chunk_bytes: int | None = None  #: the engines' tcp chunk (default: the engine's own)
    pin: str | None = None  #: ``same`` / ``split``: CPU placement of this process and the peers

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        kw.setdefault("sizes", QUICK_SIZES)
        kw.setdefault("page_sizes", (4 * KiB, 16 * KiB))
        kw.setdefault("msg_sizes", (64, 64 * KiB))
        kw.setdefault("budget_s", 0.1)
        return cls(**kw)

    def steps(self) -> int:
        """Number of progress steps :func:`run_bench` reports."""
        per = {"write": len(self.sizes), "pages": len(self.page_sizes), "read": len(self.sizes),
               "imm": 1, "sendrecv": len(self.msg_sizes)}
        return len(self.transports) * (1 + sum(per[o] for o in self.ops))


@dataclass
class BenchReport:
    rows: list[Row] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [r.to_dict() for r in self.rows],
                "memory": self.memory, "skipped": self.skipped}


def machine_meta() -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__, "argv": sys.argv,
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


class PeerProcess:
    """The peer engine in a child process (``python -m tensorfabric.bench._peer``)."""

    def __init__(self, transport: str, cfg: BenchConfig, cpus: set[int] | None = None) -> None:
        argv = [sys.executable, "-c", "from tensorfabric.bench._peer import main; main()", "--host", cfg.host,
                "--transport", transport, "--links", str(cfg.links),
                "--link-addrs", ",".join(cfg.peer_link_addrs), "--idle-timeout", "300",
                "--chunk-bytes", str(cfg.chunk_bytes or 0)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env(),
                                     preexec_fn=on_cpus(cpus))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != ADDRESS_LINE:
            self.proc.kill()
            raise RuntimeError(f"bench peer failed to start (exit {self.proc.wait()})")
        self.address = bytes.fromhex(line[1])

    def close(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Session:
    """A local engine driving one peer engine over one transport."""

    def __init__(self, engine: Any, peer: bytes, cfg: BenchConfig, transport: str) -> None:
        self.eng, self.peer, self.cfg, self.transport = engine, peer, cfg, transport

    def ctrl(self, cmd: str, wait: bool = True, **args: Any) -> dict[str, Any]:
        sent = self.eng.send(self.peer, json.dumps({"cmd": cmd, **args}).encode(), tag=CTRL_TAG)
        if cmd == "quit":
            # The peer's reply proves it got the message; its acknowledgement of the message
            # itself may be cut off by the peer exiting right after replying.
            out = self.reply()
            sent.cancel()
            return out
        sent.wait(self.cfg.timeout)
        return self.reply() if wait else {}

    def reply(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.eng.recv(tag=REPLY_TAG, timeout=self.cfg.timeout).data)
        if "error" in out:
            raise RuntimeError(f"bench peer: {out['error']}")
        return out

    def remote_region(self, nbytes: int) -> tuple[int, Any]:
        import tensorfabric as tf

        out = self.ctrl("region", nbytes=nbytes, alloc=self.transport == "shm")
        return out["id"], tf.RegionDescriptor.from_bytes(bytes.fromhex(out["desc"]))


def alternate(fn_a: Callable[[], Any], fn_b: Callable[[], Any] | None, budget: float,
              min_reps: int = 3, max_reps: int = 5000) -> tuple[list[float], list[float]]:
    """Time ``fn_a`` and ``fn_b`` in alternation (one call each per round) for ``budget``
    seconds, after one warm-up call each: both see the same machine load, so their ratio holds
    on a noisy machine even when the absolute figures drift."""
    fns = [f for f in (fn_a, fn_b) if f is not None]
    for f in fns:
        f()
    out: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(out[0]) < max_reps:
        for f, times in zip(fns, out):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        if len(out[0]) >= min_reps and time.perf_counter() - start >= budget:
            break
    return out[0], (out[1] if len(out) > 1 else [])


@dataclass
class Pair:
    """How to run one point: the engine op and its baseline, one at a time and in batches."""

    one: Callable[[], Any]
    base_one: Callable[[], Any] | None
    window: int = 1
    batch: Callable[[], Any] | None = None
    base_batch: Callable[[], Any] | None = None

    def measure(self, budget: float, min_reps: int = 3) -> tuple[Timing, Timing | None]:
        lat, blat = alternate(self.one, self.base_one, budget, min_reps)
        if self.window > 1 and self.batch is not None:
            bt, bbt = alternate(self.batch, self.base_batch, budget, min_reps, 2000)
        else:
            bt, bbt = lat, blat
        window = self.window if self.batch is not None else 1
        base = Timing(blat, window, bbt) if blat else None
        return Timing(lat, window, bt), base


def _engine_pair(start: Callable[[int], Any], size: int, capacity: int,
                 window: int | None = None) -> Pair:
    """``start(offset)`` issues one op and returns its Transfer."""
    window = window_for(size) if window is None else window
    slots = max(1, capacity // max(1, size))

    def one() -> None:
        start(0).wait(60)

    def batch() -> None:
        ts = [start((i % slots) * size) for i in range(window)]
        for tr in ts:
            tr.wait(60)

    return Pair(one, None, window, batch if window > 1 else None)


def _row(op: str, transport: str, links: int, size: int, t: Timing, base: Timing | None,
         base_name: str, *, bandwidth: bool = True, **extra: Any) -> Row:
    gbps = size / t.per_op / 1e9 if bandwidth else None
    row = Row(op, transport, links, size, gbps, 1 / t.per_op, t.p50 * 1e6, t.p99 * 1e6,
              baseline=base_name, extra=extra)
    if base is not None:
        if bandwidth:
            row.baseline_value = size / base.per_op / 1e9
            row.ratio = _paired_ratio(base.batch_times, t.batch_times)
            if row.ratio is None:
                row.ratio = gbps / row.baseline_value if gbps else None
        else:  # latency-bound: ratio > 1 means faster than the baseline
            row.baseline_value = base.p50 * 1e6
            row.ratio = _paired_ratio(base.latencies, t.latencies) or base.p50 / t.p50
    return row


def _paired_ratio(base: list[float], eng: list[float]) -> float | None:
    """Median of per-round ratios base_i / engine_i, when the two were measured in
    alternation (same length): each pair saw the same machine load, so on a shared machine
    this is steadier than the ratio of the two medians."""
    if len(base) != len(eng) or not base:
        return None
    return statistics.median(b / e for b, e in zip(base, eng))


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Run the sweep for every transport in ``cfg``; returns the rows and memory figures."""
    report = BenchReport(meta={**machine_meta(), "config": {
        k: v for k, v in cfg.__dict__.items() if k != "connect"}})
    step = progress or (lambda _d: None)
    placed = pin_cpus(cfg.pin)
    before = os.sched_getaffinity(0) if placed else None
    if placed:  # this thread, and the engine threads it starts from now on
        os.sched_setaffinity(0, placed[0])
    try:
        for transport in cfg.transports:
            if transport == "nixl":
                _run_nixl(cfg, report, step)
                continue
            try:
                _check_transport(transport)
            except (ImportError, TensorFabricError) as exc:
                report.skipped[transport] = str(exc)
                step(f"{transport}: skipped")
                continue
            _run_transport(cfg, transport, report, step, placed[1] if placed else None)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return report


def _run_nixl(cfg: BenchConfig, report: BenchReport, step: Progress) -> None:
    """The nixl transport against raw NIXL (UCX shm and tcp), alternated in the same two
    processes by the nixl transport's own benchmark (``transports._nixl_bench.compare``)."""
    try:
        _check_transport("nixl")
        from tensorfabric.transports._nixl_bench import compare
    except (ImportError, TensorFabricError) as exc:
        report.skipped["nixl"] = str(exc)
        step("nixl: skipped")
        return
    ops = tuple(o for o in cfg.ops if o in ("write", "read")) or ("write",)
    for r in compare(list(cfg.sizes), ops=ops, rounds=2):
        per_op = r["size"] / (r["wrapper_gbps"] * 1e9)
        report.rows.append(Row(
            r["op"], f"nixl/{r['tls']}", 1, r["size"], r["wrapper_gbps"], 1 / per_op,
            per_op * 1e6, float("nan"), baseline="raw NIXL", baseline_value=r["raw_gbps"],
            ratio=r.get("ratio"), extra={k: r[k] for k in ("ratio_min", "ratio_max") if k in r}))
    step("nixl: compared with raw NIXL")


def _check_transport(transport: str) -> None:
    """Raise (ImportError or ConfigError) when this build cannot run ``transport``."""
    engine_from_options(transport=transport, name="bench-probe").close()


def _run_transport(cfg: BenchConfig, transport: str, report: BenchReport, step: Progress,
                   peer_cpus: set[int] | None = None) -> None:
    peer_proc = None if cfg.connect else PeerProcess(transport, cfg, peer_cpus)
    peer_addr = bytes.fromhex(cfg.connect) if cfg.connect else peer_proc.address  # type: ignore[union-attr]
    eng = engine_from_options(host=cfg.host, transport=transport, links=cfg.links,
                              link_addrs=cfg.link_addrs, name="bench", timeout=cfg.timeout,
                              chunk_bytes=cfg.chunk_bytes)
    raw = None
    try:
        s = Session(eng, peer_addr, cfg, transport)
        cap = max([*cfg.sizes, cfg.pages_bytes, *cfg.msg_sizes])
        rid, desc = s.remote_region(cap)
        src = eng.register(new_buffer(cap))
        dst = eng.register(new_buffer(cap))
        if cfg.baselines and transport != "shm":
            raw = _raw_peer(s, cfg, cap, peer_cpus)
        elif cfg.baselines:
            raw = _raw_peer(s, cfg, max(cfg.msg_sizes), peer_cpus)
        step(f"{transport}: engines up")
        ctx = _OpContext(s, src, dst, desc, cap, raw, report)
        for op in cfg.ops:
            getattr(ctx, f"op_{op}")(step)
        s.ctrl("free", id=rid)
    finally:
        if raw is not None:
            raw.close()
        if peer_proc is not None:
            try:
                s.ctrl("quit")
            except Exception:
                pass
            peer_proc.close()
        eng.close()


def _raw_peer(s: Session, cfg: BenchConfig, cap: int, cpus: set[int] | None = None) -> RawSocketPeer:
    chunk = _engine_chunk(s.eng)
    if cfg.connect is None and not cfg.peer_link_addrs:
        return RawSocketPeer(streams=cfg.links, bufsize=cap, chunk=chunk, host=cfg.host,
                             bind=cfg.link_addrs or None, cpus=cpus)
    hosts = cfg.peer_link_addrs or [h for h, _p in _endpoints(s.peer)]
    port = s.ctrl("raw", host="0.0.0.0" if len(hosts) > 1 else hosts[0], streams=cfg.links,
                  bufsize=cap, chunk=chunk)["port"]
    return RawSocketPeer(streams=cfg.links, bufsize=cap, chunk=chunk, host=hosts, port=port,
                         bind=cfg.link_addrs or None)


def _endpoints(address: bytes) -> list[tuple[str, int]]:
    from tensorfabric._address import EngineAddress

    return list(EngineAddress.from_bytes(address).endpoints)


def _engine_chunk(eng: Any) -> int:
    """The tcp transport's chunk size (bytes per frame), so the raw baseline chunks the same."""
    value = getattr(getattr(eng, "_tcp", None), "chunk_bytes", None)
    if isinstance(value, int) and value > 0:
        return value
    from tensorfabric._ops import DEFAULT_CHUNK

    return int(DEFAULT_CHUNK)


class _OpContext:
    """One method per op; each appends rows to the report."""

    def __init__(self, s: Session, src: Any, dst: Any, desc: Any, cap: int,
                 raw: RawSocketPeer | None, report: BenchReport) -> None:
        self.s, self.src, self.dst, self.desc, self.cap = s, src, dst, desc, cap
        self.raw, self.report = raw, report
        self.t, self.links = s.transport, s.cfg.links
        self.write_rows: dict[int, Row] = {}

    @property
    def budget(self) -> float:
        return self.s.cfg.budget_s

    def _with_base(self, kind: str, size: int, pair: Pair) -> str:
        """Attach the baseline for ``kind`` at ``size`` to ``pair``; returns its name."""
        w = pair.window
        if kind in ("write", "read") and self.t == "shm":
            d, src = self.dst.array, self.src.array
            slots = max(1, self.cap // size)

            def copy(off: int = 0) -> None:
                np.copyto(d[off:off + size], src[off:off + size])

            def copies() -> None:
                for i in range(w):
                    copy((i % slots) * size)

            pair.base_one = copy
            pair.base_batch = copies
            return "memcpy"
        raw = self.raw
        if raw is None:
            return ""
        if kind == "write":
            pair.base_one = lambda: raw.write(size)
            pair.base_batch = lambda: raw.write(size, w)
            return "raw socket"
        if kind == "read":
            def reads() -> None:
                for _ in range(w):
                    raw.read(size)

            pair.base_one = lambda: raw.read(size)
            pair.base_batch = reads
            return "raw socket"
        pair.base_one = lambda: raw.echo(size)
        return "raw ping-pong"

    def _point(self, kind: str, size: int, pair: Pair, *, bandwidth: bool = True,
               op: str | None = None, min_reps: int = 3) -> Row:
        name = self._with_base(kind, size, pair) if self.s.cfg.baselines else ""
        t, base = pair.measure(self.budget, min_reps)
        row = _row(op or kind, self.t, self.links, size, t, base, name, bandwidth=bandwidth)
        self.report.rows.append(row)
        return row

    def op_write(self, step: Progress) -> None:
        eng, src, desc = self.s.eng, self.src, self.desc
        for size in self.s.cfg.sizes:
            mem0 = self.s.ctrl("memory", reset=True) if self.t == "tcp" else None
            reset_peak()
            local0 = proc_memory()
            def start(off: int, n: int = size) -> Any:
                return eng.write(src, desc, src_offset=off, dst_offset=off, nbytes=n)

            row = self._point("write", size, _engine_pair(start, size, self.cap))
            self.write_rows[size] = row
            if mem0 is not None:
                mem1, local1 = self.s.ctrl("memory"), proc_memory()
                self.report.memory.append({
                    "transport": self.t, "op": "write", "size": size,
                    "peer_peak_growth": mem1.get("VmHWM", 0) - mem0.get("VmRSS", 0),
                    "local_peak_growth": local1.get("VmHWM", 0) - local0.get("VmRSS", 0)})
            step(f"{self.t} write {human_size(size)}")

    def op_read(self, step: Progress) -> None:
        eng, dst, desc = self.s.eng, self.dst, self.desc
        for size in self.s.cfg.sizes:
            def start(off: int, n: int = size) -> Any:
                return eng.read(desc, dst, src_offset=off, dst_offset=off, nbytes=n)

            self._point("read", size, _engine_pair(start, size, self.cap))
            step(f"{self.t} read {human_size(size)}")

    def op_pages(self, step: Progress) -> None:
        """Paged writes of ``pages_bytes`` in total, against one write of the same bytes
        (alternated, so the ratio is the paging cost alone), and against the raw baseline."""
        eng, src, desc, total = self.s.eng, self.src, self.desc, self.s.cfg.pages_bytes
        rng = np.random.default_rng(0)
        for page in self.s.cfg.page_sizes:
            n = total // page
            sp, dp = rng.permutation(n), rng.permutation(n)
            def paged_op(sp: np.ndarray = sp, dp: np.ndarray = dp, page: int = page) -> None:
                eng.write_pages(src, desc, src_pages=sp, dst_pages=dp, page_size=page).wait(60)

            paged = Pair(paged_op, lambda: eng.write(src, desc, nbytes=total).wait(60))
            t, single = paged.measure(self.budget)
            row = _row("pages", self.t, self.links, total, t, single, "engine write")
            row.page_size = page
            row.extra["pages"] = n
            self.report.rows.append(row)
            step(f"{self.t} pages {human_size(page)}")

    def op_imm(self, step: Progress) -> None:
        """An immediate-only op's round trip (sent, counted by the peer, acknowledged) against
        a raw socket ping-pong; then an application-level ping-pong of immediates."""
        eng, peer = self.s.eng, self.s.peer
        pair = Pair(lambda: eng.barrier([peer], IMM_PING + 2).wait(30), None)
        self._point("imm", 8, pair, bandwidth=False, min_reps=200)
        n = max(50, int(self.budget / 300e-6))
        self.s.ctrl("imm_pong", wait=False, n=n + 1, imm_in=IMM_PING, imm_out=IMM_PONG)
        lat = []
        for i in range(n + 1):
            t0 = time.perf_counter()
            w = eng.expect(IMM_PONG, 1, timeout=30)
            eng.barrier([peer], IMM_PING).wait(30)
            w.wait(30)
            if i:
                lat.append(time.perf_counter() - t0)
        self.s.reply()
        t = Timing(lat, 1, lat)
        self.report.rows.append(_row("imm-echo", self.t, self.links, 8, t, None, "",
                                     bandwidth=False))
        step(f"{self.t} imm")

    def op_sendrecv(self, step: Progress) -> None:
        """Round trips of a message echoed by the peer (send, peer recv + send, recv), each
        followed by one raw ping-pong of the same size (alternated, like the immediate's: each
        pair saw the same load and the same cold caches)."""
        eng, peer = self.s.eng, self.s.peer
        raw = self.raw if self.s.cfg.baselines else None
        for size in self.s.cfg.msg_sizes:
            data = bytes(size)
            n = max(20, min(2000, int(self.budget / (300e-6 + size / 0.5e9))))
            self.s.ctrl("echo", wait=False, n=n + 1)
            lat: list[float] = []
            blat: list[float] = []
            for i in range(n + 1):
                t0 = time.perf_counter()
                eng.send(peer, data, tag=DATA_TAG).wait(30)
                eng.recv(tag=DATA_TAG, timeout=30)
                if i:
                    lat.append(time.perf_counter() - t0)
                    if raw is not None:
                        blat.extend(raw.echo(size))
            self.s.reply()
            base = Timing(blat, 1, blat) if blat else None
            name = "raw ping-pong" if blat else ""
            row = _row("sendrecv", self.t, self.links, size, Timing(lat, 1, lat), base, name,
                       bandwidth=False)
            row.gbps = 2 * size / (row.p50_us / 1e6) / 1e9
            self.report.rows.append(row)
            step(f"{self.t} sendrecv {human_size(size)}")


__all__ = ["BenchConfig", "BenchReport", "run_bench"]
