"""Weight-update benchmark: the default model to 1, 2, 4 replica processes over shm and tcp.

For each transport it first measures the baseline in the same run: the engine's raw ``write``
rate of the same bytes into one replica's slot (chunked and windowed like the publisher), and
the aggregate rate into N replicas at once. Then it publishes versions and reports the update
time, the effective throughput (one replica's bytes / update time) as a ratio to the raw rate,
the time for N replicas relative to 1, and the analytic planner's prediction from the rates
measured here (prepare, checksum, raw write, host cores).

    python bench/weights_update.py                       # full matrix (several minutes)
    python bench/weights_update.py --replicas 1,2 --transports shm --dtypes float32 --repeat 2
    python bench/weights_update.py --fabric 2gbit        # each process on its own 2 Gbit/s host (root)

One host runs everything by default, so the replicas' copies and checksums compete for the same
cores and memory bus. ``--fabric RATE`` puts the publisher and every replica in its own network
namespace with its own capped NIC on an emulated switch, the shape of a real deployment, where
the links and not one host's CPU bound the update.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import tensorfabric as tf  # noqa: E402
from tensorfabric.weights import (  # noqa: E402
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    Cluster,
    Publisher,
    WeightPlan,
    checksum,
    predict,
    same_layout,
    specs_of,
)
from tensorfabric.weights._publisher import Replica  # noqa: E402

SECRET = "weights-bench"


def _engine_kwargs(transport: str, fab: Any = None, host: int = 0) -> dict[str, Any]:
    kw: dict[str, Any] = {"transports": ["shm", "tcp"] if transport == "shm" else ["tcp"]}
    if fab is not None:  # --fabric: host ``host``'s NIC address
        kw["host"] = fab.addr(host)
    return kw


def _spawn(n: int, pub: Publisher, transport: str, tmp: Path, fab: Any = None) -> list[subprocess.Popen[str]]:
    layout = tmp / "layout.json"
    layout.write_text(json.dumps(pub.plan.layout.to_json()))
    env = dict(os.environ, TENSORFABRIC_SECRET=SECRET, PYTHONPATH=str(ROOT / "src"))
    procs = []
    for i in range(n):
        argv = [sys.executable, "-m", "tensorfabric.weights.replica", "--name", f"r{i}",
                "--publisher", pub.engine.address.hex(), "--layout", str(layout), "--timeout", "120",
                "--engine", json.dumps(_engine_kwargs(transport, fab, i + 1))]
        if fab is not None:  # replica i on host i + 1, the publisher on host 0
            argv = fab.exec_argv(i + 1, argv)
        procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:
        assert p.stdout is not None and json.loads(p.stdout.readline())["ready"]
    pub.wait_replicas(n, timeout=60)
    return procs


def _raw_write(pub: Publisher, targets: list[Any], slot: int) -> float:
    """Seconds to write the whole staging buffer to every target's slot, chunked and windowed."""
    eng, plan = pub.engine, pub.plan
    t0 = time.perf_counter()
    inflight: list[Any] = []
    for c in plan.chunks:
        for r in targets:
            inflight.append(eng.write(pub.staging, r.slots[slot], src_offset=c.offset,
                                      dst_offset=c.offset, nbytes=c.nbytes))
        while len(inflight) > pub.window * len(targets):
            inflight.pop(0).wait(120)
    for t in inflight:
        t.wait(120)
    return time.perf_counter() - t0


def pub_slot(pub: Publisher, rep: Replica) -> int:
    """The slot a replica serves now (versions alternate slots, starting with slot 0); the raw
    baseline writes into the other one, which no reader uses between updates."""
    return (rep.version - 1) % 2


