"""Building the engines ``tensorfabric bench`` measures, from command-line style options."""

from __future__ import annotations

import os
from typing import Any

BENCH_SECRET_ENV = "TENSORFABRIC_SECRET"
_DEFAULT_SECRET = "tensorfabric-bench"
KNOWN_TRANSPORTS = ("tcp", "shm", "nixl")


def bench_secret() -> str:
    """The cluster secret: ``$TENSORFABRIC_SECRET``, else a fixed one for local benchmark runs."""
    return os.environ.get(BENCH_SECRET_ENV) or _DEFAULT_SECRET


def engine_from_options(
    *, host: str = "127.0.0.1", port: int = 0, transport: str = "tcp", links: int = 1,
    link_addrs: list[str] | None = None, name: str = "bench", timeout: float = 60.0,
    chunk_bytes: int | None = None,
) -> Any:
    """An :class:`tensorfabric.Engine` restricted to ``transport`` with the given links.

    ``link_addrs`` lists the local addresses of this engine's NICs: it listens on each (so a
    peer's link ``i`` arrives on NIC ``i``) and binds its own link ``i`` to entry ``i``; when
    given it sets the link count.
    """
    import tensorfabric as tf

    if transport not in KNOWN_TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: use tcp, shm or nixl")
    # shm moves the data into shared-memory regions; control messages still go over tcp.
    transports = {"tcp": ("tcp",), "shm": ("shm", "tcp"), "nixl": ("nixl", "tcp")}[transport]
    kwargs: dict[str, Any] = dict(secret=bench_secret(), timeout=timeout, name=name,
                                  transports=transports)
    if chunk_bytes:
        kwargs["chunk_bytes"] = chunk_bytes
    if link_addrs:
        kwargs["links"] = list(link_addrs)
        kwargs["listen"] = [(a, port if i == 0 else 0) for i, a in enumerate(link_addrs)]
    else:
        kwargs.update(host=host, port=port, links=links)
    return tf.Engine(**kwargs)
