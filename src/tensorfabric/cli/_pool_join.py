"""``pool join --block``: joining a pool, staying in it, and rejoining a head that went away."""

from __future__ import annotations

import time
from typing import Any

import typer

from ._pool import _Child, _connect, _on_sigterm


def head_keeps_state() -> bool:
    """Whether the connected pool's head keeps Ray's state across restarts."""
    from ray.experimental.internal_kv import _internal_kv_get

    from tensorfabric.pool._client import NAMESPACE
    from tensorfabric.pool._cluster import GCS_FT_KEY

    try:
        return bool(_internal_kv_get(GCS_FT_KEY, namespace=NAMESPACE))
    except Exception:
        return False


def _join_once(address: str, claims: Any, sec: str, join_id: str, opts: dict[str, Any],
               verify: bool, block: bool) -> tuple[Any, bool]:  # fmt: skip
    """``ray start`` this node, wait for it in the cluster, verify. The child if ``block``,
    and whether the head keeps Ray's state across restarts (GCS fault tolerance)."""
    from tensorfabric.pool import PoolError
    from tensorfabric.pool._cluster import join as ray_join
    from tensorfabric.pool._cluster import wait_for_node

    proc = ray_join(address, claims, sec, join_id, block=block, **opts)
    child = _Child(proc) if proc is not None else None
    try:
        from tensorfabric.pool._client import connect

        connect(address)  # the node needs the cluster, not the controller (it may start later)
        node = wait_for_node(join_id)
        keeps = head_keeps_state()
        typer.echo(f"joined as node {node['NodeID'][:12]} with {claims.to_label_string()}"
                   + (" (the head keeps Ray's state across restarts)" if keeps else ""))  # fmt: skip
        if verify:
            from rich.console import Console

            pool = _controller_within(address, sec, 60.0)
            with Console(stderr=True).status("verifying claims (memory, compute, transfer) ..."):
                rec = pool.verify(node["NodeID"])
            word = "verified" if rec["verified"] else "NOT verified"
            typer.echo(f"{word}: {rec['reason']} (score {rec['score']:.1f} GFLOP/s)")
    except (PoolError, ConnectionError) as exc:
        if child is not None:
            child.stop()
        raise PoolError(str(exc)) from None
    finally:
        import ray

        ray.shutdown()
    return child, keeps


def _controller_within(address: str, sec: str, timeout: float) -> Any:
    """The pool once its controller runs (a restarted head creates it a little later)."""
    from tensorfabric.pool import PoolError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return _connect(address, sec)
        except PoolError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


HEAD_LOST_S = 10.0  # the head's port refusing connections this long means the head is gone
BACKOFF_MAX_S = 10.0  # retries while the head is down cost one TCP connect each


def _join_forever(address: str, claims: Any, sec: str, join_id: str, opts: dict[str, Any],
                  verify: bool) -> None:  # fmt: skip
    """Stay joined: rejoin with backoff whenever the node drops out of the pool."""
    from tensorfabric.pool import PoolError
    from tensorfabric.pool._cluster import reachable

    _on_sigterm()
    attempt, child, joined = 0, None, False
    try:
        while True:
            why = reachable(address)
            if why is None:
                try:
                    # After the first join the head re-checks the node itself (its record
                    # carries over under the same join id, marked for a re-check).
                    child, keeps = _join_once(address, claims, sec, join_id, opts,
                                              verify and not joined, block=True)  # fmt: skip
                    attempt, joined = 0, True
                    why = _watch(child, address, keeps)
                except PoolError as exc:
                    why = str(exc)
                if child is not None:
                    child.stop()
                    child = None
            attempt += 1
            delay = min(2.0 ** min(attempt, 4), BACKOFF_MAX_S)
            what = "lost the pool head" if joined else "cannot reach the pool head"
            again = "rejoining" if joined else "retrying"
            typer.secho(f"{what} at {address} ({why}); {again} in {delay:.0f} s "
                        f"(attempt {attempt}) ...", fg=typer.colors.YELLOW, err=True)  # fmt: skip
            time.sleep(delay)
    except KeyboardInterrupt:
        if child is not None:
            child.stop()


def _watch(child: Any, address: str, keeps_state: bool = False) -> str:
    """Block while the node is in the pool; return why it no longer is.

    A head that keeps Ray's state (GCS fault tolerance) is waited for: the node's raylet
    reconnects when it is back (its replicas keep running meanwhile), or exits after Ray's
    reconnect timeout. Otherwise a head gone for HEAD_LOST_S is lost with its state."""
    from tensorfabric.pool._cluster import RECONNECT_S, reachable

    down_since = None
    while child.proc.poll() is None:
        time.sleep(1.0)
        why = reachable(address)
        if why is None:
            if down_since is not None and keeps_state:
                typer.echo(f"the pool head at {address} is back after "
                           f"{time.monotonic() - down_since:.0f} s; still joined")  # fmt: skip
            down_since = None
        elif down_since is None:
            down_since = time.monotonic()
            if keeps_state:
                typer.secho(f"lost the pool head at {address} ({why}); waiting up to {RECONNECT_S} s "
                            "for it to come back (it keeps Ray's state)", fg=typer.colors.YELLOW,
                            err=True)  # fmt: skip
        elif time.monotonic() - down_since > HEAD_LOST_S and not keeps_state:
            return f"head unreachable for {HEAD_LOST_S:g} s: {why}"
    return child.why()
