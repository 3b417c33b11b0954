"""A real local Ray cluster of pool nodes with fake GPUs and labels, shared by a test module.

Starting Ray costs seconds, so one cluster serves the whole session. Tests that kill nodes
kill only eu-a1/eu-a2 (the transport test uses "us" and "eu-b").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

ray = pytest.importorskip("ray")

from tensorfabric.pool import NodeClaims  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
SECRET = "pool-test-secret"

# name -> (claims, GPUs). "liar" claims 80 GB on a host that has far less: it must fail
# verification. Simulated GPUs are checked against host memory (this host: ~24 GB).
NODES: dict[str, tuple[NodeClaims, int]] = {
    "eu-a1": (NodeClaims("eu-west", "eu-west-a", "DE", "datacenter", "A100", 16, "low", True), 1),
    "eu-a2": (NodeClaims("eu-west", "eu-west-a", "DE", "datacenter", "A100", 16, "low", True), 1),
    "eu-b": (NodeClaims("eu-west", "eu-west-b", "FR", "datacenter", "A100", 16, "low", True), 2),
    "us": (NodeClaims("us-east", "us-east-a", "US", "consumer", "RTX4090", 8, "low", True), 1),
    "liar": (NodeClaims("eu-central", "eu-central-a", "DE", "miner", "H100", 80, "low", True), 1),
}


@pytest.fixture(scope="session")
def pool_cluster() -> Iterator[dict]:
    """Start head + NODES; yield {"cluster", "nodes": name -> ray node, "ids": name -> id}."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("TENSORFABRIC_SECRET", "PYTHONPATH")}
    # Raylets (and so workers) inherit this environment: the engine secret and import paths.
    os.environ["TENSORFABRIC_SECRET"] = SECRET
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), str(HERE)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2, "num_gpus": 0, "labels": {"tensorfabric.io/role": "head"},
            # Notice a killed node in ~3 s, yet tolerate a loaded 2-core CI machine.
            "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 3,
                               "health_check_initial_delay_ms": 0,
                               # Ray kills workers when the host is 95 % full: on a machine
                               # shared with other jobs that would be their memory, not ours.
                               "memory_monitor_refresh_ms": 0},
        },
    )  # fmt: skip
    nodes = {
        name: cluster.add_node(num_cpus=1, num_gpus=gpus, labels=claims.to_labels())
        for name, (claims, gpus) in NODES.items()
    }
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="tensorfabric-pool", log_to_driver=False)
        ids = {}
        for n in ray.nodes():
            for name, node in nodes.items():
                if n["NodeManagerPort"] == node.node_manager_port:
                    ids[name] = n["NodeID"]
        yield {"cluster": cluster, "nodes": nodes, "ids": ids}
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
