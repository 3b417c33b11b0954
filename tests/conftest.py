"""Fixtures shared by every test tier."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.fixture
def child_env() -> dict[str, str]:
    return subprocess_env()


@pytest.fixture
def python() -> str:
    return sys.executable


# The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml).
# Every test gets an ``xdist_group``: its module, so module-scoped fixtures (served stacks,
# clusters, loaded models) start once, on one worker; the whole vLLM tier and the whole Ray
# tier are one group each (the vLLM modules run one after the other: two at once on two cores
# were slower, tests/vllm/conftest.py; the Ray cluster is session-wide). Groups are queued
# heaviest first (vLLM, Ray, slow integration modules, the rest) so the two workers finish
# together; xdist keeps this order with ``--no-loadscope-reorder``. Without xdist
# (``-p no:xdist``) the same order still holds.
_SHARED_GROUPS = {"vllm": 0, "ray": 1}


def _group(item: pytest.Item) -> tuple[int, str]:
    path = Path(str(item.fspath)).resolve().relative_to(Path(__file__).resolve().parent)
    tier = path.parts[0] if len(path.parts) > 1 else ""
    if tier in _SHARED_GROUPS:
        return _SHARED_GROUPS[tier], tier
    slow = item.get_closest_marker("slow") is not None
    rank = {"integration": 2, "transports": 4, "unit": 5}.get(tier, 6)
    return (rank if not slow else min(rank, 3)), path.as_posix()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = [_group(item) for item in items]
    rank: dict[str, int] = {}
    cluster: set[str] = set()  # modules on the Ray tier's shared cluster (tests/ray/conftest.py)
    for (r, name), item in zip(groups, items):
        item.add_marker(pytest.mark.xdist_group(name))
        rank[name] = min(r, rank.get(name, r))  # a module's tests stay together
        if "pool_cluster" in getattr(item, "fixturenames", ()):
            cluster.add(str(item.fspath))
    # within a group, the modules that use that cluster first, one after the other: it starts
    # once and stops after the last of them instead of idling beside the rest of the suite
    order = sorted(range(len(items)),
                   key=lambda i: (rank[groups[i][1]], str(items[i].fspath) not in cluster, i))
    items[:] = [items[i] for i in order]


# ``TF_TEST_TIMELINE=FILE``: one JSON line per test (worker, test id, start and end, wall
# seconds since the epoch, setup and teardown included, and the outcome), to see where a run's
# time went, how the two workers overlapped (docs/benchmarks.md, the suite sections) and what
# failed while the run still goes (pytest-xdist prints failures only at the end).
_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item.stash[_OUTCOME] = f"failed in {report.when}"
    elif report.skipped and _OUTCOME not in item.stash:
        item.stash[_OUTCOME] = "skipped"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    start = time.time()
    yield
    path = os.environ.get("TF_TEST_TIMELINE")
    if path:
        line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid,
                "start": round(start, 3), "end": round(time.time(), 3),
                "outcome": item.stash.get(_OUTCOME, "passed")}  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
