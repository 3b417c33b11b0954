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


@pytest.mark.parametrize("dtype", ["u1", "f2", "f4", ">f4", "<i8", "c8", "?", "S5", "U3", "V6",
                                   "M8[s]", "i4,f8"])
def test_every_numpy_dtype_is_its_bytes_and_strides_are_refused(pair, dtype) -> None:
    """Writes take any C-contiguous numpy array as its bytes, whatever the dtype's buffer
    format (the fast path casts the array's own memoryview; formats that refuse a cast, or
    that the buffer protocol refuses, take the reshape path), and refuse strided views: a
    1-D uint8 view with a step, too, which is already a 1-D byte format."""
    a, b = pair
    src = np.frombuffer(np.random.default_rng(1).bytes(240), dtype=np.dtype(dtype))[:8]
    src = np.ascontiguousarray(src.reshape(2, 4))
    dst = np.zeros(src.nbytes, np.uint8)
    region = b.register(dst)
    try:
        a.write(src, region.descriptor()).wait(10)
        assert dst.tobytes() == src.tobytes()
        for strided in (src[:, ::2], src.T, np.zeros(16, np.uint8)[::2]):
            with pytest.raises(tf.ConfigError, match="C-contiguous"):
                a.write(strided, region.descriptor())
        frozen = src.copy()
        frozen.flags.writeable = False
        with pytest.raises(tf.ConfigError, match="read-only"):
            a.read(region.descriptor(), frozen)
    finally:
        b.unregister(region)


def test_alloc_views_share_memory(pair) -> None:
    _, b = pair
    region = b.alloc(4096)
    floats = region.view_as(np.float32, (32, 32))
    floats[0, 0] = 1.5
    assert region.array[:4].view(np.float32)[0] == 1.5
    with pytest.raises(tf.ConfigError):
        b.alloc(-1)
