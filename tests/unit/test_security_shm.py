"""Shared memory as a capability, attacked from another process of the same user.

A descriptor names no file or process: the owner hands over exactly the region a key opens,
with exactly its access, and unregistering takes it back from every peer that mapped it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tensorfabric as tf
from tensorfabric import Access

SECRET = "shm-security-secret"
ATTACKER = Path(__file__).with_name("_attacker.py")


class Attacker:
    """An engine in another process (see ``_attacker.py``), driven one command at a time."""

    def __init__(self, **opts: object) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.p = subprocess.Popen([sys.executable, str(ATTACKER), SECRET, json.dumps(opts)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        assert self._line() == {"ready": True}

    def _line(self) -> dict:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, "the attacker process died"
        return json.loads(line)

    def __call__(self, op: str, desc: tf.RegionDescriptor | str | None = None,
                 **kw: object) -> dict:
        assert self.p.stdin is not None
        cmd = {"op": op, **kw}
        if desc is not None:
            cmd["desc"] = desc if isinstance(desc, str) else desc.to_bytes().hex()
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._line()

    def close(self) -> None:
        try:
            self("quit")
        except (AssertionError, BrokenPipeError, ValueError):
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def attacker():
    a = Attacker()
    yield a
    a.close()


@pytest.fixture
def owner():
    with tf.Engine(SECRET, name="owner") as eng:
        yield eng


def test_descriptor_names_no_process_or_file(owner) -> None:
    r = owner.alloc(4096)
    desc = r.descriptor()
    raw = desc.to_bytes()
    assert not hasattr(desc, "shm_fd") and not hasattr(desc, "shm_pid")
    with pytest.raises(tf.ConfigError):
        tf.RegionDescriptor.from_bytes(raw[:30])  # truncated: a clear error, not struct.error
    with pytest.raises(tf.ConfigError):
        tf.RegionDescriptor.from_bytes(raw[:40])  # no owner address


def test_one_key_opens_only_its_own_region(owner, attacker) -> None:
    mine = owner.alloc(4096)  # the attacker was given this one
    ro = owner.alloc(4096, Access.REMOTE_READ)
    wo = owner.alloc(4096, Access.REMOTE_WRITE)
    ro.array[:] = 7
    wo.array[:] = 9
    assert attacker("write", mine.descriptor(), data="aa" * 16)["ok"]
    for victim in (ro, wo):
        forged = dataclasses.replace(mine.descriptor(), region_id=victim.id, shm=True)
        assert attacker("write", forged, data="ff" * 16)["error"] == "AccessError"
        assert attacker("read", forged, n=16)["error"] == "AccessError"
    assert (ro.array == 7).all() and (wo.array == 9).all()


def test_read_only_grant_cannot_be_upgraded(owner, attacker) -> None:
    ro = owner.alloc(4096, Access.REMOTE_READ)
    ro.array[:] = 5
    # asking to write a read-only region is refused before any memory is handed over
    assert attacker("grab", ro.descriptor(), need=int(Access.REMOTE_WRITE))["granted"] is False
    got = attacker("grab", ro.descriptor(), need=int(Access.REMOTE_READ))
    assert got["granted"] and got["mode"] == "ro"
    assert got["second_redeem"] is False
    assert got["reopen_rw"] == "refused" and got["pwrite"] == "refused"
    assert got["truncate"] == "refused"
    assert (ro.array == 5).all()


def test_write_only_region_is_not_readable_through_memory(owner, attacker) -> None:
    wo = owner.alloc(4096, Access.REMOTE_WRITE)
    wo.array[:] = 3
    assert not wo.descriptor().shm  # peers reach it over tcp
    forged = dataclasses.replace(wo.descriptor(), shm=True)
    for need in (Access.REMOTE_READ, Access.REMOTE_WRITE):
        assert attacker("grab", forged, need=int(need))["granted"] is False
    assert attacker("read", wo.descriptor(), n=16)["error"] == "AccessError"
    assert attacker("write", wo.descriptor(), data="01" * 8)["ok"]
    assert bytes(wo.array[:8]) == b"\1" * 8


def test_writer_says_once_that_a_write_only_region_goes_over_tcp(caplog) -> None:
    """Same-host writes into a write-only region go over tcp (it is never mapped): the writer
    logs that once per region at debug level (a user who asked for shm sees why it is not
    used), and never for a region it reaches through memory."""
    import numpy as np

    with tf.Engine("wo-log") as owner, tf.Engine("wo-log") as writer:
        wo = owner.alloc(4096, Access.REMOTE_WRITE)
        rw = owner.alloc(4096, Access.READ_WRITE)
        with caplog.at_level("DEBUG", logger="tensorfabric"):
            for _ in range(3):
                for r in (wo, rw):
                    writer.write(np.ones(64, np.uint8), r.descriptor()).wait(10)
        told = [m for m in caplog.messages if "write-only" in m]
        assert len(told) == 1 and f"region {wo.id} " in told[0], told
        assert not any(f"region {rw.id} " in m for m in caplog.messages)
        assert bytes(wo.array[:64]) == b"\1" * 64 and bytes(rw.array[:64]) == b"\1" * 64


def test_unregister_revokes_mapped_peers(owner, attacker) -> None:
    r = owner.alloc(4096)
    keep = r.array  # the owner's own view outlives the registration
    desc = r.descriptor()
    assert attacker("write", desc, data="11" * 8)["ok"]
    assert attacker("maps")["maps"] >= 1
    before = attacker("maps")["maps"]
    r.close()
    assert attacker("maps")["maps"] == before - 1  # told, and the mapping is gone
    assert attacker("write", desc, data="22" * 8)["error"] == "AccessError"
    assert attacker("read", desc, n=8)["error"] == "AccessError"
    zero = dataclasses.replace(desc, key=b"\0" * 16)
    assert attacker("read", zero, n=8)["error"] == "AccessError"
    assert bytes(keep[:8]) == b"\x11" * 8 and not keep[8:].any()


def test_forged_larger_size_writes_nothing(owner, attacker) -> None:
    r = owner.alloc(4096)
    keep = r.array
    forged = dataclasses.replace(r.descriptor(), nbytes=1 << 20)
    out = attacker("write", forged, data="ab" * 4096, offset=4096 - 16)
    assert out["error"] == "AccessError"
    assert not keep.any()


def test_forged_larger_size_on_a_cached_mapping_writes_nothing(owner, attacker) -> None:
    """The mapping is cached by region and key, not by the size a descriptor claims: a write
    past the owner's size through it is refused by the size the owner granted."""
    r = owner.alloc(4096)
    keep = r.array
    assert attacker("write", r.descriptor(), data="01" * 8)["ok"]  # mapped and cached
    forged = dataclasses.replace(r.descriptor(), nbytes=1 << 20)
    for n, at in ((16, 4096 - 8), (4096, 4096 - 16), (1 << 17, 0)):  # small and numpy copies
        out = attacker("write", forged, data="ab", repeat=n, offset=at)
        assert out["error"] == "AccessError", (n, out)
    assert bytes(keep[:8]) == b"\x01" * 8 and not keep[8:].any()


def test_stalling_grant_clients_do_not_block_peers(owner, attacker) -> None:
    """Any local user can connect to the owner's grant socket; stalling clients are served
    (and cut off) on threads of their own and a peer with a real ticket still gets through."""
    import socket
    import time

    r = owner.alloc(4096)
    stallers = []
    for _ in range(40):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(owner._shm.grants.name)
        stallers.append(s)
    try:
        assert attacker("write", r.descriptor(), data="77" * 8)["ok"]
        assert bytes(r.array[:8]) == b"\x77" * 8
    finally:
        for s in stallers:
            s.close()
    time.sleep(0.1)


def test_cached_mapping_never_serves_a_wrong_key(owner, attacker) -> None:
    r = owner.alloc(4096)
    keep = r.array
    assert attacker("write", r.descriptor(), data="01" * 8)["ok"]  # mapped and cached
    for key in (b"\0" * 16, bytes(16 - 1) + b"\1"):
        forged = dataclasses.replace(r.descriptor(), key=key)
        assert attacker("write", forged, data="ee" * 8, offset=100)["error"] == "AccessError"
        assert attacker("read", forged, n=8)["error"] == "AccessError"
    assert not keep[100:].any()  # refused, and nothing was written
