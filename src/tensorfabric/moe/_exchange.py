"""Rendezvous: every rank publishes a small blob (its engine address and region descriptors)
and gets everyone's back, in rank order.

Any callable ``exchange(blob: bytes) -> list[bytes]`` (an all-gather) will do, e.g. one over
``torch.distributed.all_gather_object`` that a training job already has. Two come with us:
:class:`FileExchange` (a directory every rank can read, such as a shared file system) and
:class:`EngineExchange` (rank 0's engine collects and answers over ``send``/``recv``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from .._engine import Engine
from .._errors import ConfigError, TransferTimeout

#: an all-gather: this rank's blob in, every rank's blob (index = rank) out
Exchange = Callable[[bytes], "list[bytes]"]

_TAG = 0x4D6F4500  # send/recv tag of EngineExchange ("MoE\0")
_MAX_BLOB = 1 << 20


class FileExchange:
    """All-gather through files ``<directory>/<key>.<rank>`` (written atomically).

    Use a fresh ``key`` (or directory) per group: files left by an earlier group with the same
    key would be read as this one's.
    """

    def __init__(self, directory: str | os.PathLike[str], rank: int, world: int, *,
                 key: str = "moe", timeout: float = 60.0, poll: float = 0.01) -> None:
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, {world})")
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.key, self.timeout, self.poll = key, timeout, poll

    def __call__(self, blob: bytes) -> list[bytes]:
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = self.dir / f"{self.key}.{self.rank}"
        tmp = mine.with_name(mine.name + f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, mine)
        deadline = time.monotonic() + self.timeout
        out: list[bytes | None] = [None] * self.world
        while True:
            for r in range(self.world):
                if out[r] is None:
                    try:
                        out[r] = (self.dir / f"{self.key}.{r}").read_bytes()
                    except FileNotFoundError:
                        pass
            if all(b is not None for b in out):
                return [b for b in out if b is not None]
            if time.monotonic() > deadline:
                missing = [r for r, b in enumerate(out) if b is None]
                raise TransferTimeout(f"ranks {missing} did not publish to {self.dir} within "
                                      f"{self.timeout} s")
            time.sleep(self.poll)


class EngineExchange:
    """All-gather over the engine: ranks send their blob to rank 0, which answers with all.

    Every rank but 0 needs rank 0's ``engine.address`` (``root``), handed over out of band.
    """

    def __init__(self, engine: Engine, rank: int, world: int, *, root: bytes | None = None,
                 timeout: float = 60.0, tag: int = _TAG) -> None:
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, {world})")
        if rank and root is None:
            raise ConfigError("EngineExchange needs rank 0's engine address (root=) on every "
                              "other rank")
        self.engine, self.rank, self.world = engine, rank, world
        self.root, self.timeout, self.tag = root, timeout, tag

    def __call__(self, blob: bytes) -> list[bytes]:
        eng, t = self.engine, self.timeout
        if self.rank:
            assert self.root is not None
            eng.send(self.root, json.dumps([self.rank, blob.hex()]).encode(),
                     tag=self.tag).wait(t)
            return [bytes.fromhex(h) for h in json.loads(eng.recv(tag=self.tag, timeout=t).data)]
        out: list[bytes | None] = [blob] + [None] * (self.world - 1)
        peers: list[bytes] = []
        deadline = time.monotonic() + t
        while len(peers) < self.world - 1:
            msg = eng.recv(tag=self.tag, timeout=max(deadline - time.monotonic(), 0.001))
            if len(msg.data) > _MAX_BLOB:
                raise ConfigError(f"rendezvous blob of {len(msg.data)} bytes from {msg.peer!r}")
            rank, hexblob = json.loads(msg.data)
            if not (isinstance(rank, int) and 0 < rank < self.world) or out[rank] is not None:
                raise ConfigError(f"rendezvous: unexpected or duplicate rank {rank!r}")
            out[rank] = bytes.fromhex(hexblob)
            peers.append(msg.peer)
        answer = json.dumps([b.hex() for b in out if b is not None]).encode()
        for p in peers:
            eng.send(p, answer, tag=self.tag).wait(t)
        return [b for b in out if b is not None]
