"""``tensorfabric pool up|join|deploy|status|down``: GPU pools on Ray."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Optional

import typer

pool_app = typer.Typer(
    help="GPU pools on Ray: providers join with labels, deployments are placed by location "
    "and hardware.",
    no_args_is_help=True,
)

ADDRESS = typer.Option(None, "--address", "-a", help="Ray head HOST:PORT (default: this machine's cluster).")
SECRET = typer.Option(None, "--secret", help="Cluster secret (prefer the TENSORFABRIC_SECRET env var).")


def register(app: typer.Typer) -> None:
    app.add_typer(pool_app, name="pool")


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _connect(address: Optional[str], secret: Optional[str], create: bool = False, **kw: Any) -> Any:
    from tensorfabric.pool import Pool
    from tensorfabric.pool._cluster import resolve_secret, use_secret

    use_secret(resolve_secret(secret))
    return Pool(address, create=create, **kw)


class _Child:
    """A ``ray start --block`` child: its output is echoed, and the last lines kept for errors."""

    def __init__(self, proc: Any) -> None:
        import collections
        import threading

        self.proc = proc
        self.tail: collections.deque[str] = collections.deque(maxlen=4)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            sys.stdout.write(line)
            sys.stdout.flush()

    def why(self) -> str:
        last = [ln for ln in self.tail if ln.strip()]
        return f"ray exited with code {self.proc.poll()}" + (f": {last[-1].strip()}" if last else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()


def _on_sigterm() -> None:
    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _block_on(child: _Child) -> None:
    """Wait on a ``ray start --block`` child; SIGTERM/SIGINT stop it cleanly."""
    _on_sigterm()
    try:
        child.proc.wait()
    except KeyboardInterrupt:
        child.stop()


@pool_app.command()
def up(
    port: int = typer.Option(6379, help="GCS port of the head."),
    address: Optional[str] = typer.Option(None, "--address", "-a", help="Use this running head instead of starting one."),
    secret: Optional[str] = SECRET,
    block: bool = typer.Option(False, help="Stay in the foreground; Ctrl-C stops the head."),
    num_cpus: Optional[float] = typer.Option(None, help="CPUs the head offers to Ray."),
    state_dir: Optional[str] = typer.Option(None, help="Where the head keeps the pool's checkpoint (default ~/.tensorfabric/pool)."),
    verify_every: float = typer.Option(3600.0, help="Seconds a verification holds; nodes are re-checked before it expires."),
    temp_dir: Optional[str] = typer.Option(None, help="Ray's session folder for this head (default /tmp/ray)."),
    redis_address: Optional[str] = typer.Option(
        None, envvar="TENSORFABRIC_REDIS_ADDRESS",
        help="Keep Ray's cluster state in this Redis (HOST:PORT; GCS fault tolerance): a head "
        "restarted with the same port and Redis re-adopts running nodes and replicas."),
    redis_password: Optional[str] = typer.Option(None, envvar="TENSORFABRIC_REDIS_PASSWORD", show_default=False,
                                                 help="Password of that Redis (env var preferred)."),
    ray_state: str = typer.Option(
        "disk", help="Without --redis-address, where Ray keeps its cluster state: 'disk' (Ray's "
        "embedded RocksDB store under --state-dir: a restarted head re-adopts nodes and "
        "replicas) or 'memory' (a restarted head starts an empty cluster; nodes rejoin)."),
) -> None:
    """Start a pool head (Ray head + pool controller), or connect to one with --address.

    A restarted head reloads its checkpoint: verification records and deployments. Ray's own
    state is kept too (GCS fault tolerance: on disk by default, or in --redis-address), so
    nodes stay joined and running replicas are re-adopted; with --ray-state memory nodes
    rejoin and replicas are placed again as they do."""
    from tensorfabric.pool import PoolError
    from tensorfabric.pool._cluster import resolve_secret, use_secret
    from tensorfabric.pool._state import default_gcs_dir, default_state_file

    child, started = None, address is None
    try:
        if ray_state not in ("disk", "memory"):
            raise PoolError(f"--ray-state is 'disk' or 'memory', not {ray_state!r}")
        sec = resolve_secret(secret)
        use_secret(sec)  # before Ray is imported: Ray reads its auth settings on import
        state_file = default_state_file(int((address or f":{port}").rsplit(":", 1)[1]), state_dir)
        create: dict[str, Any] = {"state_file": state_file, "verify_ttl_s": verify_every}
        if address is None:
            gcs_dir = default_gcs_dir(port, state_dir) if ray_state == "disk" and not redis_address else None
            start = {"block": block, "num_cpus": num_cpus, "temp_dir": temp_dir, "gcs_dir": gcs_dir,
                     "redis_address": redis_address, "redis_password": redis_password}  # fmt: skip
            child, pool, st = _start_head(port, sec, start, create)
            address = f"127.0.0.1:{port}"
        else:
            pool, st = _connect_retry(address, sec, None, **create)
        store = "redis" if redis_address else ("rocksdb" if ray_state == "disk" else "")
        _mark_fault_tolerance(store if started else None)
    except BaseException as exc:  # never leave a started head behind (Ctrl-C, a bug)
        if child is not None:
            child.stop()
        if isinstance(exc, PoolError):
            _fail(exc)
        raise
    assert address is not None
    restored = st.get("restored") or {}
    typer.echo(f"pool controller ready on {address} ({len(st['nodes'])} node(s)); state in {state_file}.")
    if restored.get("records") or restored.get("adopted") or restored.get("pending"):
        typer.echo(f"restored: {restored['records']} verification record(s), "
                   f"{restored['adopted']} replica(s) adopted, {restored['pending']} to place "
                   "again as nodes rejoin.")  # fmt: skip
    typer.echo("join a GPU node with:\n  TENSORFABRIC_SECRET=... tensorfabric pool join "
               f"--address <this host's IP>:{address.rsplit(':', 1)[1]} --region R --zone Z "
               "--gpu-model M --gpu-memory-gb G --link-tier T --block")  # fmt: skip
    if child is not None:
        import ray

        ray.shutdown()
        _block_on(child)


HEAD_ATTEMPTS = 5  # 'ray start --head' runs this often before 'pool up' gives up


def _start_head(port: int, sec: str, start: dict[str, Any],
                create: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:  # fmt: skip
    """Start the Ray head and connect to its controller: (child or None, pool, status).

    A head whose ``ray start`` exits while starting is started again, up to HEAD_ATTEMPTS
    times: Ray gives its raylet a fixed ~15 s to see its agents' ports and aborts the whole
    head past that, which a loaded host misses now and then. The cluster state is kept
    (on disk or in Redis), so a second start resumes it as a restart would."""
    from tensorfabric.pool._cluster import HeadStartFailed, port_taken, start_head

    for attempt in range(1, HEAD_ATTEMPTS + 1):
        typer.echo(f"starting a Ray head on port {port} (token auth on) ...")
        child = None
        try:
            proc = start_head(port, sec, **start)
            child = _Child(proc) if proc is not None else None
            pool, st = _connect_retry(f"127.0.0.1:{port}", sec, child, **create)
            return child, pool, st
        except HeadStartFailed as exc:
            if child is not None:
                child.stop()
            if attempt == HEAD_ATTEMPTS:
                raise
            typer.secho(f"{exc}; starting it again (attempt {attempt + 1} of {HEAD_ATTEMPTS}) ...",
                        fg=typer.colors.YELLOW, err=True)  # fmt: skip
            import ray

            ray.shutdown()  # a driver connected to the GCS that went down with the head
            time.sleep(5.0 * attempt)  # let a burst of load on the host pass
            deadline = time.monotonic() + 30
            while port_taken(port) and time.monotonic() < deadline:
                time.sleep(0.5)  # the failed head's GCS is still exiting
        except BaseException:  # never leave a started head behind (Ctrl-C, no controller)
            if child is not None:
                child.stop()
            raise
    raise AssertionError("unreachable")


def _mark_fault_tolerance(store: Optional[str]) -> None:
    """Tell joining nodes where this head keeps Ray's state across restarts ("": nowhere;
    None: the head was not started here, leave the mark as it is)."""
    if store is None:
        return
    from ray.experimental.internal_kv import _internal_kv_put

    from tensorfabric.pool._client import NAMESPACE
    from tensorfabric.pool._cluster import GCS_FT_KEY

    _internal_kv_put(GCS_FT_KEY, store.encode(), overwrite=True, namespace=NAMESPACE)


def _connect_retry(address: str, secret: str, child: Any = None, timeout: float = 120.0,
                   **create: Any) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Connect (creating the controller) while the head comes up, until the controller
    answers (after a head restart with GCS fault tolerance, Ray first restarts the old
    controller on the new head); fail at once if the head died. The pool and its status."""
    from ray.exceptions import GetTimeoutError

    from tensorfabric.pool import PoolError
    from tensorfabric.pool._cluster import HeadStartFailed

    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.proc.poll() is not None:
            raise HeadStartFailed(f"the Ray head did not start: {child.why()}")
        try:
            pool = _connect(address, secret, create=True, **create)
            return pool, pool.status(timeout=15.0)
        except (PoolError, GetTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise PoolError(f"the pool controller did not answer within {timeout:g} s: {exc}") from None
            time.sleep(1.0)


@pool_app.command()
def join(
    address: str = typer.Option(..., "--address", "-a", help="Ray head HOST:PORT."),
    region: str = typer.Option(..., help="Region, e.g. eu-west."),
    zone: str = typer.Option(..., help="Zone, e.g. eu-west-a."),
    country: str = typer.Option("XX", help="ISO country code."),
    provider: str = typer.Option("consumer", help="datacenter | miner | consumer."),
    gpu_model: str = typer.Option("none", help="GPU model, e.g. H100, A100, RTX4090."),
    gpu_memory_gb: float = typer.Option(0.0, help="GPU memory per GPU, GB."),
    link_tier: str = typer.Option("low", help="low | medium | high | ultra (io.net tiers)."),
    num_gpus: Optional[int] = typer.Option(None, help="GPUs to offer (default: detected)."),
    num_cpus: Optional[float] = typer.Option(None, help="CPUs to offer (default: detected)."),
    simulated: bool = typer.Option(False, "--simulated", help="Fake GPUs (tests/dev): verified against host memory."),
    verify: bool = typer.Option(True, help="Verify the claims right after joining."),
    block: bool = typer.Option(False, help="Stay in the foreground; Ctrl-C leaves the pool."),
    secret: Optional[str] = SECRET,
) -> None:
    """Join this machine to a pool with labels; the head then verifies its claims.

    With --block the node stays in the pool: when its head goes away (restart, crash) it
    rejoins on its own, retrying with backoff, under the same join id, so the head's records
    for it carry over."""
    import uuid

    from tensorfabric.pool import NodeClaims, PoolError
    from tensorfabric.pool._cluster import resolve_secret, use_secret

    from ._pool_join import _join_forever, _join_once

    try:
        sec = resolve_secret(secret)
        use_secret(sec)  # before Ray is imported: Ray reads its auth settings on import
        claims = NodeClaims(region, zone, country, provider, gpu_model, gpu_memory_gb,
                            link_tier, simulated)  # fmt: skip
    except PoolError as exc:
        _fail(exc)
    join_id = uuid.uuid4().hex[:16]
    opts = {"num_gpus": num_gpus, "num_cpus": num_cpus}
    if not block:
        try:
            _join_once(address, claims, sec, join_id, opts, verify, block=False)
        except PoolError as exc:
            _fail(exc)
        return
    _join_forever(address, claims, sec, join_id, opts, verify)


@pool_app.command()
def deploy(
    spec: str = typer.Argument(..., help="Deployment spec (YAML)."),
    address: Optional[str] = ADDRESS,
    secret: Optional[str] = SECRET,
    timeout: Optional[float] = typer.Option(
        None, min=1.0, help="Seconds to wait for every replica [default: from the spec's "
        "placement and start timeouts, scaled by load]."),
) -> None:
    """Place a deployment by its spec; fails naming the requirement nothing meets."""
    from rich.console import Console

    from tensorfabric.pool import DeploymentSpec, PoolError

    try:
        parsed = DeploymentSpec.from_yaml(spec)
        pool = _connect(address, secret)
        with Console(stderr=True).status(f"placing {parsed.replicas} replica(s) of {parsed.name} ..."):
            pool.verify_pending()
            t0 = time.perf_counter()
            pool.deploy(parsed, timeout=timeout)
            took = time.perf_counter() - t0
        dep = next(d for d in pool.status()["deployments"] if d["name"] == parsed.name)
    except PoolError as exc:
        _fail(exc)
    typer.echo(f"{parsed.name}: {dep['ready']}/{dep['desired']} replicas ready in {took:.2f} s")
    for r in dep["replicas"]:
        typer.echo(f"  replica {r['index']}: node {r['node_id'][:12]} zone {r['zone']}")


@pool_app.command()
def status(
    address: Optional[str] = ADDRESS,
    secret: Optional[str] = SECRET,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Nodes (labels, verified, score, load) and deployments (replicas, failovers)."""
    from tensorfabric.pool import PoolError

    try:
        st = _connect(address, secret).status()
    except PoolError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(st, indent=2, default=str))
        return
    from tensorfabric.pool._status import render

    render(st)


@pool_app.command()
def verify(
    node: Optional[str] = typer.Argument(None, help="Node id or join id (a unique prefix is enough; see 'pool status')."),
    all_nodes: bool = typer.Option(False, "--all", help="Re-verify every alive pool node."),
    timeout: Optional[float] = typer.Option(None, help="First attempt's timeout, s (default: 60 s scaled by the head's load)."),
    attempts: int = typer.Option(3, min=1, help="Attempts per node; retries back off 1, 2, 4 s."),
    address: Optional[str] = ADDRESS,
    secret: Optional[str] = SECRET,
) -> None:
    """Measure nodes' claims now. A verified node that fails is drained: its replicas move.
    Exits 1 if any node is not verified."""
    from tensorfabric.pool import PoolError

    if (node is None) == (not all_nodes):
        _fail(PoolError("give one node id (see 'tensorfabric pool status') or --all"))
    try:
        recs = _connect(address, secret).verify_many(None if all_nodes else [node], timeout, attempts)
    except PoolError as exc:
        _fail(exc)
    for nid, rec in recs.items():
        word = "verified" if rec["verified"] else "NOT verified"
        typer.echo(f"{nid[:12]}: {word}: {rec['reason']} (score {rec['score']:.1f} GFLOP/s, "
                   f"{rec.get('attempts', 1)} attempt(s))")  # fmt: skip
    if not recs:
        typer.echo("no alive pool node to verify")
    if not all(r["verified"] for r in recs.values()):
        raise typer.Exit(1)


@pool_app.command()
def down(
    deployment: Optional[str] = typer.Option(None, help="Remove only this deployment."),
    address: Optional[str] = ADDRESS,
    secret: Optional[str] = SECRET,
    stop: bool = typer.Option(False, help="Also run 'ray stop' here (stops ALL Ray processes on this machine)."),
) -> None:
    """Remove deployments (all by default); --stop also stops Ray on this machine."""
    from tensorfabric.pool import PoolError

    try:
        removed = _connect(address, secret).down(deployment)
    except PoolError as exc:
        _fail(exc)
    typer.echo(f"removed: {', '.join(removed) or 'nothing'}")
    if stop:
        import subprocess

        from tensorfabric.pool._cluster import _ray_cli

        sys.exit(subprocess.call(_ray_cli() + ["stop"], env=dict(os.environ)))
