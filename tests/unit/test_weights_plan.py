"""The plan oracle: every replica byte is produced exactly once and equals the reference mapping
(reorder, fusion, shards, dtype change) computed independently with numpy/torch."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfabric.weights import (
    DstTensor,
    LayoutError,
    Part,
    WeightPlan,
    checksum,
    fanout,
    fuse,
    same_layout,
    shard,
    specs_of,
)
from tensorfabric.weights._dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from tensorfabric.weights._plan import depth


def _trainer(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "embed": rng.standard_normal((50, 16), dtype=np.float32),
        "q": rng.standard_normal((16, 16), dtype=np.float32),
        "k": rng.standard_normal((8, 16), dtype=np.float32),
        "v": rng.standard_normal((8, 16), dtype=np.float32),
        "up": rng.standard_normal((16, 40), dtype=np.float32),
        "norm": rng.standard_normal((16,), dtype=np.float32),
        "scale": np.array(3.5, dtype=np.float32),
        "steps": np.arange(6, dtype=np.int64),
    }


def _bf16(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _run(plan: WeightPlan, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    staging = np.full(plan.nbytes, 0xEE, dtype=np.uint8)
    sources = plan.check_sources(tensors)
    covered = np.zeros(plan.nbytes, dtype=np.int32)
    for c in plan.chunks:
        covered[c.offset : c.offset + c.nbytes] += 1
        plan.prepare(c.index, sources, staging)
    for spec, off in zip(plan.layout.specs, plan.layout.offsets):
        assert (covered[off : off + spec.nbytes] == 1).all(), spec.name  # each byte exactly once
    assert max(c.nbytes for c in plan.chunks) <= max(plan.chunk_bytes, 40 * 4)
    return plan.layout.views(staging)


@pytest.mark.parametrize("chunk_bytes", [7, 256, 1 << 20])
def test_fused_sharded_converted_layout_matches_reference(chunk_bytes: int) -> None:
    t = _trainer(np.random.default_rng(0))
    src = specs_of(t)
    order = ["norm", "up", "v", "k", "q", "embed", "scale", "steps"]
    dest = same_layout(src, order=order)
    dest = shard(dest, src, rank=1, world=2, dims={"q": 0, "k": 0, "v": 0, "up": 1})
    dest = fuse(dest, "qkv", ["q", "k", "v"], axis=0)
    dest = [DstTensor(d.name, "bfloat16" if d.name in ("qkv", "up") else d.dtype, d.parts, d.axis)
            for d in dest]
    dest.append(DstTensor("kv_cols", "float16", (Part("k"), Part("v")), axis=1))
    plan = WeightPlan(src, dest, chunk_bytes=chunk_bytes)
    assert [s.name for s in plan.layout.specs] == ["norm", "up", "qkv", "embed", "scale", "steps", "kv_cols"]
    got = _run(plan, t)
    qkv = np.concatenate([t["q"][8:], t["k"][4:], t["v"][4:]], axis=0)
    np.testing.assert_array_equal(got["qkv"], _bf16(qkv))
    np.testing.assert_array_equal(got["up"], _bf16(t["up"][:, 20:]))
    np.testing.assert_array_equal(got["embed"], t["embed"])
    np.testing.assert_array_equal(got["scale"], t["scale"])
    np.testing.assert_array_equal(got["steps"], t["steps"])
    np.testing.assert_array_equal(got["kv_cols"], np.concatenate([t["k"], t["v"]], axis=1).astype(np.float16))


def test_bf16_rounding_matches_torch_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38, 1 + 2**-8, 1 + 3 * 2**-8],
                                 dtype=np.float32)])
    plan = WeightPlan(specs_of({"x": x}), [DstTensor("x", "bfloat16", (Part("x"),))], chunk_bytes=1000)
    np.testing.assert_array_equal(_run(plan, {"x": x})["x"], _bf16(x))  # torch path
    np.testing.assert_array_equal(f32_to_bf16_bits(x), _bf16(x))  # numpy fallback
    np.testing.assert_array_equal(bf16_bits_to_f32(_bf16(x)).view(np.uint32), _bf16(x).astype(np.uint32) << 16)


def test_plan_rejects_inconsistent_mappings() -> None:
    t = _trainer(np.random.default_rng(2))
    src = specs_of(t)
    with pytest.raises(LayoutError, match="does not have"):
        WeightPlan(src, [DstTensor("x", "float32", (Part("nope"),))])
    with pytest.raises(LayoutError, match="differ outside axis"):
        WeightPlan(src, [DstTensor("x", "float32", (Part("q"), Part("up")))])
    with pytest.raises(LayoutError, match="cannot convert"):
        WeightPlan(src, [DstTensor("x", "float32", (Part("steps"),))])
    with pytest.raises(LayoutError, match="does not split"):
        shard(same_layout(src), src, rank=0, world=3, dims={"q": 0})
    plan = WeightPlan(src, same_layout(src))
    t["q"] = t["q"][:4]
    with pytest.raises(LayoutError, match="rebuild the plan"):
        plan.check_sources(t)


def test_fanout_shapes() -> None:
    assert fanout(4, "direct") == [-1, -1, -1, -1]
    assert fanout(4, "chain") == [-1, 0, 1, 2]
    assert fanout(6, "tree", degree=2) == [-1, 0, 0, 1, 1, 2]
    assert depth(fanout(7, "tree", degree=2)) == 3
    assert depth(fanout(5, "chain")) == 5
    with pytest.raises(LayoutError):
        fanout(3, "ring")


@pytest.mark.parametrize("kind", ["xxh3", "lanesum", "crc32"])
def test_checksums_catch_flips_stale_bytes_and_misplaced_blocks(kind: str) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=5 * 8192 + 77, dtype=np.uint8)
    base = checksum(a, kind)
    assert checksum(a.copy(), kind) == base
    for i in (0, 8191, 3 * 8192 + 5, a.nbytes - 1):  # single bit flips, in blocks and in the tail
        b = a.copy()
        b[i] ^= 0x10
        assert checksum(b, kind) != base
    b = a.copy()
    b[100:600] = 0  # stale or missing bytes
    assert checksum(b, kind) != base
    b = a.copy()
    b[0:8192], b[8192:16384] = a[8192:16384], a[0:8192]  # blocks landing in each other's place
    assert checksum(b, kind) != base
    for i, j in ((0, 1), (0, 15), (6, 9)):  # 512-byte rows swapped inside one 8 KiB block
        b = a.copy()
        b[i * 512:(i + 1) * 512], b[j * 512:(j + 1) * 512] = \
            a[j * 512:(j + 1) * 512], a[i * 512:(i + 1) * 512]
        assert checksum(b, kind) != base
    with pytest.raises(LayoutError):
        checksum(a, "md5")


def test_default_checksum_is_xxh3_with_the_weights_extra() -> None:
    pytest.importorskip("xxhash")  # installed by the dev and all extras, so CI runs this
    from tensorfabric.weights import DEFAULT_CHECKSUM
    assert DEFAULT_CHECKSUM == "xxh3"
    a = np.arange(1 << 16, dtype=np.uint8)
    assert checksum(a) == checksum(a, "xxh3") != checksum(a, "lanesum")
