"""``tensorfabric weights publish``: play the trainer against N vLLM servers it starts itself."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tensorfabric as tf

from ._launch import VllmServer
from ._weights_fleet import VllmPublishResult, VllmWeights, vllm_plan, weights_server_args
from ._weights_http import HEADER
from ._weights_trainer import perturb, trainer_tensors


def ask(url: str, prompt: str, max_tokens: int = 16) -> tuple[str, str]:
    """A greedy completion from a server started with ``served_model_name="default"``:
    (text, the weights version that served it)."""
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return str(json.loads(r.read())["choices"][0]["text"]), r.headers.get(HEADER, "")


@contextmanager
def weights_servers(n: int, folder: str | Path, secret: str, *, kv_space_gib: int = 1,
                    log_dir: str | Path | None = None,
                    netns: list[str] | None = None, hosts: list[str] | None = None,
                    ray_address: str | None = None, model: str | None = None,
                    ) -> Iterator[list[Any]]:
    """``n`` vLLM servers on ``folder`` with the weight-update extension, one CPU each (round
    robin), started together; stopped on exit. ``netns``/``hosts``: a network namespace and
    listen address per server. ``ray_address``: each server is a Ray actor of that cluster
    instead (one CPU of a node, spread over the nodes; ``model``, or ``folder``, is resolved on
    the node; the server listens on the node's address)."""
    servers: list[Any] = []
    if ray_address:
        from ._ray import RayVllmServer, connect

        connect(ray_address)
        tag = secrets.token_hex(3)
        servers = [RayVllmServer(model or str(folder), name=f"weights-{i}-{tag}",
                                 kv_space_gib=kv_space_gib, args=weights_server_args(),
                                 env={"TENSORFABRIC_SECRET": secret}) for i in range(n)]
    else:
        cpus = sorted(os.sched_getaffinity(0))
        for i in range(n):
            log = Path(log_dir) / f"weights-{i}.log" if log_dir else None
            servers.append(VllmServer(folder, cpus=str(cpus[i % len(cpus)]),
                                      kv_space_gib=kv_space_gib, args=weights_server_args(),
                                      env={"TENSORFABRIC_SECRET": secret}, log_path=log,
                                      netns=netns[i] if netns else None,
                                      host=hosts[i] if hosts else "127.0.0.1"))
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(900)
        yield servers
    finally:
        for s in servers:
            s.stop(grace=10)


def publish_drill(replicas: int, steps: int, *, folder: str | Path, scale: float = 0.05,
                  prompt: str = "The capital of France is", kv_space_gib: int = 1,
                  log_dir: str | Path | None = None, ray_address: str | None = None,
                  model: str | None = None,
                  say: Callable[[str], None] = print) -> list[VllmPublishResult]:
    """Start ``replicas`` vLLM servers, then ``steps`` times: perturb the trainer's copy of the
    model (a fake training step) and publish it; after each, every replica's answer to
    ``prompt`` and the version header that came with it are reported through ``say``.
    ``ray_address``: the servers are actors of that Ray cluster; this process's engine then
    listens on its own node address (the servers' workers reach it there)."""
    secret = os.environ.get("TENSORFABRIC_SECRET") or secrets.token_hex(16)
    tensors = trainer_tensors(folder)
    plan = vllm_plan(tensors)
    results: list[VllmPublishResult] = []
    host = "127.0.0.1"
    if ray_address:
        from ._ray import connect

        connect(ray_address)
        import ray

        host = ray.util.get_node_ip_address()
    with weights_servers(replicas, folder, secret, kv_space_gib=kv_space_gib, log_dir=log_dir,
                         ray_address=ray_address, model=model) as servers, \
            tf.Engine(secret=secret, host=host) as eng:
        fleet = VllmWeights(eng, plan, {f"vllm-{i}": s.url for i, s in enumerate(servers)},
                            secret=secret)
        for name, url in fleet.urls.items():  # each worker's engine listens where its server does
            fleet.hosts[name] = urlsplit(url).hostname or "127.0.0.1"
        try:
            fleet.join_all()
            fleet.watch()  # a server that restarts is caught up and switched
            say(f"{replicas} replica(s) joined; plan: {plan.nbytes / 1e6:.0f} MB in "
                f"{len(plan.chunks)} chunks, {len(plan.layout.specs)} vLLM tensors")
            for step in range(1, steps + 1):
                res = fleet.publish(perturb(tensors, step, scale))
                results.append(res)
                t = res.transfer
                say(f"version {res.version}: serving on {sorted(res.serving)}"
                    + (f", failed {res.failed}" if res.failed else "")
                    + f" in {res.seconds:.2f} s (transfer {t.seconds if t else 0:.2f} s, "
                      f"switch {res.switch_s:.2f} s)")
                for name, url in fleet.urls.items():
                    text, version = ask(url, prompt)
                    say(f"  {name} [version {version}]: {prompt}{text!r}")
        finally:
            fleet.close()
    return results

