"""RL weight updates into running vLLM servers over tensorfabric (real vLLM, two replicas for
the whole module; the tests run in order and build on each other's versions).

Each replica loads tensorfabric's worker extension and middleware; the trainer (this process,
or a child process for the kill test) publishes perturbed copies of the model. The model is a
4-layer Llama with random weights (``vllm_tiny_model``, ~5 MB) served by real vLLM: what is
tested is how versions move, verify and switch, which does not depend on the model's size, and
a copy of the default model (540 MB) made every update cost most of the module's CPU (~500 s
of ~700; docs/benchmarks.md). The default model's updates are measured by
``bench/vllm_weights.py``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tensorfabric as tf
from tensorfabric.vllm._weights_fleet import VllmPublishResult
from tensorfabric.weights import Faults

from helpers.vllm import pick_cpus, subprocess_env

pytestmark = [pytest.mark.timeout(1500)]


SECRET = "vllm-weights-test"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a robot"]
HEADER = "x-tensorfabric-weights-version"
HERE = Path(__file__).resolve().parent


def ask(url: str, prompt: str, max_tokens: int = 16) -> tuple[str, str]:
    """A greedy completion: (text, the weights version header)."""
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["text"], r.headers.get(HEADER, "")


def answers(url: str) -> list[str]:
    return [ask(url, p)[0] for p in PROMPTS]


class Drill:
    """The module's shared state: the two servers, the trainer's tensors and its publisher."""

    def __init__(self, start_vllm: Callable[..., Any], folder: str, tmp: Path) -> None:
        from tensorfabric.vllm._weights_fleet import VllmWeights, vllm_plan, weights_server_args
        from tensorfabric.vllm._weights_trainer import trainer_tensors

        self.start_vllm, self.folder, self.tmp = start_vllm, folder, tmp
        cpus = pick_cpus(2)
        # a: vLLM's own CPU default, the model worker in a process of its own (the weight
        # extension's RPC arguments pickled from the engine core to it: a user's own `vllm
        # serve`); b: the worker inside the engine core, as the servers tensorfabric starts
        self.servers = {n: start_vllm(f"weights-{n}", wait=False, cpus=c, args=weights_server_args(),
                                      model=folder,
                                      env={"TENSORFABRIC_SECRET": SECRET,
                                           "VLLM_ENABLE_V1_MULTIPROCESSING": mp})
                        for n, c, mp in zip("ab", cpus, "10")}
        self.tensors = trainer_tensors(folder)
        self.plan = vllm_plan(self.tensors)
        self.engine = tf.Engine(secret=SECRET)
        for s in self.servers.values():
            s.wait_ready(900)
        self.fleet = VllmWeights(self.engine, self.plan, {n: s.url for n, s in self.servers.items()},
                                 secret=SECRET, timeout=30)
        self.v0 = answers(self.servers["a"].url)
        self.seen: dict[int, list[str]] = {0: self.v0}

    def step(self, step: int) -> dict[str, Any]:
        from tensorfabric.vllm._weights_trainer import perturb

        return perturb(self.tensors, step)

    def close(self) -> None:
        self.fleet.close()
        self.engine.close()


@pytest.fixture(scope="module")
def drill(start_vllm: Callable[..., Any], vllm_tiny_model: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    d = Drill(start_vllm, vllm_tiny_model, tmp_path_factory.mktemp("weights"))
    yield d
    d.close()


def test_update_reaches_replicas_and_a_late_joiner_catches_up(drill: Drill) -> None:
    a, b = drill.servers["a"].url, drill.servers["b"].url
    drill.fleet.join("a")
    drill.fleet.publisher.wait_replicas(1, 30)
    res = drill.fleet.publish(drill.step(1))
    assert res.ok and res.serving == ["a"], res
    assert drill.fleet.state("a")["last_path"] == "in-place"  # not vLLM's reload_weights
    v1 = answers(a)
    assert v1 != drill.v0, "the update changed no answer"
    assert ask(a, PROMPTS[0])[1] == "1"
    assert answers(b) == drill.v0 and ask(b, PROMPTS[0])[1] == "0"  # not joined yet
    assert drill.fleet.sync(timeout=120) == {"a": 1, "b": 1}  # b joins late, catches up, switches
    assert answers(b) == v1 and ask(b, PROMPTS[0])[1] == "1"
    drill.seen[1] = v1


def test_requests_during_an_update_get_one_version_never_a_mix(drill: Drill) -> None:
    """Clients keep asking both replicas while version 2 goes out: each answer is the whole
    old answer with header 1 or the whole new one with header 2.

    The update's two halves as ``fleet.publish`` runs them: the new version is written into
    each replica's staging region and verified there (clients ask every second: an answer
    that changed then would be staging leaking into what is served), then each replica
    switches (clients ask back to back, so requests are in flight when the switch drains them
    and queue while it runs). Back-to-back requests through the whole write kept both
    servers' cores busy and tripled its time (220 s of CPU for this test)."""
    urls = [s.url for s in drill.servers.values()]
    prompt = PROMPTS[2]
    old = drill.seen[1][2]
    got: list[tuple[str, str]] = []
    stop = threading.Event()
    pause = [1.0]  # seconds between one client's requests

    def client(url: str) -> None:
        while not stop.is_set():
            got.append(ask(url, prompt))
            stop.wait(pause[0])

    threads = [threading.Thread(target=client, args=(u,)) for u in urls]  # batch of 1: exact tokens
    for t in threads:
        t.start()
    time.sleep(3)
    staged = drill.fleet.publisher.publish(drill.step(2))
    assert sorted(staged.updated) == ["a", "b"] and not staged.failed, staged
    assert {text for text, _ in got} == {old} and {v for _, v in got} == {"1"}, got  # not served yet
    pause[0] = 0.0
    time.sleep(1.0)  # both clients now ask back to back
    res = VllmPublishResult(staged.version, failed=dict(staged.failed), transfer=staged)
    drill.fleet._switch_many(staged.updated, staged.version, res)  # publish's second half
    n_at_switch = len(got)
    deadline = time.monotonic() + 60
    while len(got) < n_at_switch + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(300)
    assert res.ok and sorted(res.serving) == ["a", "b"], res
    new = ask(urls[0], prompt)[0]
    assert new != old
    by_version: dict[str, set[str]] = {}
    for text, version in got:
        by_version.setdefault(version, set()).add(text)
    assert by_version == {"1": {old}, "2": {new}}, by_version
    drill.seen[2] = answers(urls[0])


