"""Refuse before writing: whole ops are checked, integers never wrap, bad input is a clear error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric import Access

from test_security_shm import SECRET, Attacker


@pytest.fixture(scope="module")
def attacker():
    a = Attacker()
    yield a
    a.close()


@pytest.fixture(scope="module")
def owner():
    with tf.Engine(SECRET, name="owner") as eng:
        yield eng


@pytest.mark.parametrize("kw", [
    dict(dst_pages=[2 ** 52], page_size=4096),
    dict(dst_pages=[1], dst_stride=2 ** 63, page_size=4096),
    dict(dst_pages=[0], dst_offset=2 ** 64 - 4096, page_size=4096),
    dict(dst_pages=[2 ** 63], dst_stride=2, page_size=4096),
])
def test_write_pages_offsets_never_wrap(owner, kw) -> None:
    with tf.Engine(SECRET, transports=("tcp",)) as peer:
        region = owner.register(np.zeros(8192, np.uint8))
        with pytest.raises((tf.AccessError, tf.ConfigError)):
            peer.write_pages(b"\xff" * 4096, region.descriptor(), src_pages=[0], **kw).wait(10)
        assert not region.array.any()
        region.close()


@pytest.mark.parametrize("shared", [False, True])
def test_forged_larger_size_writes_nothing_over_any_transport(owner, attacker, shared) -> None:
    size = 8 << 20
    region = owner.alloc(size) if shared else owner.register(np.zeros(size, np.uint8))
    keep = region.array
    forged = dataclasses.replace(region.descriptor(), nbytes=4 * size)
    # 12 MiB from 4 MiB: three 4 MiB chunks, the first one inside the real region
    out = attacker("write", forged, data="5a" * 4096, repeat=3 * 1024, offset=4 << 20)
    assert out["error"] == "AccessError", out
    assert not keep.any()
    region.close()


def test_read_with_forged_size_is_refused(owner, attacker) -> None:
    region = owner.register(np.ones(4 << 20, np.uint8), Access.REMOTE_READ)
    forged = dataclasses.replace(region.descriptor(), nbytes=16 << 20)
    assert attacker("read", forged, n=16 << 20)["error"] == "AccessError"
    region.close()


def test_cancelled_and_timed_out_expects_leave_nothing(owner) -> None:
    for i in range(200):
        owner.expect(10_000 + i).cancel()
        with pytest.raises(tf.TransferTimeout):
            owner.expect(20_000 + i, timeout=0.001).wait()
    assert not owner._imm_waiters
    assert not [k for k in owner._imm_counts if k >= 10_000]


@pytest.mark.parametrize("raw", [b"", b"tfRD", b"tfRD\x02\x03\x00\x00" + b"\0" * 8, b"x" * 100])
def test_truncated_or_garbage_descriptor_is_a_config_error(owner, raw) -> None:
    with pytest.raises(tf.ConfigError):
        owner.write(b"x", raw)
