"""Helpers for running the ``tensorfabric pool`` CLI as a user runs it, and the CLI checks
that need no cluster.

``pool up|join|deploy|status|down`` end to end (real ``ray start`` processes with token auth;
a node with the wrong secret cannot join) runs in ``test_pool_head_restart.py``, on the one
cluster that test starts anyway. Everything started is stopped through its own process
(never ``ray stop``, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray")


pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

SECRET = "cli-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background CLI process whose output we can wait on."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "tensorfabric", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.seen)}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(45)
            except subprocess.TimeoutExpired:
                self.p.kill()


def cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorfabric", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_join_block_retries_with_backoff_until_the_head_answers(child_env: dict[str, str]) -> None:
    """``pool join --block`` with no head yet: it says so and retries with growing delays
    (it never exits 0 on its own), and SIGTERM stops it. No Ray process starts here."""
    env = {**child_env, "TENSORFABRIC_SECRET": SECRET}
    port = free_port()  # nothing listens there
    node = Proc(["pool", "join", "--address", f"127.0.0.1:{port}", "--region", "eu-west",
                 "--zone", "eu-west-a", "--block"], env)  # fmt: skip
    try:
        first = node.wait_for("(attempt 1)", timeout=60)
        assert f"cannot reach the pool head at 127.0.0.1:{port}" in first and "retrying in 2 s" in first
        second = node.wait_for("(attempt 2)", timeout=30)
        assert "retrying in 4 s" in second
        assert node.p.poll() is None  # still trying
    finally:
        node.stop()
    assert node.p.returncode is not None
