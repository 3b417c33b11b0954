"""Start a deployment: the cloud tier as its own process, the edge tier + HTTP API here.

``launch(cfg)`` is what ``tensorfabric serve`` runs. With ``cloud.launch: local`` it spawns
``python -m tensorfabric.split cloud`` (same secret through the environment, killed with this
process), waits for the address it prints, loads the edge model meanwhile, and serves HTTP with
uvicorn until interrupted. With ``cloud.launch: remote`` it connects to ``cloud.address``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..split._config import DeployConfig
from ..split._cpus import child_cpus, pin_process
from ..split._cpus import resolve as resolve_cpus
from ..split._errors import CloudUnavailable, SplitConfigError
from ..split._signals import sigterm_interrupts_once

__all__ = [
    "CloudProcess", "build_edge", "launch", "spawn_cloud_process", "start_cloud_process",
    "wait_cloud_ready",
]

_ADDR_PREFIX = "TENSORFABRIC_CLOUD_ADDRESS "


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class CloudProcess:
    """A cloud tier child process; ``address`` is its engine address once ready."""

    def __init__(self, proc: subprocess.Popen[str], address: bytes) -> None:
        self.proc = proc
        self.address = address

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s: long enough for a disaggregated vLLM cloud
        to stop its prefill/decode servers (20 s grace, then SIGKILL, 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def cloud_argv(cfg: DeployConfig) -> list[str]:
    data = dataclasses.asdict(cfg)
    data["secret"] = None  # travels in the environment, not on the command line
    return [sys.executable, "-m", "tensorfabric.split", "cloud", "--config-json", json.dumps(data)]


def start_cloud_process(
    cfg: DeployConfig, *, timeout: float = 600.0, prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> CloudProcess:  # fmt: skip
    """Spawn the cloud tier (optionally under ``prefix``, e.g. ``ip netns exec NS``) and wait
    for its address. Call it from a long-lived thread: the child is sent SIGTERM when the
    thread that spawned it ends (PR_SET_PDEATHSIG), so it never outlives the server."""
    return wait_cloud_ready(spawn_cloud_process(cfg, prefix=prefix, env=env), timeout)


def spawn_cloud_process(
    cfg: DeployConfig, *, prefix: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    child_env = dict(env if env is not None else os.environ)
    child_env["TENSORFABRIC_SECRET"] = cfg.resolve_secret()
    cpus = child_cpus(cfg.cloud.cpus)  # never the edge's placement (a respawn comes after it)

    def preexec() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        (prefix or []) + cloud_argv(cfg), stdout=subprocess.PIPE, text=True, env=child_env,
        preexec_fn=preexec,
    )  # fmt: skip


def wait_cloud_ready(proc: subprocess.Popen[str], timeout: float) -> CloudProcess:
    """Read the child's stdout until it prints its address; kill it on failure."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="tf-cloud-stdout").start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            line = ""
        if line is None or (line == "" and left <= 0):
            proc.kill()
            proc.wait(5)
            raise CloudUnavailable(
                f"the cloud tier process exited or did not start within {timeout:.0f} s "
                f"(exit code {proc.poll()}); run 'python -m tensorfabric.split cloud' by hand "
                "to see its error"
            )
        if line.startswith(_ADDR_PREFIX):
            return CloudProcess(proc, bytes.fromhex(line[len(_ADDR_PREFIX) :].strip()))


def _cloud_address(cfg: DeployConfig) -> bytes:
    if cfg.cloud.address:
        return bytes.fromhex(cfg.cloud.address)
    assert cfg.cloud.address_file
    try:
        return bytes.fromhex(open(cfg.cloud.address_file).read().strip())
    except (OSError, ValueError) as exc:
        raise SplitConfigError(f"cloud.address_file {cfg.cloud.address_file!r}: {exc}") from exc


def build_edge(cfg: DeployConfig, cloud_address: bytes | None) -> Any:
    """Load the edge model(s) and return an :class:`EdgeTier` connected to the cloud."""
    from ..split._edge import EdgeTier
    from ..split._edge_runtimes import load_edge_model
    from ..split._lm import load_chat_model

    model = load_edge_model(cfg)
    full = load_chat_model(cfg.edge.model) if cfg.mode == "layer_split" else None
    model.warmup()
    return EdgeTier(cfg, model, cloud_address, full_model=full)


