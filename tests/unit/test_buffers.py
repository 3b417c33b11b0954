"""What can be registered, and how it is refused."""

from __future__ import annotations

import numpy as np
import pytest

import tensorfabric as tf


@pytest.fixture(scope="module")
def pair():
    with tf.Engine("s", transports=("tcp",)) as a, tf.Engine("s") as b:
        yield a, b


def test_torch_tensors_any_dtype(pair) -> None:
    torch = pytest.importorskip("torch")
    a, b = pair
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        dst = torch.zeros(1000, dtype=dtype)
        src = torch.arange(1000).to(dtype)
        region = b.register(dst)
        a.write(src, region.descriptor()).wait(10)
        assert torch.equal(dst, src)
        b.unregister(region)


def test_non_contiguous_and_read_only_are_refused(pair) -> None:
    _, b = pair
    with pytest.raises(tf.ConfigError, match="C-contiguous"):
        b.register(np.zeros((10, 10))[:, 1])
    with pytest.raises(tf.ConfigError, match="read-only"):
        b.register(b"immutable")
    b.register(b"immutable", access=tf.Access.REMOTE_READ).close()  # fine for reads
    with pytest.raises(tf.ConfigError, match="not a buffer"):
        b.register(12345)  # type: ignore[arg-type]


def test_alloc_views_share_memory(pair) -> None:
    _, b = pair
    region = b.alloc(4096)
    floats = region.view_as(np.float32, (32, 32))
    floats[0, 0] = 1.5
    assert region.array[:4].view(np.float32)[0] == 1.5
    with pytest.raises(tf.ConfigError):
        b.alloc(-1)
