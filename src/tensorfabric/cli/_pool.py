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


def _connect(address: Optional[str], secret: Optional[str], create: bool = False) -> Any:
    from tensorfabric.pool import Pool
    from tensorfabric.pool._cluster import resolve_secret, use_secret

    use_secret(resolve_secret(secret))
    return Pool(address, create=create)


def _block_on(proc: Any) -> None:
    """Wait on a ``ray start --block`` child; SIGTERM/SIGINT stop it cleanly."""

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()


@pool_app.command()
def up(
    port: int = typer.Option(6379, help="GCS port of the head."),
    address: Optional[str] = typer.Option(None, "--address", "-a", help="Use this running head instead of starting one."),
    secret: Optional[str] = SECRET,
    block: bool = typer.Option(False, help="Stay in the foreground; Ctrl-C stops the head."),
    num_cpus: Optional[float] = typer.Option(None, help="CPUs the head offers to Ray."),
) -> None:
    """Start a pool head (Ray head + pool controller), or connect to one with --address."""
    from tensorfabric.pool import PoolError
    from tensorfabric.pool._cluster import resolve_secret, start_head

    try:
        sec = resolve_secret(secret)
        proc = None
        if address is None:
            typer.echo(f"starting a Ray head on port {port} (token auth on) ...")
            proc = start_head(port, sec, block=block, num_cpus=num_cpus)
            address = f"127.0.0.1:{port}"
        pool = _connect_retry(address, sec)
        n = len(pool.status()["nodes"])
    except PoolError as exc:
        _fail(exc)
    assert address is not None
    typer.echo(f"pool controller ready on {address} ({n} node(s)).")
    typer.echo("join a GPU node with:\n  TENSORFABRIC_SECRET=... tensorfabric pool join "
               f"--address <this host's IP>:{address.rsplit(':', 1)[1]} --region R --zone Z "
               "--gpu-model M --gpu-memory-gb G --link-tier T")  # fmt: skip
    if proc is not None:
        import ray

        ray.shutdown()
        _block_on(proc)


def _connect_retry(address: str, secret: str, timeout: float = 60.0) -> Any:
    from tensorfabric.pool import PoolError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return _connect(address, secret, create=True)
        except PoolError:
            if time.monotonic() > deadline:
                raise
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
    """Join this machine to a pool with labels; the head then verifies its claims."""
    import uuid

    from tensorfabric.pool import NodeClaims, PoolError
    from tensorfabric.pool._cluster import join as ray_join
    from tensorfabric.pool._cluster import resolve_secret, wait_for_node

    proc = None
    try:
        sec = resolve_secret(secret)
        claims = NodeClaims(region, zone, country, provider, gpu_model, gpu_memory_gb,
                            link_tier, simulated)  # fmt: skip
        join_id = uuid.uuid4().hex[:16]
        proc = ray_join(address, claims, sec, join_id, block=block, num_gpus=num_gpus,
                        num_cpus=num_cpus)  # fmt: skip
        pool = _connect(address, sec)
        node = wait_for_node(join_id)
        typer.echo(f"joined as node {node['NodeID'][:12]} with {claims.to_label_string()}")
        if verify:
            from rich.console import Console

            with Console(stderr=True).status("verifying claims (memory, compute, transfer) ..."):
                rec = pool.verify(node["NodeID"])
            word = "verified" if rec["verified"] else "NOT verified"
            typer.echo(f"{word}: {rec['reason']} (score {rec['score']:.1f} GFLOP/s)")
    except PoolError as exc:
        if proc is not None:
            proc.terminate()
        _fail(exc)
    if proc is not None:
        import ray

        ray.shutdown()
        _block_on(proc)


@pool_app.command()
def deploy(
    spec: str = typer.Argument(..., help="Deployment spec (YAML)."),
    address: Optional[str] = ADDRESS,
    secret: Optional[str] = SECRET,
    timeout: float = typer.Option(300.0, help="Seconds to wait for every replica."),
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
