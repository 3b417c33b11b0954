"""``tensorfabric pool up|join|deploy|status|down`` end to end, as a user runs them.

Real ``ray start`` processes with token auth derived from the cluster secret; a node with the
wrong secret cannot join. Everything started here is stopped through its own process (never
``ray stop``, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent

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


def test_pool_cli_up_join_deploy_status_down(tmp_path: Path, child_env: dict[str, str]):
    env = {**child_env, "TENSORFABRIC_SECRET": SECRET, "COLUMNS": "200"}
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{HERE}"  # pool_apps, for the replicas
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    node_args = ["--address", addr, "--region", "eu-west", "--zone", "eu-west-a",
                 "--country", "DE", "--provider", "datacenter", "--gpu-model", "A100",
                 "--gpu-memory-gb", "16", "--link-tier", "low", "--simulated",
                 "--num-gpus", "1", "--num-cpus", "1"]  # fmt: skip
    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}")  # noqa: E731
    up = Proc(["pool", "up", "--port", str(port), "--block", "--num-cpus", "1"], env)
    node = None
    try:
        up.wait_for("pool controller ready")
        mark("up")
        # The wrong secret derives the wrong Ray token: the GCS refuses the node (Ray retries
        # for ~20 s before giving up, so this runs alongside the good join).
        intruder = subprocess.Popen(
            [sys.executable, "-m", "tensorfabric", "pool", "join", *node_args, "--secret",
             "not-the-secret"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        node = Proc(["pool", "join", *node_args, "--block"], env)
        node.wait_for("verified: ok")
        mark("join")

        spec = tmp_path / "sq.yaml"
        spec.write_text("name: sq\nreplicas: 1\nregions: ['eu-*']\ngpus: [H100, A100]\n"
                        "verified_only: true\nallow_simulated: true\nnum_cpus: 0\n"
                        "run:\n  function: pool_apps:square\n")  # fmt: skip
        out = cli(["pool", "deploy", str(spec), "--address", addr], env)
        assert out.returncode == 0 and "sq: 1/1 replicas ready" in out.stdout, out.stderr
        assert "zone eu-west-a" in out.stdout

        mark("deploy")
        st = cli(["pool", "status", "--address", addr], env)
        assert st.returncode == 0, st.stderr
        assert "eu-west-a" in st.stdout and "A100 (sim)" in st.stdout and "1/1" in st.stdout

        mark("status")
        impossible = tmp_path / "ap.yaml"
        impossible.write_text("name: ap\nregions: ['ap-*']\nallow_simulated: true\nrun:\n  function: pool_apps:square\n")
        bad = cli(["pool", "deploy", str(impossible), "--address", addr], env)
        assert bad.returncode == 1 and "unmet requirement regions" in bad.stderr, bad.stderr

        mark("impossible")
        down = cli(["pool", "down", "--address", addr], env)
        assert down.returncode == 0 and "removed: sq" in down.stdout, down.stderr
        out_, err_ = intruder.communicate(timeout=90)
        assert intruder.returncode == 1 and "failed" in err_, out_ + err_
        mark("intruder refused")
        js = cli(["pool", "status", "--address", addr, "--json"], env)
        nodes = json.loads(js.stdout[js.stdout.index("{"):])["nodes"]
        assert len([n for n in nodes if n["alive"]]) == 2  # head + node: the intruder is out
    finally:
        for p in (node, up):  # stop both at once: each takes seconds to wind down
            if p is not None and p.p.poll() is None:
                p.p.terminate()
        for p in (node, up):
            if p is not None:
                p.stop()
