"""Admission control's estimate, and the router's cheap task-kind signal."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from tensorfabric.split import ConfidencePolicy, RouteRequest, SplitConfigError
from tensorfabric.split._admission import TierLoad
from tensorfabric.split._errors import Overloaded, QueueFull
from tensorfabric.split._routing import TASK_KINDS, task_kind


def test_unmeasured_tier_admits_everything() -> None:
    TierLoad("edge").admit(ahead=10_000, budget=1.0)


def test_refuses_when_the_queue_would_miss_the_timeout() -> None:
    t = TierLoad("edge", slots=1)
    t.observe(2.0)
    t.admit(ahead=3, budget=10.0)  # 4 x 2 s = 8 s: in time
    with pytest.raises(QueueFull) as e:
        t.admit(ahead=5, budget=10.0)  # 6 x 2 s = 12 s: would miss it
    assert isinstance(e.value, Overloaded) and e.value.retry_after == 2
    assert "server.request_timeout" in str(e.value)


def test_batched_tier_drains_ahead_by_its_slots() -> None:
    t = TierLoad("cloud", slots=64)
    t.observe(3.0)
    t.admit(ahead=63, budget=4.0)  # one batch: 3 s
    with pytest.raises(QueueFull):
        t.admit(ahead=64, budget=4.0)  # a second batch: 6 s
    t.admit(ahead=64, budget=4.0, slots=128)  # the cloud reported more slots


def test_moving_average_follows_the_hold_time() -> None:
    t = TierLoad("edge", alpha=0.5)
    t.observe(4.0)
    t.observe(2.0)
    assert t.mean_hold == pytest.approx(3.0)


def test_task_kinds_of_the_shipped_prompt_set() -> None:
    data = json.loads(resources.files("tensorfabric.split").joinpath("data/routing_prompts.json").read_text())
    rows = data["prompts"]
    assert {r["kind"] for r in rows} == set(TASK_KINDS)
    hits = sum(task_kind(r["prompt"]) == r["kind"] for r in rows)
    assert hits >= 0.9 * len(rows)  # the rules were written against this set: a sanity floor


def test_cloud_kinds_route_before_any_probe() -> None:
    p = ConfidencePolicy(cloud_kinds=["code"])
    d = p.pre_route(RouteRequest(10, 16, text="Write a Python function that adds two numbers."))
    assert d is not None and d.tier == "cloud" and d.reason == "task_kind"
    assert p.pre_route(RouteRequest(10, 16, text="What is the capital of Peru?")) is None
    with pytest.raises(SplitConfigError, match="unknown kind"):
        ConfidencePolicy(cloud_kinds=["poetry"])
