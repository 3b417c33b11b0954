"""Disaggregated prefill/decode with the real model in real processes.

One cluster per module: a decode worker and three prefill workers, each its own process with
its own engine. The reference is a single-process greedy run (DynamicCache) in this process.
"""

from __future__ import annotations

import inspect
import os
import signal
import textwrap
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tensorfabric.kv import DisaggregatedCluster, KVLayout, PrefillFailedError  # noqa: E402
from tensorfabric.models import chat_ids, generate, load_model  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK = 16
KV_BLOCKS = 160


def _long_prompt() -> str:
    code = inspect.getsource(textwrap)[:4600]
    return f"Explain what this Python module does, in one sentence.\n\n{code}"


PROMPTS = {  # name: (prompt, max_new_tokens)
    "short": ("What is the capital of France?", 12),
    "medium": ("List three uses of copper and say why each one suits the metal. " * 4 +
               "Answer briefly.", 12),
    "long": (_long_prompt(), 6),
}


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return load_model()


@pytest.fixture(scope="module")
def reference(lm):  # type: ignore[no-untyped-def]
    out = {}
    for name, (prompt, n) in PROMPTS.items():
        ids = chat_ids(lm, prompt)
        out[name] = (ids, generate(lm, ids, max_new_tokens=n).tokens)
    assert len(out["long"][0]) > 1000 and len(out["short"][0]) < BLOCK * 3
    return out


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    with DisaggregatedCluster(prefill_workers=3, kv_blocks=KV_BLOCKS, prefill_blocks=100,
                              block_size=BLOCK, timeout=30, prefill_timeout=120) as c:
        yield c


def test_disaggregated_greedy_output_is_identical(cluster, reference, lm) -> None:  # type: ignore[no-untyped-def]
    """All prompts at once: several prefill workers feed one decode worker; every token matches."""
    layout = KVLayout.for_model(lm, num_blocks=KV_BLOCKS, block_size=BLOCK)
    futures = {name: cluster.submit(reference[name][0], max_new_tokens=n)
               for name, (_, n) in PROMPTS.items()}
    workers = set()
    for name, fut in futures.items():
        ids, want = reference[name]
        got = fut.result(timeout=300)
        assert got.tokens == want, name
        s = got.stats
        assert s.prompt_tokens == len(ids) and s.attempts == 1
        assert s.kv_bytes == layout.kv_bytes(len(ids)) and s.layers == lm.num_layers
        assert s.transfer_busy_s > 0 and s.ttft_s >= s.prefill_s > 0
        workers.add(s.worker)
    assert len(workers) >= 2, "requests in flight together must spread over prefill workers"
    # text prompts are templated by the decode worker exactly like chat_ids()
    text = cluster.generate(PROMPTS["short"][0], max_new_tokens=12, timeout=120)
    assert text.tokens == reference["short"][1] and "Paris" in text.text
    assert cluster.stats()["free_blocks"] == KV_BLOCKS


def test_disaggregated_answer_streams_token_by_token(cluster, reference, lm) -> None:  # type: ignore[no-untyped-def]
    """``on_token`` hears every token from the decode worker before the result arrives, with
    the text each adds; the pieces make up the answer's text."""
    ids, want = reference["short"]
    heard: list[tuple[int, str]] = []
    fut = cluster.submit(ids, max_new_tokens=12, on_token=lambda t, text: heard.append((t, text)))
    got = fut.result(timeout=300)
    assert [t for t, _ in heard] == got.tokens == want
    assert "".join(text for _, text in heard) == got.text
    assert sum(1 for _, text in heard if text) >= 2


def _kill_mid_transfer(cluster, fut, victim: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL ``victim`` once some but not all layers of the request landed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        landed = list(cluster.stats()["layers_landed"].values())
        if landed and 2 <= max(landed) < 30:
            os.kill(cluster.pids[victim], signal.SIGKILL)
            return
        assert not fut.done(), "the request finished before the worker could be killed"
        time.sleep(0.05)
    pytest.fail("the prefill never started writing")


def test_prefill_killed_mid_transfer_retries_or_fails_cleanly(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    ids, want = reference["medium"]
    start_free = cluster.stats()["free_blocks"]
    # 1. retried on another prefill worker: same tokens, two attempts
    fut = cluster.submit(ids, max_new_tokens=12, prefill_worker="prefill-0", max_attempts=2,
                         fault_layer_delay_s=0.25)
    _kill_mid_transfer(cluster, fut, "prefill-0")
    got = fut.result(timeout=180)
    assert got.tokens == want and got.stats.attempts == 2 and got.stats.worker != "prefill-0"
    assert cluster.wait_for_workers(2) == ["prefill-1", "prefill-2"]
    assert cluster.stats()["free_blocks"] == start_free
    # 2. no retry allowed: a clear error, blocks freed
    fut = cluster.submit(ids, max_new_tokens=12, prefill_worker="prefill-1", max_attempts=1,
                         fault_layer_delay_s=0.25)
    _kill_mid_transfer(cluster, fut, "prefill-1")
    with pytest.raises(PrefillFailedError, match="prefill-1 died mid-transfer.*freed"):
        fut.result(timeout=120)
    assert cluster.stats()["free_blocks"] == start_free
    # 3. the decode worker keeps serving with the worker that is left
    got = cluster.generate(ids, max_new_tokens=12, timeout=180)
    assert got.tokens == want and got.stats.worker == "prefill-2"
    assert cluster.stats()["free_blocks"] == start_free


def test_prefill_deadline_aborts_and_frees_blocks(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    ids, want = reference["short"]
    start = cluster.stats()
    with pytest.raises(PrefillFailedError, match="deadline"):
        cluster.generate(ids, max_new_tokens=4, prefill_timeout=1.0, max_attempts=1,
                         fault_layer_delay_s=0.2, timeout=120)
    after = cluster.stats()
    assert after["free_blocks"] == start["free_blocks"] and after["prefill_workers"]
    assert after.get("quarantined_blocks", 0) == 0  # the worker confirmed its abort
    assert cluster.generate(ids, max_new_tokens=12, timeout=120).tokens == want
