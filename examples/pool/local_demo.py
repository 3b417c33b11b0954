"""A GPU pool on this machine: 3 simulated GPU nodes in 2 zones (and one that lies about its
memory), verification, a deployment, a node failure and the failover, then the status table.

    PYTHONPATH=src python examples/pool/local_demo.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
sys.path.insert(0, str(SRC))


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tensorfabric.pool import NodeClaims, Pool
    from tensorfabric.pool._status import render

    os.environ.setdefault("TENSORFABRIC_SECRET", "demo-secret-change-me")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE)])  # for the Ray workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    nodes = {}
    for name, zone, gpu, mem in (("a", "eu-west-a", "A100", 16), ("b", "eu-west-b", "A100", 16),
                                 ("c", "eu-west-c", "A100", 16), ("liar", "eu-west-c", "H100", 80)):
        claims = NodeClaims("eu-west", zone, "DE", "datacenter", gpu, mem, "low", simulated=True)
        nodes[name] = cluster.add_node(num_cpus=1, num_gpus=1, labels=claims.to_labels())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="tensorfabric-pool", log_to_driver=False)
    try:
        pool = Pool(cluster.address)
        for node_id, rec in pool.verify_pending().items():
            print(f"node {node_id[:8]}: verified={rec['verified']} ({rec['reason']})")
        handle = pool.deploy(HERE / "local-demo.yaml")
        print(handle.call("hi"), "|", handle.call("there"))
        victim = pool.status()["deployments"][0]["replicas"][0]
        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == victim["node_id"])
        print(f"killing node {victim['node_id'][:8]} in {victim['zone']} ...")
        cluster.remove_node(next(n for n in nodes.values() if n.node_manager_port == port))
        t0 = time.perf_counter()
        for i in range(20):  # calls keep succeeding across the failover
            handle.call(f"call {i}")
        print(f"20 calls answered in {time.perf_counter() - t0:.2f} s during the failover")
        deadline = time.monotonic() + 60
        while pool.status()["deployments"][0]["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.2)  # the replacement replica is starting
        render(pool.status())
        pool.down()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
