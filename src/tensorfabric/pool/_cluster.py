"""Starting and joining pool nodes with ``ray start``, gated by the cluster secret.

The cluster secret does two jobs. It derives the Ray token (Ray's token authentication,
``RAY_AUTH_MODE=token``): without it a node cannot register with the head and a driver cannot
connect. And it is the tensorfabric engine's secret (``TENSORFABRIC_SECRET``), so the
engines on pool nodes authenticate each other. Both travel only in the environment of the
processes started here, never on Ray's command line or in task arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from ._errors import PoolError
from ._labels import JOIN_ID, ROLE, NodeClaims

SECRET_ENV = "TENSORFABRIC_SECRET"


def resolve_secret(secret: str | None) -> str:
    secret = secret or os.environ.get(SECRET_ENV)
    if not secret:
        raise PoolError(
            f"the pool needs the cluster secret: set {SECRET_ENV} (preferred: it stays out of "
            "'ps' output) or pass --secret"
        )
    if len(secret) < 8:
        raise PoolError("the cluster secret is too short: use at least 8 characters")
    return secret


def ray_token(secret: str) -> str:
    """The Ray auth token derived from the cluster secret (hex, 64 characters)."""
    return hmac.new(secret.encode(), b"tensorfabric pool: ray auth token", hashlib.sha256).hexdigest()


def cluster_env(secret: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes and drivers of this pool."""
    env = dict(os.environ if base is None else base)
    env[SECRET_ENV] = secret
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = ray_token(secret)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def use_secret(secret: str) -> None:
    """Make this process a driver of the pool (before ``ray.init``)."""
    os.environ.update({k: v for k, v in cluster_env(secret, {}).items()})


def _ray_cli() -> list[str]:
    exe = shutil.which("ray")
    if exe:
        return [exe]
    return [sys.executable, "-m", "ray.scripts.scripts"]


def port_taken(port: int, host: str = "0.0.0.0") -> str | None:
    """Why ``port`` cannot be a head's GCS port here (None if it is free)."""
    with socket.socket() as s:
        # Like the GCS itself: a port left in TIME_WAIT by a killed head is free to reuse.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def reachable(address: str, timeout: float = 2.0) -> str | None:
    """None if a TCP connection to the head's ``HOST:PORT`` opens, else the reason."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)


def start_head(port: int, secret: str, *, block: bool, num_cpus: float | None = None,
               temp_dir: str | None = None, redis_address: str | None = None,
               redis_password: str | None = None, gcs_dir: str | None = None) -> subprocess.Popen[str] | None:  # fmt: skip
    """``ray start --head`` with token auth and no GPUs (replicas never land on the head).
    Fails at once, in one line, when the port is taken (another head on this host).

    Ray's cluster state (the GCS: nodes, actors, placement groups, internal KV) is kept
    across head restarts (Ray's GCS fault tolerance) in one of two stores:

    - ``redis_address``: an external Redis, as Ray documents it; the key namespace is
      ``tensorfabric-<port>``, so several pools can share one Redis;
    - ``gcs_dir``: Ray's embedded RocksDB store in that folder on the head's disk (Ray's
      alpha backend, ``RAY_gcs_storage=rocksdb``): nothing else to run.

    A head restarted on the same port with the same store finds its nodes, actors and
    placement groups again, and running replicas keep serving. With neither, the GCS is in
    memory and a restarted head starts an empty cluster."""
    why = port_taken(port)
    if why:
        raise PoolError(
            f"cannot start a pool head on port {port}: the port is taken ({why}); another Ray "
            f"head probably runs here: check 'tensorfabric pool status --address 127.0.0.1:{port}' "
            "or choose another --port"
        )
    cmd = _ray_cli() + ["start", "--head", f"--port={port}", "--num-gpus=0",
                        f"--labels={ROLE}=head", "--disable-usage-stats",
                        "--include-dashboard=false"]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    # A restarted GCS reloads its tables before it answers; under load that outlasts the 20 s
    # Ray's 'ray start' gives its own GCS by default, after which it stops the new head.
    extra = {"RAY_gcs_server_port_wait_time_s": GCS_START_WAIT_S}
    if redis_address:
        why = reachable(redis_address)
        if why is not None:
            raise PoolError(f"cannot reach the Redis for the head's state at {redis_address}: {why}")
        extra.update({"RAY_REDIS_ADDRESS": redis_address,
                      "RAY_external_storage_namespace": f"tensorfabric-{port}"})  # fmt: skip
        if redis_password:
            cmd.append("--redis-password=" + redis_password)
    elif gcs_dir:
        try:
            os.makedirs(gcs_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PoolError(f"cannot keep the head's Ray state in {gcs_dir}: {exc.strerror or exc}") from None
        extra.update({"RAY_gcs_storage": "rocksdb", "RAY_gcs_storage_path": gcs_dir})
    try:
        return _run(cmd, secret, block, extra)
    except PoolError as exc:
        raise HeadStartFailed(str(exc)) from None


class HeadStartFailed(PoolError):
    """``ray start --head`` exited while the head was starting (worth another try: Ray's own
    start-up waits are fixed, and a loaded host can miss them)."""


# A node whose head vanished waits this long for it before its raylet gives up (Ray's default
# is 60 s): long enough for 'pool up' to start a head again a few times on a loaded host.
# A head with GCS fault tolerance that is back within it finds the node, and its replicas,
# as they were; without it ``pool join --block`` stops the node after HEAD_LOST_S and rejoins.
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_S = "180"
GCS_FT_KEY = "head/gcs-fault-tolerance"  # in the pool's internal-KV namespace, set by 'pool up'
GCS_START_WAIT_S = "120"  # seconds 'ray start --head' waits for its GCS to answer
# A raylet stops (and 'ray start --block' with it: the whole head or node) when its dashboard
# agent has not registered within Ray's default 30 s; on a loaded host a Python agent takes
# longer to import and start. Three minutes still catches an agent that never starts.
AGENT_ENV = "RAY_agent_register_timeout_ms"
AGENT_MS = "180000"


def join(address: str, claims: NodeClaims, secret: str, join_id: str, *, block: bool,
         num_gpus: int | None = None, num_cpus: float | None = None) -> subprocess.Popen[str] | None:  # fmt: skip
    """``ray start --address`` with the node's claims as labels (and a join id to find it)."""
    labels = {**claims.to_labels(), JOIN_ID: join_id}
    cmd = _ray_cli() + ["start", f"--address={address}", "--disable-usage-stats",
                        "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items())]  # fmt: skip
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    return _run(cmd, secret, block)


def _run(cmd: list[str], secret: str, block: bool,
         extra: dict[str, str] | None = None) -> subprocess.Popen[str] | None:  # fmt: skip
    env = cluster_env(secret)
    env.setdefault(RECONNECT_ENV, RECONNECT_S)
    env.setdefault(AGENT_ENV, AGENT_MS)
    env.update(extra or {})
    if block:
        return subprocess.Popen(cmd + ["--block"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        shown = [c for c in cmd if not c.startswith("--redis-password")]
        raise PoolError(f"'{' '.join(shown[:3])} ...' failed: {' | '.join(tail)}")
    return None


def wait_for_node(join_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The ``ray.nodes()`` entry of the node that joined with ``join_id``."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in ray.nodes():
            if n["Alive"] and (n.get("Labels") or {}).get(JOIN_ID) == join_id:
                return n
        time.sleep(0.5)
    raise PoolError(f"the node did not appear in the cluster within {timeout:g} s")
