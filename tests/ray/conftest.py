"""A real local Ray cluster of pool nodes with fake GPUs and labels, shared by the Ray tier.

Starting Ray costs seconds, so one cluster serves every module that uses it (they run one
after the other: tests/conftest.py orders them first in the tier) and stops after the last.
Tests that kill nodes kill only eu-a1/eu-a2 (the transport test uses "us" and "eu-b").
"""

from __future__ import annotations

import os
from pathlib import Path

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


_RUNNING: dict | None = None  # the cluster while a run of Ray tests goes on


@pytest.fixture(scope="module")
def pool_cluster() -> dict:
    """{"cluster", "nodes": name -> ray node, "ids": name -> id} of the head + NODES cluster.

    Started by the first test that asks for it and kept while the tests that follow need it
    too; stopped after the last of them (pytest_runtest_teardown below), not at the end of the
    session: an idle six-node cluster costs about a quarter of a core (raylets, agents, GCS),
    which the rest of the suite needs. A test that needs it later starts a new one."""
    global _RUNNING
    if _RUNNING is None:
        _RUNNING = _start_cluster()
    return _RUNNING


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    result = yield  # the test's fixtures (pools, controllers on the cluster) are gone by now
    if _RUNNING is not None and (nextitem is None or "pool_cluster" not in getattr(nextitem, "fixturenames", ())):
        _stop_cluster()
    return result


def _start_cluster() -> dict:
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
            # nothing here reads Ray's dashboard (the pool's own `ray start` goes without it too)
            "include_dashboard": False,
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
    except BaseException:
        cluster.shutdown()
        _restore(saved)
        raise
    ids = {}
    for n in ray.nodes():
        for name, node in nodes.items():
            if n["NodeManagerPort"] == node.node_manager_port:
                ids[name] = n["NodeID"]
    return {"cluster": cluster, "nodes": nodes, "ids": ids, "saved_env": saved}


def _stop_cluster() -> None:
    global _RUNNING
    running, _RUNNING = _RUNNING, None
    if running is None:
        return
    try:
        ray.shutdown()
        running["cluster"].shutdown()
    finally:
        _restore(running["saved_env"])


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
