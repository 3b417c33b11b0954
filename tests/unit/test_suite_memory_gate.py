"""The suite's memory gate for vLLM modules (tests/helpers/vllm.py): two xdist workers must not
run more vLLM servers at once than the machine holds, and a killed worker's share is freed."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.vllm import memory_share

HOLD = """
import sys, time
sys.path.insert(0, {helpers!r})
from helpers.vllm import memory_share
with memory_share(sys.argv[1], float(sys.argv[2]), timeout=60, budget=10.0) as share:
    print("held", round(share.waited_s, 1), flush=True)
    time.sleep(float(sys.argv[3]))
    print("releasing", flush=True)
"""


def holder(name: str, gib: float, hold_s: float, env: dict[str, str]) -> subprocess.Popen[str]:
    code = HOLD.format(helpers=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-c", code, name, str(gib), str(hold_s)], env=env,
                            stdout=subprocess.PIPE, text=True)


@pytest.fixture
def gate_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import os

    monkeypatch.setenv("TF_TEST_GATE_DIR", str(tmp_path))
    return {**os.environ, "TF_TEST_GATE_DIR": str(tmp_path)}


def test_a_share_that_does_not_fit_waits_for_the_holder(gate_env: dict[str, str]) -> None:
    first = holder("a", 7.0, 3.0, gate_env)
    assert first.stdout is not None and first.stdout.readline().startswith("held")
    t0 = time.monotonic()
    with memory_share("b", 7.0, timeout=60, budget=10.0) as share:  # 7 + 7 > 10: waits for a
        # a says so before it drops its share: b got in only after that line (not blocking)
        ready, _, _ = select.select([first.stdout.fileno()], [], [], 0.5)
        assert ready, "b got its share while a still held 7 of 10 GiB"
        assert share.waited_s > 0.5
    assert time.monotonic() - t0 < 60
    first.wait(10)


def test_shares_that_fit_run_together_and_one_alone_always_runs(gate_env: dict[str, str]) -> None:
    first = holder("a", 4.0, 30.0, gate_env)
    try:
        assert first.stdout is not None and first.stdout.readline().startswith("held")
        with memory_share("b", 5.0, timeout=5, budget=10.0) as share:  # 4 + 5 <= 10
            assert share.waited_s < 5
    finally:
        first.kill()
        first.wait(10)
    with memory_share("big", 50.0, timeout=5, budget=10.0) as share:  # alone: runs (capped)
        assert share.gib == 10.0


def test_a_killed_holders_share_is_freed(gate_env: dict[str, str], tmp_path: Path) -> None:
    first = holder("a", 9.0, 300.0, gate_env)
    assert first.stdout is not None and first.stdout.readline().startswith("held")
    first.kill()
    first.wait(10)
    with memory_share("b", 9.0, timeout=10, budget=10.0) as share:
        assert share.waited_s < 10
        held = json.loads((tmp_path / "tensorfabric-test-memory-gate.json").read_text())
        assert [h["name"] for h in held] == ["b"]
    assert json.loads((tmp_path / "tensorfabric-test-memory-gate.json").read_text()) == []