def test_publisher_killed_mid_update_leaves_the_old_version(drill: Drill) -> None:
    urls = {n: s.url for n, s in drill.servers.items()}
    proc = subprocess.Popen([sys.executable, str(HERE.parent / "helpers" / "vllm_weights_publisher.py"),
                             drill.folder, json.dumps(urls), "3"], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(TENSORFABRIC_SECRET=SECRET))
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("joined 2") and lines[1].startswith("writing"), lines
        time.sleep(3)  # all but the last chunk have landed
        states = {n: drill.fleet.state(n) for n in urls}
        assert all(s["staged"] == 0 and s["version"] == 2 for s in states.values()), states
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for url in urls.values():
        assert answers(url) == drill.seen[2] and ask(url, PROMPTS[0])[1] == "2"
    assert drill.fleet.sync(timeout=120) == {"a": 2, "b": 2}  # back to this publisher
    res = drill.fleet.publish(drill.step(3))
    assert res.ok and sorted(res.serving) == ["a", "b"] and res.version == 3, res
    v3 = answers(urls["a"])
    assert v3 != drill.seen[2] and answers(urls["b"]) == v3
    drill.seen[3] = v3


def test_replica_killed_mid_update_restarts_and_equals_a_fresh_vllm(drill: Drill) -> None:
    """Replica b dies while version 4 is in flight: a keeps version 3. b comes back as a fresh
    vLLM loading version 3 from a safetensors folder: its greedy answers equal a's (updated over
    tensorfabric). It rejoins; both catch up to version 4, and the next update reaches both."""
    from tensorfabric.vllm._launch import VllmServer
    from tensorfabric.vllm._weights_fleet import weights_server_args
    from tensorfabric.vllm._weights_trainer import save_folder

    v3_folder = save_folder(drill.folder, drill.tensors, drill.tmp / "v3")
    drill.fleet.publisher.faults = Faults(drop={len(drill.plan.chunks) - 1})
    out: list[Any] = []
    pub = threading.Thread(target=lambda: out.append(drill.fleet.publish(drill.step(4), timeout=8)))
    pub.start()
    time.sleep(2)
    drill.servers["b"].kill()
    pub.join(120)
    drill.fleet.publisher.faults = Faults()
    res = out[0]
    assert not res.serving and set(res.failed) == {"a", "b"}, res
    a = drill.servers["a"].url
    assert answers(a) == drill.seen[3] and ask(a, PROMPTS[0])[1] == "3"  # the old version intact
    assert drill.fleet.publisher.version == 4  # the trainer's current version: replicas catch up
    fresh = VllmServer(v3_folder, cpus=pick_cpus(2)[1], kv_space_gib=1, args=weights_server_args(),
                       env=subprocess_env(TENSORFABRIC_SECRET=SECRET),
                       log_path=drill.tmp / "b-restarted.log")
    try:
        fresh.start().wait_ready(900)
        assert answers(fresh.url) == drill.seen[3]  # a fresh vLLM on version 3 == a, updated
        drill.fleet.urls["b"] = fresh.url
        assert drill.fleet.sync(timeout=120) == {"a": 4, "b": 4}  # both catch up to 4
        v4 = answers(a)
        assert v4 != drill.seen[3] and answers(fresh.url) == v4
        res = drill.fleet.publish(drill.step(5))
        assert res.ok and sorted(res.serving) == ["a", "b"] and res.version == 5, res
        v5 = answers(a)
        assert v5 != drill.seen[3] and answers(fresh.url) == v5
        assert ask(fresh.url, PROMPTS[0])[1] == "5"
    finally:
        fresh.stop(grace=10)
