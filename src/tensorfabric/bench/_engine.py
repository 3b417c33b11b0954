"""Building the engines ``tensorfabric bench`` measures, from command-line style options."""

from __future__ import annotations

import inspect
import os
from typing import Any

BENCH_SECRET_ENV = "TENSORFABRIC_SECRET"
_DEFAULT_SECRET = "tensorfabric-bench"


def bench_secret() -> str:
    """The cluster secret: ``$TENSORFABRIC_SECRET``, else a fixed one for local benchmark runs."""
    return os.environ.get(BENCH_SECRET_ENV) or _DEFAULT_SECRET


def engine_from_options(
    *, host: str = "127.0.0.1", port: int = 0, transport: str = "tcp", links: int = 1,
    link_addrs: list[str] | None = None, name: str = "bench", timeout: float = 60.0,
) -> Any:
    """An :class:`tensorfabric.Engine` restricted to ``transport`` with the given links.

    ``link_addrs`` lists the local addresses the links bind to (one per link, one per NIC);
    when given it sets the link count.
    """
    import tensorfabric as tf

    kwargs: dict[str, Any] = dict(secret=bench_secret(), host=host, port=port, timeout=timeout,
                                  name=name)
    params = inspect.signature(tf.Engine).parameters
    kwargs["links"] = list(link_addrs) if link_addrs else links
    if "transports" in params:
        kwargs["transports"] = _transports_for(transport)
    elif transport != "tcp" and "shm" in params:
        kwargs["shm"] = transport == "shm"
    elif "shm" in params:
        kwargs["shm"] = False
    return tf.Engine(**kwargs)


def _transports_for(transport: str) -> tuple[str, ...]:
    if transport == "tcp":
        return ("tcp",)
    if transport == "shm":
        return ("shm", "tcp")  # tcp carries control (send/recv) where shm cannot
    if transport == "nixl":
        return ("nixl", "tcp")
    raise ValueError(f"unknown transport {transport!r}: use tcp, shm or nixl")
