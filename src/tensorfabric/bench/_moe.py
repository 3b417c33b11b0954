"""``tensorfabric bench --moe`` and ``bench/moe.py``: MoE dispatch/combine latency.

For each point (ranks, tokens, hidden, experts, top-k) ``world`` processes run dispatch and
combine through :class:`tensorfabric.moe.ExpertParallel` (identity experts, bfloat16 tokens),
and in the same processes, alternating every iteration, move the same bytes with
torch.distributed ``all_to_all_single`` on gloo and with a raw-socket all-to-all, then run the
whole layer over gloo (``_moe_gloo.GlooLayer``: the same bookkeeping, gloo as the transport).
A step's latency is the slowest rank's; the table gives p50/p99 and the ratios of the p50s.
Each iteration also runs the layer with the compact dispatch layout (``expand=False``: each
token once per rank, the experts gather their own rows; that gather is not timed, as it is the
experts' work), reported as ``compact``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np



@dataclass(frozen=True)
class MoePoint:
    world: int
    tokens: int
    hidden: int
    experts: int
    topk: int = 8

    @classmethod
    def parse(cls, text: str) -> MoePoint:
        """``EPxTOKENSxHIDDENxEXPERTS[xTOPK]``, e.g. ``4x128x2048x64``."""
        try:
            nums = [int(v) for v in text.lower().split("x")]
            if len(nums) not in (4, 5) or min(nums) < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"MoE point {text!r} is not EPxTOKENSxHIDDENxEXPERTS[xTOPK]") from None
        p = cls(*nums)
        if p.experts % p.world or p.topk > p.experts or p.world < 2:
            raise ValueError(f"MoE point {text!r}: experts must be a multiple of EP >= 2, "
                             "and top-k at most experts")
        return p

    def __str__(self) -> str:
        return f"{self.world}x{self.tokens}x{self.hidden}x{self.experts}x{self.topk}"


QUICK = ("2x128x2048x64", "4x128x2048x64")
FULL = ("2x128x2048x64", "4x128x2048x64", "8x128x2048x64", "2x128x7168x256",
        "4x128x7168x256", "2x4096x2048x64", "2x4096x7168x256")


@dataclass
class MoeConfig:
    points: tuple[MoePoint, ...] = tuple(MoePoint.parse(p) for p in QUICK)
    transports: tuple[str, ...] = ("shm", "tcp")
    iters: int = 20
    warmup: int = 3
    baselines: bool = True
    netns: bool = False  # tcp between network-namespace hosts (needs root)
    rate: str = "10gbit"  # each netns host's NIC rate
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, q)) if xs else float("nan")


def _summarise(point: MoePoint, transport: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"transport": transport, "point": str(point), "ep": point.world,
                           "tokens": point.tokens, "hidden": point.hidden,
                           "experts": point.experts, "topk": point.topk}
    for key in ranks[0]["samples"]:
        per_it = [max(vals) for vals in zip(*(r["samples"][key] for r in ranks))]
        row[f"{key}_p50_us"] = _pct(per_it, 50)
        row[f"{key}_p99_us"] = _pct(per_it, 99)
    for key in ranks[0].get("cpu", {}):  # per step, summed over the ranks
        per_it = [sum(vals) for vals in zip(*(r["cpu"][key] for r in ranks))]
        row[f"{key}_cpu_us"] = _pct(per_it, 50)
    row["parts_p50_us"] = {k: float(np.mean([r["parts_p50_us"][k] for r in ranks]))
                           for k in ranks[0].get("parts_p50_us", {})}
    sent = [b for r in ranks for b in r["sent_bytes"]]
    row["dispatch_bytes_per_rank"] = float(np.mean(sent)) if sent else float("nan")
    for phase in ("dispatch", "combine"):
        e = row[f"engine_{phase}_p50_us"]
        row[f"glayer_over_engine_{phase}"] = row.get(f"glayer_{phase}_p50_us",
                                                     float("nan")) / e
        row[f"gloo_over_engine_{phase}"] = row.get(f"gloo_{phase}_p50_us", float("nan")) / e
        row[f"engine_over_raw_{phase}"] = e / row.get(f"raw_{phase}_p50_us", float("nan"))
        c = row.get(f"compact_{phase}_p50_us", float("nan"))
        row[f"gloo_over_compact_{phase}"] = row.get(f"gloo_{phase}_p50_us", float("nan")) / c
        row[f"compact_over_raw_{phase}"] = c / row.get(f"raw_{phase}_p50_us", float("nan"))
    return row


def _launch(cfg: MoeConfig, point: MoePoint, transport: str, tmp: str,
            hosts: list[str],
            popen: Callable[[int, list[str]], subprocess.Popen[Any]]) -> list[dict[str, Any]]:
    procs = []
    for r in range(point.world):
        args = dict(rank=r, world=point.world, hosts=hosts, dir=tmp, transport=transport,
                    tokens=point.tokens, hidden=point.hidden, experts=point.experts,
                    topk=point.topk, iters=cfg.iters, warmup=cfg.warmup,
                    baselines=cfg.baselines, secret="moe-bench")
        procs.append(popen(r, [sys.executable, "-m", "tensorfabric.bench._moe_worker",
                               json.dumps(args)]))
    deadline = time.monotonic() + 900
    try:  # a rank that fails ends the point: the others would wait for it until their timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"MoE bench ranks exited with {codes} at point {point} ({transport})")
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(point.world)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _runs(cfg: MoeConfig) -> Iterator[tuple[MoePoint, str]]:
    for point in cfg.points:
        for t in cfg.transports:
            yield point, t
        if cfg.netns:
            yield point, "netns-tcp"


def run_moe(cfg: MoeConfig, progress: Callable[[str], None] = lambda _: None,
            on_row: Callable[[list[dict[str, Any]]], None] = lambda _: None,
            ) -> list[dict[str, Any]]:
    """Run every point on every transport; one row per (point, transport). A point whose
    ranks fail (say, oversubscribed) is reported and skipped; ``on_row`` sees the rows so far
    after each point."""
    rows: list[dict[str, Any]] = []
    env = _env()
    for point, transport in _runs(cfg):
        progress(f"moe {point} {transport}")
        try:
            rows.append(_run_point(cfg, point, transport, env))
        except RuntimeError as exc:
            progress(f"skipped: {exc}")
        on_row(rows)
    return rows


def _run_point(cfg: MoeConfig, point: MoePoint, transport: str,
               env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tf-moe-") as tmp:
        if transport == "netns-tcp":
            from tensorfabric.testing.netns import NetnsHosts

            with NetnsHosts(point.world, rate=cfg.rate) as fab:
                hosts = [fab.addr(i) for i in range(point.world)]
                nsenv = dict(env, GLOO_SOCKET_IFNAME="tfnic")  # the hosts' NIC
                ranks = _launch(cfg, point, "tcp", tmp, hosts,
                                lambda r, argv: fab.popen(r, argv, env=nsenv))
        else:
            hosts = ["127.0.0.1"] * point.world
            ranks = _launch(cfg, point, transport, tmp, hosts,
                            lambda r, argv: subprocess.Popen(argv, env=env))
    return _summarise(point, transport, ranks)


def format_moe(rows: list[dict[str, Any]]) -> str:
    """A table: per point and transport, p50/p99 of the engine and the baselines' p50, in us."""
    head = (f"{'transport':<10} {'EPxTxHxExK':<18} {'sent/rank':>9}  {'dispatch p50/p99':>17} "
            f"{'combine p50/p99':>17} {'wait d/c p50':>13}  {'gloo d/c p50':>14}  "
            f"{'raw d/c p50':>14}  {'gloo layer d/c':>15}  {'glayer/eng':>10}  "
            f"{'gloo/eng d,c':>12}  {'eng/raw d,c':>12}  {'compact d/c p50':>15}  "
            f"{'gloo/cmp d,c':>12}  {'cmp/raw d,c':>12}  {'CPU cmp d/c':>13}  "
            f"{'CPU gloo d/c':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def us(key: str) -> str:
            v = r.get(key, float("nan"))
            return "-" if v != v else f"{v:,.0f}"
        lines.append(
            f"{r['transport']:<10} {r['point']:<18} {_mib(r['dispatch_bytes_per_rank']):>9}  "
            f"{us('engine_dispatch_p50_us') + '/' + us('engine_dispatch_p99_us'):>17} "
            f"{us('engine_combine_p50_us') + '/' + us('engine_combine_p99_us'):>17} "
            f"{us('engine_dispatch_wait_p50_us') + '/' + us('engine_combine_wait_p50_us'):>13}  "
            f"{us('gloo_dispatch_p50_us') + '/' + us('gloo_combine_p50_us'):>14}  "
            f"{us('raw_dispatch_p50_us') + '/' + us('raw_combine_p50_us'):>14}  "
            f"{us('glayer_dispatch_p50_us') + '/' + us('glayer_combine_p50_us'):>15}  "
            f"{_ratio(r, 'glayer_over_engine'):>10}  "
            f"{_ratio(r, 'gloo_over_engine'):>12}  {_ratio(r, 'engine_over_raw'):>12}  "
            f"{us('compact_dispatch_p50_us') + '/' + us('compact_combine_p50_us'):>15}  "
            f"{_ratio(r, 'gloo_over_compact'):>12}  {_ratio(r, 'compact_over_raw'):>12}  "
            f"{us('compact_dispatch_cpu_us') + '/' + us('compact_combine_cpu_us'):>13}  "
            f"{us('gloo_dispatch_cpu_us') + '/' + us('gloo_combine_cpu_us'):>13}")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return "-" if n != n else f"{n / (1 << 20):.2f} MiB"


def _ratio(r: dict[str, Any], key: str) -> str:
    d, c = r.get(f"{key}_dispatch", float("nan")), r.get(f"{key}_combine", float("nan"))
    if d != d:
        return "-"
    return f"{d:.2f},{c:.2f}"


def moe_config(points: str | None, transport: str | None, *, quick: bool = False,
               baselines: bool = True, iters: int | None = None) -> MoeConfig:
    """A config from command-line text; ValueError on bad input. ``transport``: a comma list
    of shm, tcp, tcp-plain (tcp without frame MACs, as gloo and the raw sockets run) and
    netns (tcp between network-namespace hosts, needs root)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ValueError("bench --moe needs torch (bfloat16 tokens, the gloo baselines): "
                         "pip install 'tensorfabric[llm]'")
    names = [t.strip() for t in (transport or "shm,tcp").split(",") if t.strip()]
    if names == ["all"]:
        names = ["shm", "tcp"]
    bad = set(names) - {"shm", "tcp", "tcp-plain", "netns"}
    if bad or not names:
        raise ValueError(f"--moe transports are shm, tcp, tcp-plain, netns; got "
                         f"{sorted(bad) or names}")
    pts = [p.strip() for p in points.split(",") if p.strip()] if points else \
        list(QUICK if quick else FULL)
    if "netns" in names:
        from tensorfabric.testing.netns import netns_unavailable_reason

        why = netns_unavailable_reason()
        if why:
            raise ValueError(f"netns hosts unavailable: {why}")
    return MoeConfig(points=tuple(MoePoint.parse(p) for p in pts),
                     transports=tuple(n for n in names if n != "netns"),
                     netns="netns" in names, baselines=baselines,
                     iters=iters or (10 if quick else 30))


def moe_command(points: str | None, transport: str | None, *, quick: bool, json_out: Path | None,
                baselines: bool, echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    """What ``tensorfabric bench --moe`` runs: the sweep, a table, the load, optional JSON."""
    cfg = moe_config(points, transport, quick=quick, baselines=baselines)
    rows = run_moe(cfg, lambda d: echo(d))
    echo(format_moe(rows))
    load = os.getloadavg()
    echo(f"load average {load[0]:.1f} on {os.cpu_count()} cpus; latency = slowest rank per "
         "step; ratios of p50s (gloo/engine >= 1: engine faster; engine/raw target <= 2); "
         "CPU = p50 over steps of the CPU every rank's process spent in the call, summed")
    if json_out:
        json_out.write_text(json.dumps({"rows": rows, "loadavg": load,
                                        "cpus": os.cpu_count()}, indent=1))
        echo(f"wrote {json_out}")
    return rows
