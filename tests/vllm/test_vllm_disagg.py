"""Disaggregated prefill/decode between real vLLM servers over the tensorfabric connector.

One prefill and one decode server (each on its own CPU and its own emulated host) and the
proxy are shared by the module; the last two tests kill one of them mid-transfer (the decode
server is restarted in between, tcp-only). Outputs are compared with the prefill server
answering on its own (a plain vLLM instance: no ``kv_transfer_params``), token for token.
The proxy's first request to a prefill server is sequential (pull: the decode server takes
the blocks after the prefill); the later ones push (both servers get the request at once and
the prefill server writes layers into the decode server's blocks while it computes them).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.vllm import complete, metric, pick_cpus, read_events, wait_for

pytestmark = [pytest.mark.timeout(1500)]


SHORT = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):",
         "List three primary colours:", "Water boils at", "The opposite of hot is",
         "Once upon a time, a robot", "2 + 2 ="]
LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(100))
# the kill tests: ~370 tokens (3 KV blocks) keep several transfers in flight at a quarter of
# LONG's prefill time
MID = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(25))
HOLD_S = 8.0        # how long the prefill server keeps blocks nobody asked for
TIMEOUT_S = 20.0    # how long the decode server waits for a transfer
USAGE = "vllm:kv_cache_usage_perc"


def connector(role: str, stats: Path, host: str, **options: Any) -> dict[str, Any]:
    from tensorfabric.vllm import kv_transfer_config

    return kv_transfer_config(role, host=host, hold_s=HOLD_S, timeout=TIMEOUT_S,
                              heartbeat_s=0.3, stats_file=str(stats), **options)


class Pair:
    """The prefill server on host 0, the decode server on host 1, the proxy and the test's
    requests on host 2 of a NetnsHosts fabric (the root namespace's loopback where network
    namespaces cannot be built). The first decode server takes KV over shared memory (the
    namespaces share one kernel, as processes on one machine do); the one restarted after
    the decode-kill test is tcp-only, so the prefill server writes to it over the fabric.
    The first pair runs vLLM's own CPU default, the model worker in a process of its own
    (the connector's scheduler half and worker half apart, their metadata pickled between
    them: what a user's own ``vllm serve`` with this connector runs); the restarted decode
    server runs the worker inside the engine core, as the servers tensorfabric starts do."""

    def __init__(self, start: Any, stats: Path) -> None:
        from tensorfabric.testing.netns import NetnsHosts, netns_unavailable_reason

        self.start, self.stats = start, stats
        self.cpus = pick_cpus(2)
        self.env = {"TENSORFABRIC_SECRET": "vllm-test-secret"}
        self.fab = NetnsHosts(3, rate="10gbit") if netns_unavailable_reason() is None else None
        self._inside = None
        if self.fab is not None:
            self._inside = self.fab.inside(2)
            self._inside.__enter__()   # this thread (and threads it starts) live on host 2
        p = self._server("prefill", 0, wait=False)
        self.decode = self._server("decode", 1)
        self.prefill = p.wait_ready(900)
        self.baseline: dict[str, list[int]] = {}
        self.proxy: Any = None
        self.restart_proxy()

    def host(self, i: int) -> str:
        return self.fab.addr(i) if self.fab is not None else "127.0.0.1"

    def _server(self, role: str, i: int, *, name: str | None = None, wait: bool = True,
                worker_process: bool = True, **options: Any) -> Any:
        ns = self.fab.ns[f"h{i}"] if self.fab is not None else None
        env = {**self.env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if worker_process else "0"}
        return self.start(name or role, cpus=self.cpus[i], wait=wait, env=env,
                          host=self.host(i), netns=ns,
                          kv_transfer_config=connector(role, self.stats, self.host(i), **options))

    def restart_proxy(self) -> None:
        from tensorfabric.vllm._proxy import DisaggProxy

        if self.proxy is not None:
            self.proxy.close()
        self.proxy = DisaggProxy([self.prefill.url], [self.decode.url], host=self.host(2)).start()

    def restart_decode_tcp(self, wait: bool = True) -> None:
        self.decode = self._server("decode", 1, name="decode-tcp", transports=["tcp"],
                                   wait=False, worker_process=False)
        self._decode_ready = False
        if wait:
            self.decode_ready()

    def decode_ready(self) -> None:
        if not getattr(self, "_decode_ready", True):
            self.decode.wait_ready(900)
            self._decode_ready = True
            self.restart_proxy()

    def expected(self, prompt: str, max_tokens: int) -> list[int]:
        key = f"{max_tokens}:{prompt}"
        if key not in self.baseline:
            status, body = complete(self.prefill.url, prompt, max_tokens)
            assert status == 200, body
            self.baseline[key] = body["choices"][0]["token_ids"]
        return self.baseline[key]

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for s in (self.prefill, self.decode):
            s.kill()
        if self._inside is not None:
            self._inside.__exit__(None, None, None)
        if self.fab is not None:
            self.fab.close()


@pytest.fixture(scope="module")
def pair(start_vllm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Pair(start_vllm, tmp_path_factory.mktemp("tf-vllm") / "events.jsonl")
    yield p
    p.close()


def loaded(stats: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(stats) if e["event"] == "loaded"]


def test_greedy_output_equals_single_instance_short_and_long(pair: Pair) -> None:
    for (prompt, n), mode in zip(((SHORT[0], 24), (LONG, 16), (SHORT[3], 8)),
                                 ("pull", "push", "push")):
        before = len(loaded(pair.stats))
        since = len(read_events(pair.stats))
        status, body = complete(pair.proxy.url, prompt, n)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == pair.expected(prompt, n)
        new = loaded(pair.stats)[before:]
        assert len(new) == 1, "the decode server did not load the prompt's KV blocks"
        assert new[0]["mode"] == mode
        if mode == "push":
            pushed = [e for e in read_events(pair.stats)[since:] if e["event"] == "pushed"]
            assert len(pushed) == 1 and pushed[0]["bytes"] == new[0]["bytes"], pushed
            if prompt is LONG:
                # written from save_kv_layer, during the prefill's forward pass (seconds long
                # for LONG; a short prompt's pass can end before the decode server's grant
                # arrives, and then everything is written after it: a race, not a fault)
                assert pushed[0]["early_writes"] >= 1, pushed
        prompt_tokens = body["usage"]["prompt_tokens"]
        if prompt is LONG:
            assert 1400 <= prompt_tokens <= 1700
        # every prompt block of all 30 layers crossed, over shared memory on one host
        assert new[0]["bytes"] >= prompt_tokens * 30 * 2 * 3 * 64 * 4
        assert new[0]["shm"] is True


def test_eight_concurrent_requests(pair: Pair) -> None:
    expected = {p: pair.expected(p, 20) for p in SHORT}
    before = len(loaded(pair.stats))
    results: dict[str, Any] = {}

    def one(p: str) -> None:
        results[p] = complete(pair.proxy.url, p, 20)

    threads = [threading.Thread(target=one, args=(p,)) for p in SHORT]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for p in SHORT:
        status, body = results[p]
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == expected[p], p
    assert len(loaded(pair.stats)) - before == len(SHORT)
    # every block returned on both sides once the transfers are done
    for url in (pair.prefill.url, pair.decode.url):
        assert wait_for(lambda: metric(url, USAGE) == 0.0, 30), (url, metric(url, USAGE))


def _fire(url: str, prompts: list[str], n: int) -> tuple[list[threading.Thread], dict[int, Any]]:
    out: dict[int, Any] = {}

    def one(i: int, p: str) -> None:
        try:
            out[i] = complete(url, p, n, timeout=240)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a clean failure
            out[i] = (0, {"error": repr(exc)})

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads, out


def _variants(k: int) -> list[str]:
    return [f"Request {i}. " + MID for i in range(k)]


def test_decode_killed_mid_transfer_prefill_frees_its_blocks(pair: Pair) -> None:
    before = len(read_events(pair.stats))
    threads, out = _fire(pair.proxy.url, _variants(4), 8)
    # kill the decode server as soon as the first transfer has landed: the rest are queued
    # on the prefill server, granted and not yet pulled, or moving
    assert wait_for(lambda: any(e["event"] in ("sent", "loaded", "pushed")
                                for e in read_events(pair.stats)[before:]), 300)
    pair.decode.kill()
    pair.restart_decode_tcp(wait=False)   # starts while the rest of this test runs
    t0 = time.monotonic()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung after the decode server died"
    assert time.monotonic() - t0 < 240
    # every answer is either whole (it finished before the kill) or a clean error
    for status, body in out.values():
        assert status in (200, 502), body
    # the prefill server frees every block it held for the dead decode server
    assert pair.prefill.alive
    assert wait_for(lambda: metric(pair.prefill.url, USAGE) == 0.0, HOLD_S + 30), \
        metric(pair.prefill.url, USAGE)
    events = read_events(pair.stats)[before:]
    sent = {e["req"] for e in events if e["event"] in ("sent", "send_failed", "expired", "pushed", "push_failed")}
    assert sent, events
    # and keeps serving
    status, body = complete(pair.prefill.url, SHORT[1], 8)
    assert status == 200, body


def test_prefill_killed_mid_transfer_decode_recomputes_or_fails_cleanly(pair: Pair) -> None:
    pair.decode_ready()
    prompts = _variants(4)
    expected = {i: pair.expected(p, 8) for i, p in enumerate(prompts)}
    # the first pair runs vLLM's worker process; the restarted decode server the worker in
    # its engine core (tensorfabric's default): KV moves between the two set-ups
    assert b"(Worker pid=" in pair.prefill._this_start_log()
    assert b"(EngineCore" in pair.decode._this_start_log()
    assert b"(Worker pid=" not in pair.decode._this_start_log()
    # the restarted decode server is tcp-only: the same tokens, KV moved over the fabric
    before = len(loaded(pair.stats))
    status, body = complete(pair.proxy.url, LONG, 16)
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == pair.expected(LONG, 16)
    new = loaded(pair.stats)[before:]
    assert len(new) == 1 and new[0]["shm"] is False, new
    before = len(read_events(pair.stats))
    # a grant from the prefill server that will be dead when the decode server uses it
    status, granted = complete(pair.prefill.url, SHORT[2], 1,
                               kv_transfer_params={"do_remote_decode": True})
    assert status == 200 and granted["kv_transfer_params"]["tf_grant"], granted
    threads, out = _fire(pair.proxy.url, prompts, 8)
    assert wait_for(lambda: any(e["event"] in ("sent", "loaded", "pushed")
                                for e in read_events(pair.stats)[before:]), 300)
    pair.prefill.kill()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung after the prefill server died"
    for i, (status, body) in out.items():
        assert status in (200, 502), body
        if status == 200:   # moved, or recomputed by the decode server: the same tokens
            assert body["choices"][0]["token_ids"] == expected[i]
    # the decode server recomputes a request whose prefill server is gone, and frees blocks
    status, body = complete(pair.decode.url, SHORT[2], 12,
                            kv_transfer_params=granted["kv_transfer_params"])
    assert status == 200, body
    status2, plain = complete(pair.decode.url, SHORT[2], 12)
    assert body["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    assert any(e["event"] == "load_failed" for e in read_events(pair.stats)[before:])
    assert wait_for(lambda: metric(pair.decode.url, USAGE) == 0.0, 30), metric(pair.decode.url, USAGE)
