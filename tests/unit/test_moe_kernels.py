"""The MoE weighted sum: the compiled kernel and the numpy path against a slot-order torch
reference, bit for bit, in every dtype and at the edges (no tokens, no slots, masked rows)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tensorfabric import _compiled
from tensorfabric.moe import _tensors as tx

torch = pytest.importorskip("torch")

NATIVE = _compiled.native
PATHS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    NATIVE is None, reason="tensorfabric._native is not built (no C compiler at install)"))]


PATHS.append(pytest.param("native-no-f16c", marks=pytest.mark.skipif(
    NATIVE is None, reason="tensorfabric._native is not built (no C compiler at install)")))


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """numpy; the compiled kernels; the compiled kernels with float16 on their plain path
    (what a CPU without F16C runs)."""
    monkeypatch.setattr(_compiled, "native", None if request.param == "numpy" else NATIVE)
    if request.param == "native-no-f16c":
        was = NATIVE._use_f16c(False)
        yield str(request.param)
        NATIVE._use_f16c(was)
        return
    yield str(request.param)


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype != torch.float32 else t.view(torch.int32)).numpy()


def _reference(table: torch.Tensor, pos: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """A slot-order float32 sum of weight * row (a multiply, then an add), rounded once."""
    acc = torch.zeros((pos.shape[0], table.shape[1]))
    for k in range(pos.shape[1]):
        acc += torch.from_numpy(w[:, k, None]) * table[torch.from_numpy(pos[:, k])].float()
    return acc.to(table.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T,K,H,R", [(37, 8, 300, 50), (1, 1, 3, 2), (0, 8, 16, 5),
                                     (5, 0, 8, 1), (64, 3, 1, 7)])
def test_weighted_sum_equals_slot_order_reference(path: str, dtype: str, T: int, K: int,
                                                  H: int, R: int) -> None:
    rng = np.random.default_rng([T, K, H])
    tdt = getattr(torch, dtype)
    table = torch.from_numpy(rng.standard_normal((R + 1, H)).astype(np.float32) * 30).to(tdt)
    table[R] = 0  # the zero row masked slots point at
    pos = rng.integers(0, R + 1, (T, K)).astype(np.int64)
    w = rng.standard_normal((T, K)).astype(np.float32)
    raw = (table.view(torch.int16) if dtype == "bfloat16" else table).numpy()
    got = tx.weighted_sum(raw, pos, w, tx.Kind(True, dtype))
    assert got.dtype == tdt and tuple(got.shape) == (T, H)
    assert np.array_equal(_bits(got), _bits(_reference(table, pos, w)))
    if dtype != "bfloat16":  # numpy in, numpy out
        got_np = tx.weighted_sum(raw, pos, w, tx.Kind(False, dtype))
        assert isinstance(got_np, np.ndarray) and got_np.dtype == np.dtype(dtype)
        assert np.array_equal(got_np, got.numpy())


def test_weighted_sum_rounds_halves_to_nearest_even_and_keeps_specials(path: str) -> None:
    """Sums that land between two bfloat16 values, overflow, infinities and NaN; 40 columns,
    so the compiled kernel's 32-column vector blocks round them as well as its scalar tail."""
    vals = torch.tensor([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3e38, float("inf"), float("nan"),
                         -0.0, 1e-40], dtype=torch.float32).repeat(5)
    for dtype in ("bfloat16", "float16"):
        tdt = getattr(torch, dtype)
        table = torch.stack([torch.ones(len(vals)), vals]).to(tdt)
        pos = np.array([[0, 1], [1, 1]], np.int64)
        w = np.array([[1.0, 1.0], [2.0, 1.0]], np.float32)
        raw = (table.view(torch.int16) if dtype == "bfloat16" else table).numpy()
        got = tx.weighted_sum(raw, pos, w, tx.Kind(True, dtype))
        want = _reference(table, pos, w)
        assert torch.equal(got.isnan(), want.isnan()), dtype
        ok = ~want.isnan()
        assert np.array_equal(_bits(got)[ok.numpy()], _bits(want)[ok.numpy()]), dtype


