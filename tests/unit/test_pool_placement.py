"""Placement when Ray's resource view lags (a loaded head): the real controller over the
simulated backend of bench/pool_scale.py, with a view that reports every GPU busy and placement
groups that commit only when given a few seconds (as a loaded Ray does).

Two bugs behind the flake of tests/ray/test_pool.py::test_node_loss_replaces_replica_in_another_zone
(the replacement landed in the dead zone, 1 run in a few): the failover order's first step
("away from every used and dead zone") ended with the deployment's plain candidates when no such
zone existed, so Ray picked any matching node, the dead zone's included, before "away from the
dead zone" was tried; and a node the stale view called busy got only a 1.5 s try, which a loaded
Ray does not commit a placement group in (a deploy could fail outright).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from pool_scale import SimBackend  # noqa: E402  (bench/pool_scale.py)

from tensorfabric.pool import _controller  # noqa: E402
from tensorfabric.pool import _labels as L  # noqa: E402
from tensorfabric.pool._controller import PoolController  # noqa: E402
from tensorfabric.pool._labels import NodeClaims  # noqa: E402
from tensorfabric.pool._state import StateStore  # noqa: E402

COMMIT_S = 3.0  # what a placement group needs on this "loaded" head


class StaleView(SimBackend):
    """Every node looks fully busy to the controller; a reservation needs COMMIT_S."""

    def __init__(self) -> None:
        super().__init__(random.Random(0))
        self.tries: list[tuple[str, float]] = []  # (zone asked for, wait given)

    def nodes(self) -> list[Any]:
        return [dataclasses.replace(v, available_gpus=0.0) for v in super().nodes()]

    def reserve(self, bundle: dict[str, float], selector: dict[str, str], wait_s: float, name: str) -> Any:
        self.tries.append((selector.get(L.ZONE, "*"), wait_s))
        if wait_s < COMMIT_S:
            return None  # not committed in time: Ray's placement group is still pending
        return super().reserve(bundle, selector, wait_s, name)

    def add_node(self, zone: str, gpus: float) -> str:
        claims = NodeClaims("eu-west", zone, "DE", "datacenter", "A100", 16, "high")
        nid = self.add(labels={**claims.to_labels(), L.JOIN_ID: f"{zone}-{len(self.nodes_)}"})
        self.nodes_[nid] = (self.nodes_[nid][0], gpus)
        self.free[nid] = gpus
        return nid


@pytest.fixture
def ctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(_controller, "load_factor", lambda inflight=1: 1.0)  # an idle machine's allowance
    sim = StaleView()
    nodes = {"a1": sim.add_node("eu-west-a", 1), "a2": sim.add_node("eu-west-a", 1),
             "b": sim.add_node("eu-west-b", 2)}  # fmt: skip
    c = PoolController(backend=sim, store=StateStore(str(tmp_path / "state.jsonl"), use_kv=False),
                       monitor=False)  # fmt: skip
    c.verify_pending()
    yield c, sim, nodes
    c.shutdown()


def test_a_stale_view_does_not_fail_a_deploy(ctl: Any) -> None:
    c, sim, _ = ctl
    status = c.deploy({"name": "ha", "replicas": 2, "gpus": ["A100"], "regions": ["eu-west"],
                       "run": {"actor": "app:Model"}})  # fmt: skip
    zones = sorted(r["zone"] for r in status["replicas"])
    assert zones == ["eu-west-a", "eu-west-b"], status
    assert all(w >= COMMIT_S for _, w in sim.tries), sim.tries


def test_a_lost_replica_goes_to_the_zone_with_a_spare_gpu(ctl: Any) -> None:
    c, sim, nodes = ctl
    status = c.deploy({"name": "ha", "replicas": 2, "gpus": ["A100"], "regions": ["eu-west"],
                       "run": {"actor": "app:Model"}})  # fmt: skip
    victim = next(r for r in status["replicas"] if r["zone"] == "eu-west-a")
    sim.kill(victim["node_id"])
    c.check_once()
    dep = c.status()["deployments"][0]
    replaced = [e for e in dep["events"] if e["event"] == "replaced"]
    assert dep["state"] == "ready" and replaced, dep
    assert replaced[0]["from_zone"] == "eu-west-a" and replaced[0]["zone"] == "eu-west-b", dep
    assert replaced[0]["node"] == nodes["b"]
