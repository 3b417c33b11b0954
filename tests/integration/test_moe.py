"""MoE dispatch and combine between real processes: equal to a one-process reference layer
on shm and tcp, every dtype, and a rank that dies mid-step."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import subprocess_env
from helpers.moe_case import EXPERTS, SCENARIOS, WORLD, reference, step_input

RANK = Path(__file__).resolve().parent.parent / "helpers" / "moe_rank.py"


def run_group(tmp: Path, transport: str, mode: str, world: int = WORLD,
              limit: float = 90.0, net: Any = None, kernels: str = "native") -> list[int]:
    """``kernels``: "native" (the compiled weighted sum where it is built) or "numpy"."""
    env = subprocess_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                         TENSORFABRIC_NATIVE="0" if kernels == "numpy" else "1")
    procs = []
    for r in range(world):
        argv = [sys.executable, str(RANK), str(r), str(world), str(tmp), transport, mode]
        procs.append(net.popen(r, argv + [net.addr(r)], env=env) if net else
                     subprocess.Popen(argv, env=env))
    deadline = time.monotonic() + limit
    try:
        return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.mark.parametrize("transport,kernels",
                         [("shm", "native"), ("shm", "numpy"), ("tcp", "native"),
                          pytest.param("netns", "native", marks=pytest.mark.netns)])
def test_dispatch_combine_equals_reference(tmp_path: Path, transport: str, kernels: str) -> None:
    if transport == "netns":  # tcp between emulated hosts, one rank per host
        from tensorfabric.testing.netns import NetnsHosts, netns_unavailable_reason

        if netns_unavailable_reason():
            pytest.skip(netns_unavailable_reason() or "")
        with NetnsHosts(WORLD, rate="1gbit") as net:
            assert run_group(tmp_path, "tcp", "scenarios", net=net) == [0] * WORLD
    else:
        assert run_group(tmp_path, transport, "scenarios", kernels=kernels) == [0] * WORLD
    outs = [np.load(tmp_path / f"out.{r}.npz") for r in range(WORLD)]
    for step, name in enumerate(SCENARIOS):
        want = reference([step_input(name, step, r) for r in range(WORLD)])
        for r in range(WORLD):
            for layout, key in (("expanded", f"{step}"), ("compact", f"{step}c")):
                got = outs[r][key]
                assert got.dtype == np.float32 and got.shape == want[r].shape, (name, r)
                assert np.array_equal(got, want[r]), \
                    f"{name} ({layout}): rank {r} differs from the reference"


@pytest.mark.parametrize("kernels", ["native", "numpy"])
def test_torch_and_half_dtypes(tmp_path: Path, kernels: str) -> None:
    torch = pytest.importorskip("torch")
    world = 2
    assert run_group(tmp_path, "shm", "dtypes", world=world, kernels=kernels) == [0] * world
    for r in range(world):
        got = np.load(tmp_path / f"out.{r}.npz")
        inp = step_input("random", 0, r, world)
        for dtype in ("float32", "bfloat16", "float16"):
            tdt = getattr(torch, dtype)
            x = torch.from_numpy(inp.tokens).to(tdt).float()
            w = torch.from_numpy(inp.weights)
            ids = torch.from_numpy(inp.ids)
            acc = torch.zeros_like(x)
            for k in range(ids.shape[1]):  # identity experts scaled by e + 1, in slot order
                out = (x * (ids[:, k, None] + 1)).to(tdt).float()
                acc += w[:, k, None] * out
            want = acc.to(tdt).float()  # every dtype: float32 sums in slot order, rounded once
            # (helpers/moe_rank.py saves bfloat16 as float32 bits, the others as float32)
            want_np = want.view(torch.int32).numpy() if dtype == "bfloat16" else want.numpy()
            assert np.array_equal(got[dtype], want_np), dtype


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_wide_rows_go_straight_from_the_tokens(tmp_path: Path, transport: str) -> None:
    """Pairs of 1 MiB and more are written from the tokens after their header (the others
    packed in one message, in the same step); both layouts equal the float32 reference."""
    assert run_group(tmp_path, transport, "wide") == [0] * WORLD
    outs = [np.load(tmp_path / f"out.{r}.npz") for r in range(WORLD)]
    inputs = [step_input("random", 0, r) for r in range(WORLD)]
    x = np.concatenate([o["x"] for o in outs])
    ids = np.concatenate([i.ids for i in inputs])
    w = np.concatenate([i.weights for i in inputs])
    pair_bytes = [int((i.ids // (EXPERTS // WORLD) == d).any(axis=1).sum()) * x.shape[1] * 4
                  for s, i in enumerate(inputs) for d in range(WORLD) if d != s]
    assert max(pair_bytes) >= 1 << 20 > min(pair_bytes) > 0  # some pairs direct, some packed
    want = np.zeros(x.shape, np.float32)
    for k in range(ids.shape[1]):  # slot order, from zero, as the layer sums
        want += w[:, k, None] * (x * (ids[:, k, None] + 1).astype(np.float32))
    at = 0
    for r, o in enumerate(outs):
        n = len(inputs[r].ids)
        for layout in ("expanded", "compact"):
            assert np.array_equal(o[layout], want[at:at + n]), (r, layout)
        at += n


@pytest.mark.parametrize("transport,mode", [("shm", "dies"), ("tcp", "dies"),
                                            ("shm", "dies_between")])
def test_rank_killed_mid_step_breaks_every_peer(tmp_path: Path, transport: str,
                                                mode: str) -> None:
    codes = run_group(tmp_path, transport, mode, limit=60.0)
    assert codes[-1] == 3 and codes[:-1] == [0] * (WORLD - 1)
    for r in range(WORLD - 1):
        report = json.loads((tmp_path / f"out.{r}.json").read_text())
        assert report["error"] == "BrokenError", report
        assert report["elapsed"] < 15.0, report  # within the group's timeout, not at it
        assert report["after"] == "BrokenError"
