"""Control messages between a publisher and its replicas (small two-sided sends, JSON).

Data never travels here: chunks are one-sided writes into the replica's reserved slot, each
carrying the immediate ``imm(round, chunk)`` so the replica knows when chunk i has landed.

Round r of version v (publisher P, replica R; every message after hello carries v and r):
  R -> P  hello {name, fingerprint, slots: [descriptor hex, descriptor hex]}   (once, on join)
  P -> R  welcome {version} | error {reason}
  P -> R  prepare {v, chunks: [[offset, nbytes], ...], timeout, checksum: xxh3 | lanesum | crc32}
  R -> P  ready {v, slot} | done {v, ok: false, reason}    (after readers left the free slot)
  P -> R  go {v, children: [[address hex, descriptor hex], ...]}    (R forwards chunks to them)
  P -> R  commit {v, crcs: [...]}    (a checksum per chunk, after every chunk was written)
  R -> P  done {v, ok, reason, seconds}    (ok: verified and swapped in; else old version kept)
  P -> R  abort {v}
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import tensorfabric as tf

TAG_REPLICA = 0x5701  # messages to a replica
TAG_PUBLISHER = 0x5702  # messages to the publisher
_CHUNK_BITS = 20
MAX_CHUNKS = 1 << _CHUNK_BITS


def imm(rnd: int, chunk: int) -> int:
    """The 32-bit immediate of chunk ``chunk`` in round ``rnd`` (rounds wrap every 4096)."""
    return ((rnd & 0xFFF) << _CHUNK_BITS) | chunk


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    msg = json.loads(data)
    if not isinstance(msg, dict) or "kind" not in msg:
        raise ValueError("not a weights control message")
    return msg


def poll(engine: tf.Engine, tag: int, closed: threading.Event,
         timeout: float = 0.2) -> tf.Message | None:
    """The next control message with ``tag``, or None if none came within ``timeout`` or the
    engine failed (then after a short pause, unless ``closed`` is set): control loops call this
    until they are closed."""
    try:
        return engine.recv(tag=tag, timeout=timeout)
    except tf.TransferTimeout:
        return None
    except tf.TensorFabricError:
        if not closed.is_set():
            time.sleep(0.05)
        return None
