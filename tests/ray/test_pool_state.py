"""The controller's durable state and verification records, without a cluster: the journal
(reload, deletes, compaction, a torn last line) and the retry/drain rules of the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorfabric.pool import NodeClaims, PoolError
from tensorfabric.pool._compile import NodeView
from tensorfabric.pool._labels import JOIN_ID
from tensorfabric.pool._records import VerificationBook
from tensorfabric.pool._state import StateStore

pytestmark = [pytest.mark.timeout(60)]


def test_journal_reloads_latest_items_and_survives_a_torn_last_line(tmp_path: Path):
    path = tmp_path / "state.jsonl"
    store = StateStore(str(path), use_kv=False, compact_min=10)
    for i in range(30):  # forces compactions along the way
        store.put("rec", f"n{i % 5}", {"verified": True, "i": i})
    store.put("dep", "chat", {"replicas": [1]})
    store.put("dep", "old", {"replicas": []})
    store.put("dep", "old", None)
    store.close()
    assert len(path.read_text().splitlines()) < 33  # compacted
    with open(path, "a") as f:
        f.write('{"k":"dep","id":"half')  # the head died mid-write
    items = StateStore(str(path), use_kv=False).load()
    assert {k: v["i"] for k, v in items["rec"].items()} == {f"n{j}": 25 + j for j in range(5)}
    assert set(items["dep"]) == {"chat"}


def test_corrupt_journal_is_refused_with_the_fix(tmp_path: Path):
    path = tmp_path / "state.jsonl"
    path.write_text('{"k":"rec","id":"a","v":{},"seq":1}\nnot json\n{"k":"rec","id":"b","v":{},"seq":2}\n')
    with pytest.raises(PoolError, match="move the file away"):
        StateStore(str(path), use_kv=False).load()


def node(join: str, node_id: str, mem: float = 16) -> NodeView:
    labels = {**NodeClaims("eu", "eu-a", "DE", "datacenter", "A100", mem, "low", True).to_labels(),
              JOIN_ID: join}  # fmt: skip
    return NodeView(node_id, True, labels, 1.0, 1.0)


GOOD = {"device": "cpu (simulated GPU)", "memory_gb": 24.0, "memory_probe_ok": True,
        "gflops": 10.0, "transfer_mb_s": 500.0, "sha256": "x"}  # fmt: skip


def test_timeouts_are_retried_with_backoff_and_a_later_failure_drains():
    book = VerificationBook(ttl_s=100)
    calls, sleeps = [], []

    def flaky(view, timeout):
        calls.append(timeout)
        if len(calls) == 1:
            return {"error": "GetTimeoutError: timed out", "kind": "timeout"}, None
        return GOOD, "x"

    rec, newly_failed = book.verify(node("j1", "a"), flaky, timeout=0.05, sleep=sleeps.append)
    assert rec["verified"] and rec["attempts"] == 2 and not newly_failed
    assert calls[0] == 0.05 and calls[1] >= 60  # the retry gets the load-aware default
    assert sleeps == [1.0]
    # Later the node measures less memory than it claims: no retry (load does not explain
    # it), and it was verified before, so it is drained.
    lost = {**GOOD, "memory_gb": 1.0}
    rec, newly_failed = book.verify(node("j1", "a"), lambda v, t: (lost, "x"), sleep=sleeps.append)
    assert newly_failed and rec["drained"] and rec["attempts"] == 1 and "drained" in rec["reason"]
    views = book.annotate([node("j1", "a")])
    assert views[0].drained and not views[0].verified


def test_a_rejoined_node_keeps_its_record_only_with_the_same_claims():
    book = VerificationBook(ttl_s=100)
    book.verify(node("j1", "old-id"), lambda v, t: (GOOD, "x"))
    saved = []
    book.on_change = lambda key, rec: saved.append(key)
    (same,) = book.annotate([node("j1", "new-id")])
    assert same.verified and saved == ["j1"]
    assert [v.node_id for v in book.due([node("j1", "new-id")])] == ["new-id"]  # re-checked soon
    (liar,) = book.annotate([node("j1", "third-id", mem=80)])
    assert not liar.verified and "different claims" in liar.verify_reason
    assert json.dumps(book.dump())  # what the journal stores is JSON


def test_link_tier_bar_allows_for_a_busy_node_but_not_a_false_claim():
    """Under load a node moves bytes slower than its link allows: an honest 'low' node at
    75 MB/s on a machine with 4 runnable tasks per CPU passes; idle it fails; a claim of
    'ultra' (1600 MB/s) fails at any load (the relief is capped)."""
    from tensorfabric.pool._verify import judge

    def claims(tier: str) -> NodeClaims:
        return NodeClaims("eu", "eu-a", "DE", "datacenter", "A100", 16, tier, True)

    slow = {**GOOD, "transfer_mb_s": 75.0}
    assert judge(claims("low"), {**slow, "load_per_cpu": 4.0}, "x") == (True, "ok")
    ok, why = judge(claims("low"), {**slow, "load_per_cpu": 0.5}, "x")
    assert not ok and "measured 75 MB/s" in why
    ok, why = judge(claims("ultra"), {**slow, "load_per_cpu": 40.0}, "x")
    assert not ok and "lowered 8.0x" in why
