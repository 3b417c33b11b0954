"""Pool benchmark on a local Ray cluster: deploy -> ready, node loss -> recovered, and
actor-to-actor tensor transfer over tensorfabric vs Ray's object store, all in one run.

    PYTHONPATH=src python bench/pool_bench.py [--sizes-mib 1 16 64] [--repeats 5]

Baselines measured in the same run:
- deploy: a bare Ray actor (no selectors, no placement group) created and called once;
- recovery: starting one bare Ray actor (what any replacement costs at least);
- transfer: the same producer/consumer actors passing the tensor through Ray's object store.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))


def start_cluster():  # type: ignore[no-untyped-def]
    import ray
    from ray.cluster_utils import Cluster

    from tensorfabric.pool import NodeClaims

    os.environ.setdefault("TENSORFABRIC_SECRET", "pool-bench-secret")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE)])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0,
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0},
    })  # fmt: skip
    nodes = {}
    for name, zone, gpus in (("a1", "eu-west-a", 1), ("a2", "eu-west-a", 1), ("b", "eu-west-b", 2)):
        claims = NodeClaims("eu-west", zone, "DE", "datacenter", "A100", 16, "low", True)
        nodes[name] = cluster.add_node(num_cpus=1, num_gpus=gpus, labels=claims.to_labels())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="tensorfabric-pool", log_to_driver=False)
    return cluster, nodes


SPEC = {"name": "bench", "replicas": 2, "regions": ["eu-*"], "gpus": ["H100", "A100"],
        "verified_only": True, "allow_simulated": True, "num_cpus": 0,
        "run": {"actor": "pool_bench_app:Echo"}}  # fmt: skip


def bench_deploy(pool, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    import ray

    from pool_bench_app import Echo

    bare_cls = ray.remote(num_cpus=0, num_gpus=1)(Echo)
    deploy_s, bare_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = pool.deploy(SPEC)
        h.call(1)
        deploy_s.append(time.perf_counter() - t0)
        pool.down("bench")
        t0 = time.perf_counter()
        actors = [bare_cls.remote() for _ in range(2)]
        ray.get([a.__call__.remote(1) for a in actors])
        bare_s.append(time.perf_counter() - t0)
        for a in actors:
            ray.kill(a)
    return statistics.median(deploy_s), statistics.median(bare_s)


def bench_recovery(pool, cluster, nodes) -> tuple[float, float, str]:  # type: ignore[no-untyped-def]
    import ray

    h = pool.deploy(SPEC)
    h.call(0)
    reps = pool.status()["deployments"][0]["replicas"]
    victim = next(r for r in reps if r["zone"] == "eu-west-a")
    by_port = {n.node_manager_port: k for k, n in nodes.items()}
    node_name = next(by_port[n["NodeManagerPort"]] for n in ray.nodes() if n["NodeID"] == victim["node_id"])
    t0 = time.perf_counter()
    cluster.remove_node(nodes[node_name])
    detected = None
    while True:
        if detected is None and not any(
            n["Alive"] for n in ray.nodes() if n["NodeID"] == victim["node_id"]
        ):
            detected = time.perf_counter() - t0
        dep = pool.status()["deployments"][0]
        ev = [e for e in dep["events"] if e["event"] == "replaced"]
        if ev and dep["state"] == "ready":
            break
        time.sleep(0.05)
    recovered = time.perf_counter() - t0
    h.call(1)
    pool.down("bench")
    # Baseline: what any replacement costs at least - one bare GPU actor started and called.
    from pool_bench_app import Echo

    t1 = time.perf_counter()
    bare = ray.remote(num_cpus=0, num_gpus=1)(Echo).remote()
    ray.get(bare.__call__.remote(1))
    bare_s = time.perf_counter() - t1
    ray.kill(bare)
    moved = f"{ev[0]['from_zone']} -> {ev[0]['zone']}; Ray saw the node dead after {detected:.2f} s"
    return recovered, bare_s, moved


def bench_transfer(sizes_mib: list[int], repeats: int) -> list[tuple[int, float, float]]:
    import ray
    import torch

    from tensorfabric.pool import register_transport

    name = register_transport()

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Producer:
        def __init__(self) -> None:
            self.t: dict[int, torch.Tensor] = {}

        def prepare(self, nbytes: int) -> None:
            self.t[nbytes] = torch.ones(nbytes // 4)

        @ray.method(tensor_transport=name)
        def over_tensorfabric(self, nbytes: int) -> torch.Tensor:
            return self.t[nbytes]

        def over_object_store(self, nbytes: int) -> torch.Tensor:
            return self.t[nbytes]

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Consumer:
        def take(self, t: torch.Tensor) -> int:
            return int(t.numel())

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    prod = Producer.options(label_selector={"ray.io/node-id": nodes[0]}).remote()
    cons = Consumer.options(label_selector={"ray.io/node-id": nodes[1]}).remote()
    rows = []
    for mib in sizes_mib:
        nbytes = mib * 2**20
        ray.get(prod.prepare.remote(nbytes))
        times: dict[str, list[float]] = {"tf": [], "store": []}
        for i in range(repeats + 1):  # the first round warms up connections and workers
            for key, method in (("tf", prod.over_tensorfabric), ("store", prod.over_object_store)):
                t0 = time.perf_counter()
                assert ray.get(cons.take.remote(method.remote(nbytes))) == nbytes // 4
                if i:
                    times[key].append(time.perf_counter() - t0)
        rows.append((mib, statistics.median(times["tf"]), statistics.median(times["store"])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import ray

    from tensorfabric.pool import Pool

    cluster, nodes = start_cluster()
    try:
        pool = Pool(cluster.address)
        pool.verify_pending()
        dep, bare = bench_deploy(pool, args.repeats)
        xfer = bench_transfer(args.sizes_mib, args.repeats)
        rec, det, moved = bench_recovery(pool, cluster, nodes)  # last: it kills a node
    finally:
        ray.shutdown()
        cluster.shutdown()
    cmd = "PYTHONPATH=src python bench/pool_bench.py " + " ".join(sys.argv[1:])
    print(f"# pool benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()} ({os.cpu_count()} cores), ray {ray.__version__}")  # fmt: skip
    print(f"# command: {cmd.strip()}\n")
    print("| measure | pool | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| deploy -> ready, 2 replicas (median of {args.repeats}) | {dep:.2f} s | "
          f"bare Ray actors {bare:.2f} s | {dep / bare:.2f}x |")  # fmt: skip
    print(f"| node loss -> recovered ({moved}) | {rec:.2f} s | one bare Ray actor "
          f"start {det:.2f} s | {rec / det:.2f}x |")  # fmt: skip
    for mib, tf_s, store_s in xfer:
        print(f"| actor->actor {mib} MiB tensor | tensorfabric {mib / tf_s:.0f} MiB/s "
              f"({tf_s * 1e3:.1f} ms) | object store {mib / store_s:.0f} MiB/s "
              f"({store_s * 1e3:.1f} ms) | {store_s / tf_s:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
