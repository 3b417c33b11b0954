"""vLLM servers as Ray actors on one (local, throwaway) Ray cluster shared by the module:
``tensorfabric vllm-disagg --ray-address`` (the prefill and decode instances start as actors,
and the proxy in front of them gives the same greedy tokens as the prefill instance answering
on its own) and ``tensorfabric weights publish --ray-address`` (a replica started as an actor
takes an update and answers with the new version)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.vllm import complete, subprocess_env

pytestmark = [pytest.mark.timeout(1200)]
pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent
KEY = "vllm-ray-test-key"
LIST_ACTORS = """
import json, sys, ray
from tensorfabric.vllm._ray import NAMESPACE
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE]))
"""


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """(GCS address, the environment its clients need) of a local 2-CPU Ray cluster."""
    # Ray 2.60's local clusters take a token (~/.ray/auth_token); clients must ask for it
    env = subprocess_env(RAY_AUTH_MODE="token")
    head = subprocess.Popen([sys.executable, str(HERE / "_ray_head.py"), "2"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert head.stdout is not None
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        yield address, env
    finally:
        if head.stdin is not None:
            head.stdin.close()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_vllm_disagg_places_instances_as_ray_actors(tmp_path: Path,
                                                    ray_head: tuple[str, dict[str, str]]) -> None:
    address, env = ray_head
    cli = None
    try:
        log = open(tmp_path / "cli.log", "w")
        cli = subprocess.Popen(
            [sys.executable, "-m", "tensorfabric", "vllm-disagg", "--ray-address", address,
             "--port", "0", "--kv-space", "1", "--api-key", KEY],
            env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        assert cli.stdout is not None
        url = cli.stdout.readline().strip()
        assert url.startswith("http://"), (tmp_path / "cli.log").read_text()[-3000:]
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            health = json.loads(r.read())
        assert health["ok"] and len(health["prefill"]) == len(health["decode"]) == 1
        prompt = "Item 1: the quick brown fox jumps over the lazy dog. " * 12
        # --api-key: the proxy and the instances (vLLM itself, its key sent to the actors)
        # refuse a request without it
        for where in (url, health["prefill"][0], health["decode"][0]):
            status, body = complete(where, prompt, 2, key=None if where == url else "wrong")
            assert status == 401, (where, body)
        for p in (prompt, prompt + " Again:"):   # the first request pulls, the second pushes
            status, body = complete(url, p, 12, key=KEY)
            assert status == 200, body
            status, alone = complete(health["prefill"][0], p, 12, key=KEY)
            assert status == 200, alone
            assert body["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
        # the instances are (named) Ray actors of that cluster (asked from another process:
        # this one may be connected to another Ray cluster already)
        names = json.loads(subprocess.run(
            [sys.executable, "-c", LIST_ACTORS, address], env=env, capture_output=True,
            text=True, timeout=120, check=True).stdout.strip().splitlines()[-1])
        assert sorted(n.split("-")[0] for n in names) == ["decode", "prefill"], names
    finally:
        if cli is not None:
            cli.terminate()   # SIGTERM: the command stops its instances (actors) and exits
            try:
                cli.wait(120)
            except subprocess.TimeoutExpired:
                cli.kill()


def test_weights_publish_starts_replicas_as_ray_actors(tmp_path: Path,
                                                      ray_head: tuple[str, dict[str, str]]) -> None:
    """One replica, one fake training step: the actor's server joins the publisher at its
    node address, switches to version 1 and says so in its answer's version header."""
    address, env = ray_head
    log = tmp_path / "publish.log"
    with open(log, "w") as err:
        out = subprocess.run(
            [sys.executable, "-m", "tensorfabric", "weights", "publish", "--ray-address", address,
             "--replicas", "1", "--steps", "1"],
            env={**env, "TENSORFABRIC_SECRET": "ray-weights-test"}, stdout=subprocess.PIPE,
            stderr=err, text=True, timeout=1100, start_new_session=True)
    assert out.returncode == 0, out.stdout + log.read_text()[-3000:]
    assert "version 1: serving on ['vllm-0']" in out.stdout, out.stdout
    assert "  vllm-0 [version 1]:" in out.stdout, out.stdout
