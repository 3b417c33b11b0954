"""One rank of an MoE group, in its own process: runs the scenarios of ``moe_case`` (or dies
on purpose mid-step) and writes what it saw to ``<dir>/out.<rank>.npz`` / ``.json``.

    python moe_rank.py RANK WORLD DIR TRANSPORT MODE [HOST]

HOST is the address the rank's engine listens on (a netns host's NIC; default loopback).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from moe_case import (EXPERTS, HIDDEN, MAX_TOKENS, SCENARIOS, TOPK, StepInput, expert_mlp,
                      step_input)

import tensorfabric as tf
from tensorfabric.moe import ExpertParallel, FileExchange

SECRET = "moe-test"


def group(eng: tf.Engine, rank: int, world: int, path: str, *, key: str = "moe",
          dtype: str = "float32", timeout: float = 20.0, group_id: int = 0) -> ExpertParallel:
    return ExpertParallel(eng, rank=rank, world=world, num_experts=EXPERTS, hidden=HIDDEN,
                          topk=TOPK, max_tokens=MAX_TOKENS, dtype=dtype, timeout=timeout,
                          group=group_id, exchange=FileExchange(path, rank, world, key=key))


def layer(ep: ExpertParallel, inp: StepInput, *, expand: bool = True) -> np.ndarray:
    got = ep.dispatch(inp.tokens, inp.ids, inp.weights, expand=expand)
    if expand:
        assert got.rows is None and got.index is None
        return ep.combine([expert_mlp(e, b) for e, b in zip(got.experts, got.batches)])
    # compact: each expert gathers its own rows, as a grouped GEMM would
    assert got.batches is None and got.tokens is None
    assert got.index is not None and [len(i) for i in got.index] == got.counts.tolist()
    assert type(got.order) is type(got.rows) is type(got.index[0])  # numpy or torch, as given
    return ep.combine([expert_mlp(e, got.rows[i]) for e, i in zip(got.experts, got.index)])


def scenarios(eng: tf.Engine, rank: int, world: int, path: str) -> None:
    """Every scenario in the expanded layout, then again in the compact one (``<step>c``)."""
    with group(eng, rank, world, path) as ep:
        outs = {f"{step}": layer(ep, step_input(name, step, rank, world))
                for step, name in enumerate(SCENARIOS)}
        outs.update({f"{step}c": layer(ep, step_input(name, step, rank, world), expand=False)
                     for step, name in enumerate(SCENARIOS)})
    np.savez(os.path.join(path, f"out.{rank}.npz"), **outs)


def dtypes(eng: tf.Engine, rank: int, world: int, path: str) -> None:
    """torch float32 / bfloat16 and numpy float16 through identity experts scaled by e + 1."""
    import torch

    out = {}
    for gid, (dtype, lib) in enumerate([("float32", "torch"), ("bfloat16", "torch"),
                                        ("float16", "numpy")], start=1):
        inp = step_input("random", 0, rank, world)
        x = inp.tokens.astype(np.float16) if lib == "numpy" else \
            torch.from_numpy(inp.tokens).to(getattr(torch, dtype))
        ids = torch.from_numpy(inp.ids) if lib == "torch" else inp.ids
        with group(eng, rank, world, path, key=f"dt{gid}", dtype=dtype, group_id=gid) as ep:
            got = ep.dispatch(x, ids, inp.weights)
            assert type(got.tokens) is type(x) and got.tokens.dtype == x.dtype
            y = ep.combine([b * (e + 1) for e, b in zip(got.experts, got.batches)])
            got = ep.dispatch(x, ids, inp.weights, expand=False)  # the compact layout
            assert type(got.rows) is type(x) and got.rows.dtype == x.dtype
            yc = ep.combine([got.rows[i] * (e + 1) for e, i in zip(got.experts, got.index)])
        assert type(y) is type(x) and y.dtype == x.dtype, (type(y), y.dtype)
        assert type(yc) is type(x) and bool((yc == y).all()), f"compact {dtype} differs"
        out[dtype] = (y.float().view(torch.int32).numpy() if lib == "torch" and
                      dtype == "bfloat16" else np.asarray(y, dtype=np.float32))
    np.savez(os.path.join(path, f"out.{rank}.npz"), **out)


WIDE = 8192  # float32 rows of 32 KiB: 33+ rows to one rank take the direct path (1 MiB)


def wide(eng: tf.Engine, rank: int, world: int, path: str) -> None:
    """Rows wide enough that dispatch writes them from the tokens (header first), beside
    smaller pairs packed in one message; identity experts scaled by e + 1, both layouts."""
    inp = step_input("random", 0, rank, world)
    x = np.random.default_rng([rank, 5]).standard_normal((len(inp.tokens), WIDE)).astype(
        np.float32)
    out = {}
    with ExpertParallel(eng, rank=rank, world=world, num_experts=EXPERTS, hidden=WIDE,
                        topk=TOPK, max_tokens=MAX_TOKENS, timeout=20.0, group=7,
                        exchange=FileExchange(path, rank, world, key="wide")) as ep:
        for expand in (True, False):
            got = ep.dispatch(x, inp.ids, inp.weights, expand=expand)
            batches = got.batches if expand else [got.rows[i] for i in got.index]
            out["expanded" if expand else "compact"] = ep.combine(
                [b * np.float32(e + 1) for e, b in zip(got.experts, batches)])
    np.savez(os.path.join(path, f"out.{rank}.npz"), x=x, **out)


def dies(eng: tf.Engine, rank: int, world: int, path: str, *, between: bool = False) -> None:
    """Rank world-1 exits in the middle of step 1 (after its dispatch), or ``between`` steps
    0 and 1; the others report what their step raised and how long it took."""
    ep = group(eng, rank, world, path, timeout=15.0)
    layer(ep, step_input("random", 0, rank, world))
    if between and rank == world - 1:
        os._exit(3)
    inp = step_input("random", 1, rank, world)
    if between:
        time.sleep(0.5)  # the dead rank's sockets are closed by now
    got = None if between else ep.dispatch(inp.tokens, inp.ids, inp.weights)
    if rank == world - 1:
        os._exit(3)
    t0 = time.monotonic()
    report: dict[str, object] = {"error": None}
    try:
        if got is None:
            got = ep.dispatch(inp.tokens, inp.ids, inp.weights)
        ep.combine([expert_mlp(e, b) for e, b in zip(got.experts, got.batches)])
    except tf.TensorFabricError as exc:
        report = {"error": type(exc).__name__, "message": str(exc)}
    report["elapsed"] = time.monotonic() - t0
    try:  # the group stays broken
        ep.dispatch(inp.tokens, inp.ids, inp.weights)
    except tf.TensorFabricError as exc:
        report["after"] = type(exc).__name__
    with open(os.path.join(path, f"out.{rank}.json"), "w") as f:
        json.dump(report, f)


def main() -> None:
    rank, world, path, transport, mode = sys.argv[1:6]
    host = sys.argv[6] if len(sys.argv) > 6 else "127.0.0.1"
    transports = ("shm", "tcp") if transport == "shm" else ("tcp",)
    with tf.Engine(SECRET, transports=transports, name=f"rank{rank}", host=host) as eng:
        {"scenarios": scenarios, "dtypes": dtypes, "wide": wide, "dies": dies,
         "dies_between": lambda *a: dies(*a, between=True)}[mode](
            eng, int(rank), int(world), path)


if __name__ == "__main__":
    main()
