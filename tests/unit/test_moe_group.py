"""ExpertParallel in one process: engines in threads, rendezvous helpers, bad input."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.bench._moe import MoePoint, moe_config
from tensorfabric.moe import EngineExchange, ExpertParallel, FileExchange

SECRET = "moe-unit"
KW: dict[str, Any] = dict(num_experts=4, hidden=8, topk=2, max_tokens=6, timeout=10)


def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None] * n

    def run(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[r] = exc

    ths = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    return out


def test_single_rank_group_is_the_whole_layer(tmp_path: Path) -> None:
    with tf.Engine(SECRET) as eng, ExpertParallel(
            eng, rank=0, world=1, exchange=FileExchange(tmp_path, 0, 1), **KW) as ep:
        x = np.arange(48, dtype=np.float32).reshape(6, 8)
        ids = np.array([[0, 1], [3, 2], [1, -1], [0, 3], [2, 1], [3, 0]])
        w = np.full((6, 2), 0.5, np.float32)
        got = ep.dispatch(x, ids, w)
        assert got.counts.tolist() == [3, 3, 2, 3] and list(got.experts) == [0, 1, 2, 3]
        assert np.array_equal(got.batches[2], x[[1, 4]])
        y = ep.combine([b * (e + 1) for e, b in zip(got.experts, got.batches)])
        want = sum(np.where(ids[:, k, None] >= 0, w[:, k, None] * x * (ids[:, k, None] + 1), 0)
                   for k in range(2))
        assert np.array_equal(y, want)
        with pytest.raises(tf.ConfigError, match="combine called without a dispatch"):
            ep.combine(got.tokens)
        # compact: each token once; the index names each expert's rows, in the batches' order
        c = ep.dispatch(x, ids, w, expand=False)
        assert c.batches is None and c.tokens is None and c.counts.tolist() == [3, 3, 2, 3]
        assert len(np.unique(np.concatenate(c.index))) == 6  # 11 (token, expert) pairs
        assert np.array_equal(c.rows[c.index[2]], x[[1, 4]])
        # ``order``: every batch's rows back to back, the expanded layout's tokens
        assert np.array_equal(c.order, np.concatenate(c.index))
        assert np.array_equal(c.rows[c.order], got.tokens)
        assert np.array_equal(ep.combine([c.rows[i] * (e + 1) for e, i in
                                          zip(c.experts, c.index)]), want)
        with pytest.raises(tf.ConfigError, match="max_tokens"):
            ep.dispatch(np.zeros((7, 8), np.float32), np.zeros((7, 2), int), np.zeros((7, 2)))
        with pytest.raises(tf.ConfigError, match="float16"):
            ep.dispatch(x.astype(np.float16), ids, w)
        with pytest.raises(tf.ConfigError, match=r"\[-1, 4\)"):
            ep.dispatch(x, ids + 4, w)
        ep.dispatch(x, ids, w)
        with pytest.raises(tf.ConfigError, match="dispatch called twice"):
            ep.dispatch(x, ids, w)
        with pytest.raises(tf.ConfigError, match="rows"):
            ep.combine(got.tokens[:1])


def test_engine_exchange_and_mismatched_ranks() -> None:
    engines = [tf.Engine(SECRET) for _ in range(3)]
    try:
        root = engines[0].address

        def build(r: int, hidden: int = 8) -> ExpertParallel:
            ex = EngineExchange(engines[r], r, 3, root=root if r else None, timeout=20)
            return ExpertParallel(engines[r], rank=r, world=3, exchange=ex,
                                  **dict(KW, num_experts=6, hidden=hidden))

        groups = in_threads(3, build)
        assert all(isinstance(g, ExpertParallel) for g in groups), groups
        x = np.ones((2, 8), np.float32)
        ys = in_threads(3, lambda r: groups[r].combine(
            groups[r].dispatch(x, np.array([[5, 0], [2, -1]]), np.ones((2, 2))).tokens))
        assert all(np.array_equal(y, [[2] * 8, [1] * 8]) for y in ys), ys
        in_threads(3, lambda r: groups[r].close())  # collective, like a step
        bad = in_threads(3, lambda r: build(r, hidden=16 if r == 2 else 8))
        assert all(isinstance(b, tf.ConfigError) and "same" in str(b) for b in bad), bad
    finally:
        for e in engines:
            e.close()


def test_file_exchange_times_out_naming_missing_ranks(tmp_path: Path) -> None:
    with pytest.raises(tf.TransferTimeout, match=r"\[1, 2\]"):
        FileExchange(tmp_path, 0, 3, timeout=0.2)(b"x")
    with pytest.raises(tf.ConfigError):
        FileExchange(tmp_path, 3, 3)


def test_bad_group_arguments(tmp_path: Path) -> None:
    with tf.Engine(SECRET) as eng:
        for bad, says in ((dict(num_experts=5), "multiple of world"), (dict(rank=2), "rank"),
                          (dict(topk=0), "topk"), (dict(dtype="int8"), "int8"),
                          # slot tables hold a local expert in 16 bits: 32768 would wrap
                          (dict(num_experts=2 * 32768), "at most 32767")):
            args = dict(KW, rank=0, world=2, exchange=FileExchange(tmp_path, 0, 2))
            args.update(bad)
            with pytest.raises(tf.ConfigError, match=says):
                ExpertParallel(eng, **args)


def test_bench_points_parse_and_refuse_nonsense() -> None:
    assert str(MoePoint.parse("4x128x7168x256")) == "4x128x7168x256x8"
    for bad in ("4x128", "3x128x2048x64", "1x8x8x8", "2x1x1x4x9", "ax1x1x1"):
        with pytest.raises(ValueError):
            MoePoint.parse(bad)
    with pytest.raises(ValueError, match="transports"):
        moe_config(None, "rdma")
    assert moe_config(None, None, quick=True).points[0] == MoePoint.parse("2x128x2048x64")


def _cli() -> Any:
    typer = pytest.importorskip("typer")
    from tensorfabric.cli import _bench

    app = typer.Typer()

    @app.callback()
    def _group() -> None:
        pass

    _bench.register(app)
    return app


def test_bench_moe_cli_refuses_bad_points() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli(), ["bench", "--moe", "--moe-points", "3x8x8x8"])
    assert result.exit_code == 2 and "multiple of EP" in result.output


@pytest.mark.slow
def test_bench_moe_cli_runs_a_tiny_point(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    out = tmp_path / "moe.json"
    result = CliRunner().invoke(_cli(), ["bench", "--moe", "--quick", "--moe-points",
                                         "2x8x64x4x2", "--transport", "shm", "--json", str(out)])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["point"] for r in rows] == ["2x8x64x4x2"] and rows[0]["transport"] == "shm"
    for key in ("engine_dispatch_p50_us", "gloo_combine_p50_us", "raw_dispatch_p50_us",
                "glayer_combine_p50_us", "compact_dispatch_p50_us", "compact_combine_p50_us",
                "compact_dispatch_cpu_us", "gloo_dispatch_cpu_us"):
        assert rows[0][key] > 0, key
    assert "CPU cmp d/c" in result.output


def test_same_host_ranks_move_tokens_over_shared_memory(caplog: pytest.LogCaptureFixture) -> None:
    """Two ranks on one host with shm: the token rows (dispatch) and the expert outputs
    (combine) are copied into the peer's regions, not sent over its tcp links (the receive
    regions were once write-only, which the shm transport does not map: every byte went over
    loopback tcp). Each rank closes its engine as soon as its group is closed: close is
    collective, so no rank is left waiting for a closed peer to confirm it dropped the
    mapping of a region (which logged a warning and held close 5 s)."""
    engines = [tf.Engine(SECRET, transports=("shm", "tcp")) for _ in range(2)]

    def tcp_sent(eng: tf.Engine) -> int:  # bytes sent over every tcp link to every peer
        return sum(sum(v) for v in eng.stats()["links"].values())

    try:
        root = engines[0].address
        hidden, tokens = 1024, 32  # float32 rows of 4 KiB

        def step(r: int) -> Any:
            ex = EngineExchange(engines[r], r, 2, root=root if r else None, timeout=20)
            with ExpertParallel(engines[r], rank=r, world=2, exchange=ex,
                                **dict(KW, num_experts=2, hidden=hidden, max_tokens=tokens)) as g:
                x = np.full((tokens, hidden), r + 1, np.float32)
                ids = np.tile([[1 - r, r]], (tokens, 1))  # every token to both ranks
                sent = tcp_sent(engines[r])
                y = g.combine(g.dispatch(x, ids, np.full((tokens, 2), 0.5)).tokens)
                out = y, tcp_sent(engines[r]) - sent
            engines[r].close()
            return out

        with caplog.at_level("WARNING", logger="tensorfabric"):
            out = in_threads(2, step)
        assert not [r.message for r in caplog.records if "did not confirm" in r.message]
        assert not any(isinstance(o, BaseException) for o in out), out
        for r, (y, tcp_bytes) in enumerate(out):
            assert np.array_equal(y, np.full((tokens, hidden), r + 1, np.float32))
            assert tcp_bytes < tokens * hidden * 4 // 4, tcp_bytes  # control frames only
    finally:
        for e in engines:
            e.close()
