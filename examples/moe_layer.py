"""An expert-parallel MoE layer over tensorfabric: 2 ranks (processes), 8 experts, top-2.

    PYTHONPATH=src python examples/moe_layer.py            # shared memory on one host
    PYTHONPATH=src python examples/moe_layer.py tcp        # tcp (as across hosts)

Each rank routes its own tokens, dispatches them to the ranks holding their experts, runs its
local experts on the batches it received, and combines the answers back; the result equals a
single-process MoE layer over every rank's tokens, which the example checks.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile

import numpy as np

WORLD, EXPERTS, HIDDEN, TOPK, TOKENS = 2, 8, 64, 2, 16


def expert(e: int, x: np.ndarray) -> np.ndarray:
    w = np.random.default_rng(e).standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 8
    return np.tanh(x @ w)


def inputs(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    logits = rng.standard_normal((TOKENS, EXPERTS))
    ids = np.argsort(-logits, axis=1)[:, :TOPK]                   # the router's top-k
    w = np.take_along_axis(logits, ids, 1)
    w = (np.exp(w) / np.exp(w).sum(1, keepdims=True)).astype(np.float32)
    return x, ids, w


def rank_main(rank: int, path: str, transport: str, out: mp.Queue) -> None:
    import tensorfabric as tf
    from tensorfabric.moe import ExpertParallel, FileExchange

    transports = ("shm", "tcp") if transport == "shm" else ("tcp",)
    with tf.Engine("example-secret", transports=transports) as eng, ExpertParallel(
            eng, rank=rank, world=WORLD, num_experts=EXPERTS, hidden=HIDDEN, topk=TOPK,
            max_tokens=TOKENS, exchange=FileExchange(path, rank, WORLD), timeout=30) as ep:
        x, ids, w = inputs(rank)
        got = ep.dispatch(x, ids, w)                               # my experts' batches
        print(f"rank {rank}: experts {list(got.experts)} got {got.counts.tolist()} tokens")
        y = ep.combine([expert(e, b) for e, b in zip(got.experts, got.batches)])
        # the compact layout: each token here once, the experts gather their own rows
        got = ep.dispatch(x, ids, w, expand=False)
        yc = ep.combine([expert(e, got.rows[i]) for e, i in zip(got.experts, got.index)])
        assert np.array_equal(y, yc), "the compact layout gave other bits"
        # a grouped GEMM's view of it: every batch's rows at once, cut by got.counts
        got = ep.dispatch(x, ids, w, expand=False)
        cuts = np.cumsum(got.counts)[:-1]
        outs = [expert(e, r) for e, r in zip(got.experts, np.split(got.rows[got.order], cuts))]
        assert np.array_equal(y, ep.combine(np.concatenate(outs))), "grouped gave other bits"
        out.put((rank, y))


def reference() -> list[np.ndarray]:
    ys = []
    for rank in range(WORLD):
        x, ids, w = inputs(rank)
        y = np.zeros_like(x)
        for k in range(TOPK):
            y += w[:, k, None] * np.stack([expert(e, x[t:t + 1])[0] for t, e in
                                           enumerate(ids[:, k])])
        ys.append(y)
    return ys


def main() -> None:
    transport = sys.argv[1] if len(sys.argv) > 1 else "shm"
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as path:
        procs = [ctx.Process(target=rank_main, args=(r, path, transport, out))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
    for rank, want in enumerate(reference()):  # per-token experts: equal up to rounding
        assert np.allclose(results[rank], want, atol=1e-5), rank
    print("combined outputs match a single-process MoE layer")


if __name__ == "__main__":
    main()
