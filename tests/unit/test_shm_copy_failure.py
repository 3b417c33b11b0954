"""A shared-memory copy that fails mid-op fails its transfer cleanly: BrokenError on the
transfer, the mapping released (a later unregister does not wait on it), the engine usable."""

from __future__ import annotations

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric import Access, BrokenError

SECRET = "shm-copy-failure"


@pytest.mark.parametrize("shape", ["one segment", "one big segment", "pages"])
def test_a_failed_copy_fails_the_transfer_and_releases_the_mapping(shape: str) -> None:
    with tf.Engine(SECRET, name="a") as a, tf.Engine(SECRET, name="b") as b:
        region = b.alloc(1 << 20, Access.READ_WRITE)
        desc = region.descriptor()
        src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
        a.write(src, desc, nbytes=4096).wait(30)  # maps the region
        assert a._transport_for(a._peer(b.address), desc) is a._shm
        (m,) = a._shm._maps.values()
        good = m.arr
        frozen = good.view()
        frozen.flags.writeable = False
        m.arr = frozen  # every copy into the mapping now raises

        def op() -> tf.Transfer:
            if shape == "one segment":  # copied under the GIL
                return a.write(src, desc, nbytes=64 << 10)
            if shape == "one big segment":  # copied by numpy
                return a.write(src, desc, nbytes=256 << 10)
            return a.write_pages(src, desc, src_pages=np.arange(0, 64, 2),
                                 dst_pages=np.arange(32), page_size=4096)

        t = op()
        with pytest.raises(BrokenError, match="shared-memory copy failed"):
            t.wait(30)
        assert m.users == 0  # released on the failure path
        m.arr = good
        op().wait(30)  # the same mapping serves the next op
        assert m.users == 0
        if shape != "pages":
            n = 64 << 10 if shape == "one segment" else 256 << 10
            assert bytes(region.view[:n]) == src[:n].tobytes()
        else:
            got = np.frombuffer(region.view, np.uint8)[: 32 * 4096].reshape(32, 4096)
            np.testing.assert_array_equal(got, src.reshape(-1, 4096)[0:64:2])
        b.unregister(region)