def launch(cfg: DeployConfig, *, announce: Callable[[str], None] = print, ready: Callable[[str], None] | None = None) -> None:
    """Run the whole deployment until Ctrl-C / SIGTERM."""
    import uvicorn

    from ._app import create_app

    cloud: CloudProcess | None = None
    edge = None
    _request_log()
    if cfg.cloud.launch == "local" and not cfg.cloud.address_file:
        # A respawned cloud has a new engine address; the edge's prober reads it from here.
        import tempfile

        fd, cfg.cloud.address_file = tempfile.mkstemp(prefix="tensorfabric-cloud-", suffix=".addr")
        os.close(fd)
        own_address_file: str | None = cfg.cloud.address_file
    else:
        own_address_file = None
    own_tls_dir = _local_tls_dir(cfg)
    api_key = cfg.server.resolve_api_key()
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.server.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.server.host, cfg.server.port))
        sock.listen(2048)  # connections made as soon as the URL is printed wait in the backlog
    except OSError as exc:
        raise SplitConfigError(
            f"cannot listen on {cfg.server.host}:{cfg.server.port} ({exc.strerror}); pick another "
            "server.port (0 = any free port)"
        ) from exc
    sigterm_interrupts_once()
    try:
        cfg.resolve_secret()
        resolve_cpus("edge.cpus", cfg.edge.cpus)  # a CPU this host lacks: said before any start
        if cfg.cloud.launch == "local":
            announce("starting the cloud tier process and loading the edge model ...")
            proc = spawn_cloud_process(cfg)  # from this (main) thread: see start_cloud_process
            pin_process("edge.cpus", cfg.edge.cpus)  # after the spawn: the cloud has its own
            box: dict[str, Any] = {}
            t = threading.Thread(target=lambda: box.update(c=_safe(wait_cloud_ready, proc, 600.0)))
            t.start()
            edge_model_err = None
            try:
                from ..split._lm import load_chat_model

                load_chat_model(cfg.edge.model, quantize="none")  # warm the shared weights
            except Exception as exc:  # reported after the cloud started or failed
                edge_model_err = exc
            t.join()
            if isinstance(box["c"], BaseException):
                raise box["c"]
            cloud = box["c"]
            if edge_model_err is not None:
                raise edge_model_err
            address: bytes | None = cloud.address
        else:
            pin_process("edge.cpus", cfg.edge.cpus)
            address = _cloud_address(cfg)
        edge = build_edge(cfg, address)
        if cloud is not None:
            _start_watchdog(cfg, cloud, announce)
        app = create_app(edge, model_name=cfg.server.model_name, max_queue=cfg.server.max_queue,
                         api_key=api_key, max_body_bytes=cfg.server.max_body_bytes)  # fmt: skip
        host, port = sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
        announce(f"tensorfabric serve: {url}  (edge: {edge.model.name}, cloud: "
                 f"{'local process' if cloud else 'remote'}, mode: {cfg.mode})")  # fmt: skip
        if ready is not None:
            ready(url)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        _stopping.set()
        if edge is not None:
            edge.close()
        if cloud is not None:
            cloud.stop()
        sock.close()
        if own_address_file:
            with contextlib.suppress(OSError):
                os.unlink(own_address_file)
        if own_tls_dir:
            import shutil

            shutil.rmtree(own_tls_dir, ignore_errors=True)


def _request_log() -> None:
    """Request logs (tier, reason, tokens, latency) on stderr unless the host app set up logging."""
    import logging

    lg = logging.getLogger("tensorfabric.serve")
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)


def _local_tls_dir(cfg: DeployConfig) -> str | None:
    """A local deployment with TLS and no pair of its own: one fresh self-signed pair in a
    private temporary folder, shared by both tiers (each pins it), removed at exit."""
    from ..split._tls import ensure_pair, tls_wanted

    t = cfg.cloud.tls
    if cfg.cloud.launch != "local" or t.cert or t.dir or not tls_wanted(cfg):
        return None
    import tempfile

    t.dir = tempfile.mkdtemp(prefix="tensorfabric-tls-")
    ensure_pair(t.dir)
    return t.dir


def _start_watchdog(cfg: DeployConfig, cloud: CloudProcess, announce: Callable[[str], None]) -> None:
    """Respawn the local cloud process if it dies (crash, OOM kill); the edge answers degraded
    meanwhile and takes the new process back through ``cloud.address_file``. The thread lives
    as long as the server, so the child's parent-death signal stays tied to it."""

    def watch() -> None:
        backoff = cfg.health.backoff_initial
        while True:
            code = cloud.proc.wait()
            if _stopping.is_set():
                return  # our own shutdown
            # Any other exit (crash, OOM kill, SIGTERM from an operator or a reboot script)
            # leaves the deployment without its cloud tier: bring it back.
            time.sleep(backoff)
            if _stopping.is_set():
                return  # a group-wide SIGTERM reached the child first
            announce(f"cloud tier process exited with code {code}; restarting it ...")
            try:
                fresh = wait_cloud_ready(spawn_cloud_process(cfg), 600.0)
            except CloudUnavailable as exc:
                announce(f"cloud tier restart failed: {exc}")
                backoff = min(cfg.health.backoff_max, backoff * 2)
                continue
            cloud.proc, cloud.address = fresh.proc, fresh.address
            backoff = cfg.health.backoff_initial
            announce("cloud tier restarted")

    threading.Thread(target=watch, name="tf-cloud-watchdog", daemon=True).start()


_stopping = threading.Event()


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except BaseException as exc:
        return exc