def _rates(pub: Publisher, tensors: dict[str, Any]) -> dict[str, float]:
    plan = pub.plan
    src = plan.check_sources(tensors)
    prep = crc = cp = float("inf")
    spare = np.empty_like(pub._arr)
    for _ in range(2):  # the first pass also faults the staging pages in
        t0 = time.perf_counter()
        for c in plan.chunks:
            plan.prepare(c.index, src, pub._arr)
        prep = min(prep, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for c in plan.chunks:
            checksum(pub._arr[c.offset : c.offset + c.nbytes], pub.checksum)
        crc = min(crc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(spare, pub._arr)
        cp = min(cp, time.perf_counter() - t0)
    return {"prepare_gbs": plan.source_nbytes / prep / 1e9, "checksum_gbs": plan.nbytes / crc / 1e9,
            "memory_gbs": 2 * plan.nbytes / cp / 1e9}  # one copy: the bytes read plus written


def _rtt(transport: str) -> float:
    with tf.Engine(secret=SECRET, **_engine_kwargs(transport)) as a, \
            tf.Engine(secret=SECRET, **_engine_kwargs(transport)) as b:
        a.send(b.address, b"x", tag=1).wait(10)
        b.recv(tag=1, timeout=10)
        t0 = time.perf_counter()
        for _ in range(20):
            a.send(b.address, b"x", tag=1).wait(10)
            b.recv(tag=1, timeout=10)
        return (time.perf_counter() - t0) / 20


def run_case(tensors: dict[str, Any], transport: str, dtype: str, n: int, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    src = specs_of(tensors)
    plan = WeightPlan(src, same_layout(src, dtype=dtype), chunk_bytes=int(args.chunk_mb * 2**20),
                      direct_min_bytes=int(args.direct_min_kb * 1024) if args.zero_copy else None)
    fab = args.fab
    with tf.Engine(secret=SECRET, name="publisher", timeout=120, **_engine_kwargs(transport, fab)) as eng, \
            Publisher(eng, plan, fanout=args.fanout, timeout=120, zero_copy=args.zero_copy,
                      window=args.window, checksum=args.checksum) as pub:
        procs = _spawn(n, pub, transport, tmp, fab)
        try:
            rates = _rates(pub, tensors)
            reps: list[Replica] = [pub._replicas[name] for name in sorted(pub.replicas)]
            for slot in (0, 1):  # touch every slot page once so no run pays first-touch faults
                _raw_write(pub, reps, slot)
            pub.publish(tensors)  # warm-up: first round opens control paths
            raws, rawns, times = [], [], []
            ab: dict[str, list[float]] = {}
            variants = _variants(src, dtype, args)
            for _ in range(args.repeat):  # interleaved, so load drift hits baseline and update alike
                raws.append(_raw_write(pub, reps[:1], 1 - pub_slot(pub, reps[0])))
                if n > 1:
                    rawns.append(_raw_write(pub, reps, 1 - pub_slot(pub, reps[0])))
                res = pub.publish(tensors)
                if not res.ok:
                    raise RuntimeError(f"publish failed: {res.failed}")
                times.append(res.seconds)
                for name, vplan, zc, kind in variants:  # same replicas, another cut / checksum
                    pub.plan, pub.zero_copy, pub.checksum = vplan, zc, kind
                    try:
                        vres = pub.publish(tensors)
                    finally:
                        pub.plan, pub.zero_copy, pub.checksum = plan, args.zero_copy, args.checksum
                    if not vres.ok:
                        raise RuntimeError(f"publish ({name}) failed: {vres.failed}")
                    ab.setdefault(name, []).append(vres.seconds)
            raw1 = min(raws)
            rawn = min(rawns) if n > 1 else raw1
        finally:
            for p in procs:
                if p.stdin:
                    p.stdin.close()
                p.wait(timeout=30)
    t = min(times)  # best of: the raw baseline is a best-of too
    staged = sum(c.nbytes for c in plan.chunks if c.source is None or not args.zero_copy) / plan.nbytes
    raw_gbs = plan.nbytes / raw1 / 1e9
    pred = predict(Cluster(
        params=sum(s.numel for s in src), src_gpus=1, dst_gpus=n, replicas=n, src_bytes=4,
        dst_bytes=plan.nbytes / sum(s.numel for s in src), nics_per_gpu=1, nic_gbit=raw_gbs * 8,
        link_efficiency=1.0, fanout=args.fanout, chunk_bytes=args.chunk_mb * 2**20,
        prepare_gbs=rates["prepare_gbs"], checksum_gbs=rates["checksum_gbs"],
        staged=staged,
        # --fabric: each replica has its own NIC (and, in the deployment emulated, its own CPU
        # and memory); else one host's memory bus and cores carry every pass over the bytes
        memory_gbs=rates["memory_gbs"] if fab is None else None,
        link_mem=2.0 if transport == "shm" else 4.0,
        cores=os.cpu_count() if fab is None else None,
        link_cpu=1.0 if transport == "shm" else 2.0,
        submit_s=50e-6, control_s=3 * args.rtt))
    return {"transport": transport if fab is None else f"tcp {fab.specs[0].rate}/host", "dtype": dtype, "replicas": n, "mb": plan.nbytes / 1e6,
            "raw_gbs": raw_gbs, "raw_n_gbs": plan.nbytes * n / rawn / 1e9, "update_s": t,
            "eff_gbs": plan.nbytes / t / 1e9, "ratio": plan.nbytes / t / 1e9 / raw_gbs,
            "pred_s": pred.total_s, "pred_err": pred.total_s / t - 1, "bottleneck": pred.bottleneck,
            "stages": {k: round(v, 4) for k, v in res.stages.items()},
            "ab": {k: round(min(v), 4) for k, v in ab.items()},
            **rates}


def _variants(src: Any, dtype: str, args: argparse.Namespace) -> list[tuple[str, WeightPlan, bool, str]]:
    """The --ab variants: the same layout cut for staging only and for zero-copy at two sizes
    (``--ab``), or the default cut with each other checksum (``--ab-checksum``)."""
    cb = int(args.chunk_mb * 2**20)
    def cut(direct: int | None) -> WeightPlan:
        return WeightPlan(src, same_layout(src, dtype=dtype), chunk_bytes=cb, direct_min_bytes=direct)
    out = []
    if args.ab:
        out += [("staged", cut(None), False, args.checksum), ("zc256k", cut(256 << 10), True, args.checksum),
                ("zc2m", cut(2 << 20), True, args.checksum)]
    if args.ab_checksum:
        default = cut(int(args.direct_min_kb * 1024) if args.zero_copy else None)
        out += [(kind, default, args.zero_copy, kind) for kind in CHECKSUMS if kind != args.checksum]
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    one = {(r["transport"], r["dtype"]): r["update_s"] for r in rows if r["replicas"] == 1}
    out = ["| transport | replica dtype | replicas | MB per replica | raw write GB/s | update s | "
           "effective GB/s | effective / raw | time vs 1 replica | planner s | planner error | "
           "planner bottleneck |", "|" + "---|" * 12]
    for r in rows:
        base = one.get((r["transport"], r["dtype"]))
        vs1 = f"{r['update_s'] / base:.2f}x" if base else "-"
        out.append(f"| {r['transport']} | {r['dtype']} | {r['replicas']} | {r['mb']:.0f} | "
                   f"{r['raw_gbs']:.2f} | {r['update_s']:.3f} | {r['eff_gbs']:.2f} | {r['ratio']:.2f} | "
                   f"{vs1} | {r['pred_s']:.3f} | {r['pred_err']:+.0%} | {r['bottleneck']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", default="shm,tcp")
    p.add_argument("--dtypes", default="float32,bfloat16", help="replica dtypes (trainer is fp32)")
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--fanout", default="chain", help="direct, chain or tree")
    p.add_argument("--chunk-mb", type=float, default=16.0)
    p.add_argument("--no-zero-copy", dest="zero_copy", action="store_false",
                   help="stage every chunk (the pre-zero-copy path), for comparison")
    p.add_argument("--direct-min-kb", type=float, default=2048.0,
                   help="smallest unconverted piece written straight from trainer memory")
    p.add_argument("--window", type=int, default=4, help="chunks in flight per root")
    p.add_argument("--ab", action="store_true",
                   help="also time, interleaved in the same case: staging only, zero-copy >= 256 KiB, >= 2 MiB")
    p.add_argument("--fabric", metavar="RATE",
                   help="run over tcp between emulated hosts instead (root): the publisher and each "
                        "replica in its own network namespace, each with one NIC capped at RATE "
                        "(tc syntax, e.g. 2gbit) on a switch")
    p.add_argument("--checksum", default=DEFAULT_CHECKSUM, choices=CHECKSUMS)
    p.add_argument("--ab-checksum", action="store_true",
                   help="also time, interleaved in the same case, the default cut with each other checksum")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()

    import torch

    from tensorfabric.models import load_model
    from tensorfabric.weights import model_tensors

    torch.set_num_threads(1)
    tensors = model_tensors(load_model().model)
    rows = []
    counts = [int(x) for x in args.replicas.split(",")]
    args.fab = None
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(tempfile.TemporaryDirectory())
        transports = args.transports.split(",")
        if args.fabric:  # every process on its own emulated host; this one is host 0
            from tensorfabric.testing.netns import NetnsHosts

            args.fab = stack.enter_context(NetnsHosts(max(counts) + 1, rate=args.fabric))
            stack.enter_context(args.fab.inside(0))
            transports = ["tcp"]
        for transport in transports:
            args.rtt = _rtt(transport)
            for dtype in args.dtypes.split(","):
                for n in counts:
                    row = run_case(tensors, transport, dtype, n, args, Path(d))
                    rows.append(row)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                          flush=True)
    print()
    print(f"# weights update, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()} ({os.cpu_count()} cores), fan-out {args.fanout}, chunk {args.chunk_mb} MiB, "
          f"zero-copy {'>= %g KiB' % args.direct_min_kb if args.zero_copy else 'off'}, window {args.window}, "
          f"checksum {args.checksum}")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