def test_weighted_sum_rounds_float32_ties_to_even_in_every_column(path: str) -> None:
    """Sums that fall exactly halfway between two bfloat16 values (1 + 2^-8 rounds down to
    1, 1 + 2^-7 + 2^-8 up to 1 + 2^-6), and a NaN weight whose payload is all ones (rounding
    by adding half an ulp would carry it into -0.0), in 40 columns: the vector blocks and the
    scalar tail of the compiled kernel both round them."""
    H = 40
    table = torch.tensor([[1.0] * H, [2.0 ** -8] * H, [1.0 + 2.0 ** -7] * H], dtype=torch.bfloat16)
    pos = np.array([[0, 1], [2, 1], [0, 0]], np.int64)
    w = np.ones((3, 2), np.float32)
    w.view(np.uint32)[2, 0] = 0x7FFFFFFF
    got = tx.weighted_sum(table.view(torch.int16).numpy(), pos, w, tx.Kind(True, "bfloat16"))
    assert torch.equal(got[0], torch.ones(H, dtype=torch.bfloat16))
    assert torch.equal(got[1], torch.full((H,), 1.0 + 2.0 ** -6, dtype=torch.bfloat16))
    assert bool(got[2].isnan().all()), _bits(got[2])


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
def test_native_kernel_refuses_rows_outside_the_table() -> None:
    table = np.zeros((4, 8), np.float32)
    out = np.empty((2, 8), np.float32)
    w = np.ones((2, 2), np.float32)
    for bad in (4, -1, 1 << 40):
        pos = np.array([[0, 1], [2, bad]], np.int64)
        with pytest.raises(IndexError, match=f"pos\\[3\\] = {bad} is outside the table's 4 rows"):
            NATIVE.weighted_sum(table, pos, w, out, 8, 0)
    with pytest.raises(ValueError, match="buffer sizes"):
        NATIVE.weighted_sum(table, np.zeros((2, 2), np.int64), np.ones((2, 3), np.float32),
                            out, 8, 0)
    with pytest.raises(ValueError, match="dtype code 7"):
        NATIVE.weighted_sum(table, np.zeros((2, 2), np.int64), w, out, 8, 7)
    with pytest.raises(BufferError):  # the output must be writable
        NATIVE.weighted_sum(table, np.zeros((2, 2), np.int64), w, bytes(64), 8, 0)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler: the kernels are optional")
def test_the_kernels_are_built_where_a_compiler_is() -> None:
    """`pip install -e .` builds tensorfabric._native (pyproject.toml's ext-modules); a
    broken build configuration would silently leave every install on the numpy path."""
    if os.environ.get("TENSORFABRIC_NATIVE", "1").strip() == "0":
        pytest.skip("TENSORFABRIC_NATIVE=0 turns the kernels off")
    assert NATIVE is not None, ("tensorfabric._native is missing although a C compiler is "
                                "here: reinstall with `pip install -e .`")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_aliased_rows_are_read_where_they_are(path: str, dtype: str) -> None:
    """``alias=(base, src, idx)``: rows base.. of the table stand for src[idx] (a rank's own
    answers, never copied into its combine region by the kernel): the same sum as copying
    them there first."""
    rng = np.random.default_rng(5)
    T, K, H, R, base, n = 40, 4, 24, 60, 17, 20
    tdt = getattr(torch, dtype)
    table = torch.from_numpy(rng.standard_normal((R + 1, H)).astype(np.float32)).to(tdt)
    table[R] = 0
    src = torch.from_numpy(rng.standard_normal((33, H)).astype(np.float32)).to(tdt)
    idx = rng.permutation(33)[:n].astype(np.int64)
    pos = rng.integers(0, R + 1, (T, K)).astype(np.int64)
    pos[:, 0] = base + np.arange(T) % n  # every token reads an aliased row or more
    w = rng.standard_normal((T, K)).astype(np.float32)
    raw = lambda t: (t.view(torch.int16) if dtype == "bfloat16" else t).numpy()  # noqa: E731
    want_table = table.clone()
    want_table[base:base + n] = src[torch.from_numpy(idx)]
    table[base:base + n] = 7  # what the region held before: must not be read
    src_bytes = raw(src).view(np.uint8).reshape(33, -1)
    got = tx.weighted_sum(raw(table), pos, w, tx.Kind(True, dtype), alias=(base, src_bytes, idx))
    assert np.array_equal(_bits(got), _bits(_reference(want_table, pos, w)))


def test_gather_reads_aliased_rows_where_they_are(path: str) -> None:
    """Dispatch's per-expert gather: ``alias=(base, src, rows)`` rows of the receive region
    stand for this rank's own tokens (``src[rows]``), which the kernel reads in place; both
    paths give the same batches as gathering from a region that holds them."""
    rng = np.random.default_rng(9)
    rb, R, base, n = 40, 30, 12, 6
    table = rng.integers(0, 256, (R, rb), dtype=np.uint8)
    src = rng.integers(0, 256, (9, rb), dtype=np.uint8)
    rows = rng.permutation(9)[:n].astype(np.int64)
    want_table = table.copy()
    want_table[base:base + n] = src[rows]
    idx = rng.integers(0, R, 50).astype(np.int64)
    idx[:n] = base + np.arange(n)
    dst = np.zeros((64, rb), np.uint8)
    tx.gather(dst, table, idx, alias=(base, src, rows))
    assert np.array_equal(dst[:50], want_table[idx]) and not dst[50:].any()
    plain = np.zeros((50, rb), np.uint8)
    tx.gather(plain, want_table, idx)
    assert np.array_equal(plain, want_table[idx])


@pytest.mark.skipif(NATIVE is None, reason="tensorfabric._native is not built")
def test_native_gather_refuses_rows_outside_the_tables() -> None:
    table, dst = np.zeros((4, 8), np.uint8), np.zeros((2, 8), np.uint8)
    with pytest.raises(IndexError, match=r"idx\[1\] = 6 is outside the tables' 6 rows"):
        NATIVE.gather_rows(dst, table, np.array([0, 6], np.int64), 8, np.zeros((2, 8), np.uint8))
    with pytest.raises(ValueError, match="buffer sizes"):
        NATIVE.gather_rows(np.zeros((1, 8), np.uint8), table, np.array([0, 1], np.int64), 8)
