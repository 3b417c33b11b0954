"""The pool controller at 100 to 100,000 nodes, by simulation on the real controller code.

    PYTHONPATH=src python bench/pool_scale.py [--nodes 100 1000 10000 100000] [--deploys 1000]
                                              [--minutes 10] [--plot docs/benchmarks/pool_scale.png]

The controller (``PoolController``: compile, place, fail over, verify, persist, restore) runs
as it does on a head, with its node source injected: ``SimBackend`` stands in for Ray
(``ray.nodes()``, placement groups, actors, pings, the verification probe), holding N nodes
in memory. No Ray process starts. For each pool size it measures:

- **joins**: every node verified once (the bookkeeping; the probe itself is simulated);
- **placement latency** of the deployments (1,000 by default, fewer where the pool has too
  few GPUs), controller time only (the simulated Ray's own matching is subtracted), p50/p99;
- **controller memory** (growth of this process's resident memory from before the controller
  was created to after the deployments: records, deployments, replicas) and the journal's size;
- **churn**: 1 % of the nodes lost per minute for ``--minutes`` minutes, time-compressed
  (one monitor pass per minute); half the lost nodes flap back a minute later under the same
  join id; replicas lost and replaced, and the time of each monitor pass;
- **restart**: a new controller reloads the journal and adopts the replicas.

Baseline, measured in the same run: one pass over the node list matching one selector (the
least any placement must do). Ratios are to it.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from tensorfabric.pool import _labels as L  # noqa: E402
from tensorfabric.pool._backend import NodeLost  # noqa: E402
from tensorfabric.pool._compile import NodeView, match  # noqa: E402
from tensorfabric.pool._controller import PoolController  # noqa: E402
from tensorfabric.pool._labels import NodeClaims  # noqa: E402
from tensorfabric.pool._state import StateStore  # noqa: E402

REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south"]
GPUS = [("H100", 80), ("A100", 40), ("L40S", 48), ("RTX4090", 24)]
PROVIDERS = ["datacenter", "miner", "consumer"]


class SimBackend:
    """The controller's backend over an in-memory cluster. Its own time is kept in ``sim_s``
    (that is Ray's work on a real head) so the controller's time can be told apart."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.nodes_: dict[str, tuple[dict[str, str], float]] = {}  # id -> (labels, GPUs)
        self.free: dict[str, float] = {}
        self.alive: set[str] = set()
        self.actors: dict[str, Any] = {}  # name -> (node id, GPUs)
        self.sim_s = 0.0
        self._n = 0

    def add(self, join_id: str | None = None, labels: dict[str, str] | None = None) -> str:
        self._n += 1
        nid = f"{self._n:056x}"
        if labels is None:
            gpu, mem = self.rng.choice(GPUS)
            region = self.rng.choice(REGIONS)
            liar = self.rng.random() < 0.01
            claims = NodeClaims(region, f"{region}-{self.rng.choice('abc')}", "XX",
                                self.rng.choice(PROVIDERS), gpu, mem * (2 if liar else 1), "high")  # fmt: skip
            labels = {**claims.to_labels(), L.JOIN_ID: join_id or f"j{self._n}"}
        gpus = float(self.rng.choice([1, 2, 4, 8]))
        self.nodes_[nid] = (labels, gpus)
        self.free[nid] = gpus
        self.alive.add(nid)
        return nid

    def kill(self, nid: str) -> None:
        self.alive.discard(nid)
        self.free[nid] = 0.0

    # ---- the backend interface (see tensorfabric.pool._backend.RayBackend)
    def nodes(self) -> list[NodeView]:
        t0 = time.perf_counter()
        out = [NodeView(nid, nid in self.alive, {**labels, L.NODE_ID: nid}, gpus, self.free[nid])
               for nid, (labels, gpus) in self.nodes_.items()]  # fmt: skip
        self.sim_s += time.perf_counter() - t0
        return out

    def alive_ids(self) -> set[str]:
        return set(self.alive)

    def reserve(self, bundle: dict[str, float], selector: dict[str, str], wait_s: float, name: str) -> Any:
        t0 = time.perf_counter()
        need = bundle.get("GPU", 0.0)
        try:
            for nid in self.alive:
                labels = {**self.nodes_[nid][0], L.NODE_ID: nid}
                if self.free[nid] >= need and match(labels, selector):
                    self.free[nid] -= need
                    return (name, nid, need)
            return None
        finally:
            self.sim_s += time.perf_counter() - t0

    def pg_node(self, pg: Any) -> str:
        return pg[1]

    def start(self, pg: Any, spec: Any, index: int, name: str) -> Any:
        self.actors[name] = pg
        return name

    def ready(self, actor: str, timeout: float, node_id: str) -> dict[str, Any]:
        if node_id not in self.alive:
            raise NodeLost(node_id, "it died while the replica started")
        return {"node_id": node_id, "labels": self.nodes_[node_id][0]}

    def ping(self, actors: dict[Any, str], timeout: float) -> dict[Any, str]:
        return {k: "ok" if self.actors.get(a, ("", "", 0))[1] in self.alive else "dead: node"
                for k, a in actors.items()}  # fmt: skip

    def find(self, name: str, pg_name: str) -> Any:
        pg = self.actors.get(name)
        return (name, pg) if pg and pg[1] in self.alive else None

    def discard(self, actor: Any, pg: Any) -> None:
        if pg and pg[1] in self.alive:
            self.free[pg[1]] += pg[2]
        self.actors.pop(actor, None)

    def measure(self, view: NodeView, timeout: float) -> tuple[dict[str, Any], str]:
        mem = {g: m for g, m in GPUS}.get(view.labels[L.GPU_MODEL], 0)
        return ({"device": f"NVIDIA {view.labels[L.GPU_MODEL]}", "memory_gb": mem, "memory_probe_ok": True,
                 "gflops": 50_000.0, "transfer_mb_s": 2000.0, "sha256": "x"}, "x")  # fmt: skip


def make_spec(rng: random.Random, i: int) -> dict[str, Any]:
    gpus = [g for g, _ in rng.sample(GPUS, rng.choice([1, 2, 3]))]
    spec: dict[str, Any] = {"name": f"d{i}", "replicas": rng.choice([1, 1, 2]), "gpus": gpus,
                            "run": {"actor": "app:Model"}, "placement_timeout_s": 1}  # fmt: skip
    if rng.random() < 0.6:
        spec["regions"] = [rng.choice(["eu-*", "us-*", "ap-*", "*"])]
    if rng.random() < 0.5:
        spec["verified_only"] = True
    return spec


def _rss() -> int:
    """Resident memory of this process, bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0


def run(n_nodes: int, n_deploys: int, minutes: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pool-scale-")
    journal = os.path.join(tmp, "state.jsonl")
    sim = SimBackend(rng)
    for _ in range(n_nodes):
        sim.add()
    gc.collect()
    rss0 = _rss()
    ctl = PoolController(backend=sim, store=StateStore(journal, use_kv=False), monitor=False)

    # baseline: one pass over the node list with one selector
    views = sim.nodes()
    sel = {L.REGION: "in(eu-west,eu-central)", L.GPU_MODEL: "A100"}
    t0 = time.perf_counter()
    sum(1 for v in views if match(v.labels, sel))
    base_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    recs = ctl.verify_pending()
    join_s = time.perf_counter() - t0
    verified = sum(r["verified"] for r in recs.values())

    lat, failed = [], 0
    for i in range(n_deploys):
        spec = make_spec(rng, i)
        s0, t0 = sim.sim_s, time.perf_counter()
        try:
            ctl.deploy(spec)
        except Exception:
            failed += 1
            continue
        lat.append(time.perf_counter() - t0 - (sim.sim_s - s0))
    gc.collect()
    mem = _rss() - rss0
    sel_bytes = max((len(repr(r.selector)) for d in ctl._deployments.values() for r in d.replicas.values()), default=0)

    churn = []
    flapped: list[tuple[str, dict[str, str]]] = []
    for _minute in range(minutes):
        for join_id, labels in flapped:  # last minute's flappers come back, same join id
            sim.add(join_id, labels)
        flapped = []
        victims = rng.sample(sorted(sim.alive), max(1, n_nodes // 100))
        for nid in victims:
            sim.kill(nid)
            if rng.random() < 0.5:
                flapped.append((sim.nodes_[nid][0][L.JOIN_ID], sim.nodes_[nid][0]))
        lost0 = sum(e["event"] == "lost" for d in ctl._deployments.values() for e in d.events)
        s0, t0 = sim.sim_s, time.perf_counter()
        ctl.check_once()
        ctl.reverify_due()
        took = time.perf_counter() - t0 - (sim.sim_s - s0)
        deps = list(ctl._deployments.values())
        churn.append({"pass_s": took,
                      "lost": sum(e["event"] == "lost" for d in deps for e in d.events) - lost0,
                      "degraded": sum(d.state != "ready" for d in deps)})  # fmt: skip

    size = os.path.getsize(journal)
    t0 = time.perf_counter()
    ctl2 = PoolController(backend=sim, store=StateStore(journal, use_kv=False), monitor=False)
    restore_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctl2.check_once()
    answering_s = restore_s + time.perf_counter() - t0
    ready = sum(d.state == "ready" for d in ctl2._deployments.values())
    return {
        "nodes": n_nodes, "deploys": n_deploys, "placed": len(lat), "failed": failed,
        "verified": verified, "join_per_node_ms": join_s / max(1, n_nodes) * 1e3,
        "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "base_ms": base_s * 1e3,
        "mem_mb": mem / 2**20, "journal_mb": size / 2**20, "selector_kb": sel_bytes / 1024,
        "churn_pass_ms": statistics.median([c["pass_s"] for c in churn]) * 1e3 if churn else 0,
        "churn_pass_max_ms": max([c["pass_s"] for c in churn], default=0) * 1e3,
        "churn_lost": sum(c["lost"] for c in churn), "degraded_end": churn[-1]["degraded"] if churn else 0,
        "restore_s": restore_s, "answering_s": answering_s, "ready_after": ready,
        "deps_after": len(ctl2._deployments),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--deploys", type=int, default=1000)
    ap.add_argument("--minutes", type=int, default=10, help="churn minutes (1%% of nodes lost each)")
    ap.add_argument("--plot", default="", help="write a PNG plot here")
    args = ap.parse_args()
    print(f"# pool scale, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = []
    for n in args.nodes:
        d = min(args.deploys, max(10, n // 2))  # a small pool holds fewer deployments
        r = run(n, d, args.minutes)
        rows.append(r)
        print(f"nodes {n}: {r}", flush=True)
    print()
    print("| nodes | deployments placed | verify bookkeeping / node | placement p50 | p99 | p50 / baseline | "
          "controller memory | journal | largest selector | churn pass (1 %/min) p50 / max | replicas lost | "
          "restart: reload + re-adopt | ready after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']:,} | {r['placed']}/{r['deploys']} | {r['join_per_node_ms']:.2f} ms | "
              f"{r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['p50_ms'] / max(r['base_ms'], 1e-6):.0f}x "
              f"({r['base_ms']:.2f} ms) | {r['mem_mb']:.1f} MiB | {r['journal_mb']:.1f} MiB | "
              f"{r['selector_kb']:.1f} KiB | {r['churn_pass_ms']:.0f} / {r['churn_pass_max_ms']:.0f} ms | "
              f"{r['churn_lost']} | {r['answering_s']:.2f} s | {r['ready_after']}/{r['deps_after']} |")  # fmt: skip
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["nodes"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(n, [r["p50_ms"] for r in rows], "o-", label="placement p50")
    a.loglog(n, [r["p99_ms"] for r in rows], "s-", label="placement p99")
    a.loglog(n, [r["churn_pass_ms"] for r in rows], "^-", label="monitor pass under churn")
    a.loglog(n, [r["base_ms"] for r in rows], "k--", label="baseline: one pass over nodes")
    a.set_xlabel("nodes")
    a.set_ylabel("ms")
    a.legend(fontsize=8)
    a.set_title("controller latency")
    b.loglog(n, [r["mem_mb"] for r in rows], "o-", label="controller memory")
    b.loglog(n, [r["journal_mb"] for r in rows], "s-", label="state journal")
    b.set_xlabel("nodes")
    b.set_ylabel("MiB")
    b.legend(fontsize=8)
    b.set_title("controller memory and state")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
