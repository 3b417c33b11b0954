"""Kill the pool's head mid-deployment and start it again, with the CLI as a user runs it.

Real ``ray start`` processes: a head (``pool up --block``) and two nodes (``pool join
--block``). The head's whole process group is killed with SIGKILL while a second deployment
is starting; a new head on the same port reloads the checkpoint, the nodes rejoin by
themselves, and both deployments answer again. Everything started here is stopped through
its own process group (never ``ray stop``, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from test_cli import SECRET, Proc, cli, free_port  # noqa: E402

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CALL = """
import os, sys
from tensorfabric.pool import Pool
from tensorfabric.pool._cluster import use_secret
use_secret(os.environ["TENSORFABRIC_SECRET"])
pool = Pool(sys.argv[1], create=False)
print("ANSWER", pool.handle(sys.argv[2]).call(*[int(a) for a in sys.argv[3:]], timeout=20))
"""


class Group(Proc):
    """A CLI process in its own process group, so a test can kill it with all its Ray children."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "tensorfabric", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def kill_group(self) -> None:
        """SIGKILL the group and wait until none of its processes runs (zombies aside)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_running(self.p.pid):
            time.sleep(0.2)


def _gcs_clients(port: int) -> bool:
    """Whether a local process still has ``--gcs-address=...:port`` on its command line."""
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmd.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"--gcs-address=") and a.endswith(b":%d" % port) for a in args):
            return True
    return False


def _group_running(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(45)
            except subprocess.TimeoutExpired:
                self.kill_group()


def answers(addr: str, name: str, env: dict[str, str], *args: int, deadline: float) -> str:
    """Call deployment ``name`` from a fresh driver until it answers or ``deadline`` passes."""
    last = ""
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", CALL, addr, name, *map(str, args)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        if out.returncode == 0 and "ANSWER" in out.stdout:
            return out.stdout.split("ANSWER", 1)[1].strip().splitlines()[0]
        last = (out.stderr or out.stdout).strip().splitlines()[-1:]
        time.sleep(2)
    raise AssertionError(f"{name} did not answer in time; last: {last}")


def test_head_killed_mid_deployment_comes_back(tmp_path: Path, child_env: dict[str, str]):
    env = {**child_env, "TENSORFABRIC_SECRET": SECRET, "COLUMNS": "200"}
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{HERE}"
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    state = tmp_path / "state"
    up_args = ["pool", "up", "--port", str(port), "--block", "--num-cpus", "1",
               "--state-dir", str(state)]  # fmt: skip
    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}", flush=True)  # noqa: E731
    procs: list[Group] = []
    try:
        up = Group(up_args, env)
        procs.append(up)
        up.wait_for("pool controller ready")
        for zone in ("eu-west-a", "eu-west-b"):
            node = Group(["pool", "join", "--address", addr, "--region", "eu-west", "--zone", zone,
                          "--gpu-model", "A100", "--gpu-memory-gb", "16", "--simulated",
                          "--num-gpus", "1", "--num-cpus", "1", "--block"], env)  # fmt: skip
            procs.append(node)
            node.wait_for("verified: ok", timeout=240)  # one at a time: a 2-core CI machine
        mark("head + 2 verified nodes")
        sq = tmp_path / "sq.yaml"
        sq.write_text("name: sq\nregions: [eu-west]\ngpus: [A100]\nverified_only: true\n"
                      "allow_simulated: true\nnum_cpus: 0\nrun:\n  function: pool_apps:square\n")  # fmt: skip
        out = cli(["pool", "deploy", str(sq), "--address", addr], env)
        assert out.returncode == 0, out.stderr
        assert answers(addr, "sq", env, 7, deadline=time.monotonic() + 60) == "49"
        before = json.loads(cli(["pool", "status", "--address", addr, "--json"], env).stdout)
        verified_at = {n["labels"]["tensorfabric.io/join-id"]: n["verified_at"]
                       for n in before["nodes"] if n["verified"]}  # fmt: skip
        assert len(verified_at) == 2
        mark("sq deployed and answering")

        # A second deployment is starting (its replica takes 3 s to construct) when the head dies.
        started = tmp_path / "started"
        slow = tmp_path / "slow.yaml"
        slow.write_text("name: slow\nregions: [eu-west]\ngpus: [A100]\nallow_simulated: true\n"
                        f"num_cpus: 0\nrun:\n  actor: pool_apps:SlowStart\n  kwargs: {{path: '{started}', delay_s: 3}}\n")  # fmt: skip
        deploying = subprocess.Popen([sys.executable, "-m", "tensorfabric", "pool", "deploy", str(slow),
                                      "--address", addr], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 90
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the second deployment never started a replica"
        up.kill_group()
        mark("head killed mid-deployment")
        deploying.kill()  # its client connection died with the head; the deploy lives on
        deploying.wait(30)
        # On one host, 'ray start --head' refuses while any local Ray process still names the
        # old GCS address (the nodes' raylets, until they notice the loss; on real machines
        # they run elsewhere). Their join loops stop them within ~10-15 s.
        deadline = time.monotonic() + 90
        while _gcs_clients(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        mark("nodes noticed the loss")

        up2 = Group(up_args, env)
        procs.append(up2)
        up2.wait_for("pool controller ready", timeout=120)
        restored = up2.wait_for("restored:", timeout=10)
        assert "2 verification record(s)" in restored, restored
        t_up = time.monotonic()
        mark("head restarted")
        try:
            assert answers(addr, "sq", env, 9, deadline=t_up + 60) == "81"
        except AssertionError:
            print(cli(["pool", "status", "--address", addr, "--json"], env).stdout[-3000:])
            raise
        mark("sq answers again")
        try:
            # It had no replica yet and waits for the second node to rejoin: more time on a
            # loaded 2-core machine, where a node's "ray start" can time out and be retried.
            assert answers(addr, "slow", env, deadline=t_up + 240)
        except AssertionError:
            print(cli(["pool", "status", "--address", addr, "--json"], env).stdout[-3000:])
            for node in procs[1:3]:
                print("---- node output\n" + "".join((node.seen + _drain(node))[-40:]))
            raise
        mark("slow answers")
        for node in procs[1:3]:
            assert any("rejoining" in line for line in node.seen + _drain(node)), node.seen[-5:]
        after = json.loads(cli(["pool", "status", "--address", addr, "--json"], env).stdout)
        alive = [n for n in after["nodes"] if n["alive"] and not n["head"]]
        assert len(alive) == 2
        by_join = {n["labels"]["tensorfabric.io/join-id"]: n for n in alive}
        assert set(by_join) == set(verified_at)  # the same nodes, rejoined under the same join ids
        for key, n in by_join.items():  # their verdicts survived (carried over, or re-checked since)
            assert n["verified"], n
            assert n["carried_over"] or n["verified_at"] > verified_at[key]
        deps = {d["name"]: d for d in after["deployments"]}
        assert deps["sq"]["ready"] == 1 and deps["slow"]["ready"] == 1
        assert any(e["event"] == "restored" for e in deps["sq"]["events"])
    finally:
        for p in reversed(procs):
            if p.p.poll() is None:
                os.killpg(p.p.pid, signal.SIGTERM)
        for p in reversed(procs):
            p.stop()


def _drain(p: Proc) -> list[str]:
    out = []
    while not p.lines.empty():
        line = p.lines.get()
        p.seen.append(line)
        out.append(line)
    return out
