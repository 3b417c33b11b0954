"""Start vLLM OpenAI servers as processes (one process group each, so a kill takes the engine
core and worker with it) and wait until they answer."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._errors import ConfigError, TensorFabricError

#: vLLM CPU runs its model worker in a third process (after the API server and the engine
#: core), each importing vLLM and torch again (~20 s of CPU); with V1 multiprocessing off the
#: worker runs inside the engine-core process (the API server still talks to the engine core
#: over its own process boundary). bench/vllm_start.py measures both. A user's own setting wins.
IN_PROCESS_WORKER = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_all(servers: Sequence[VllmServer], grace: float = 20.0) -> None:
    """Stop several servers at once: SIGTERM them all, wait up to ``grace`` seconds for all,
    then SIGKILL each one's process group (stray engine-core or worker processes)."""
    running = [s for s in servers if s.proc is not None]
    for s in running:
        s._signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in running:
        try:
            s.proc.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass
    for s in running:
        s._signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    for s in running:
        try:
            s.proc.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass


class VllmStartError(TensorFabricError):
    """A vLLM server exited or did not answer /health in time (the message has its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _cpu_set(cpus: str) -> set[int] | None:
    """``VLLM_CPU_OMP_THREADS_BIND``'s CPUs ("0", "0-3", "0,2"); None for its other forms
    ("auto", "nobind", one list per rank with "|")."""
    out: set[int] = set()
    try:
        for part in cpus.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return out or None


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` for ``model`` (a folder vLLM loads).

    ``cpus``: the CPU list its worker thread(s) bind to (``VLLM_CPU_OMP_THREADS_BIND``, e.g.
    ``"0"``; with the worker inside the engine core, the default here, the whole server is
    pinned to it); ``kv_space_gib``: ``VLLM_CPU_KVCACHE_SPACE``; ``kv_transfer_config``: a dict for
    ``--kv-transfer-config``; ``env``: more environment (``TENSORFABRIC_SECRET`` belongs here,
    not on the command line). The log goes to ``log_path`` (a temporary file by default).
    """

    def __init__(self, model: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 port: int | None = None, cpus: str | None = None, kv_space_gib: int = 2,
                 max_model_len: int = 2048, dtype: str = "float32", block_size: int | None = None,
                 served_model_name: str = "default",
                 kv_transfer_config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 log_path: str | os.PathLike[str] | None = None,
                 netns: str | None = None) -> None:
        self.model = str(model)
        self.host = host
        self._port_picked = not port  # ours to pick again if it is taken before vLLM binds it
        # picked on the server's own address (inside a netns that address is not ours)
        self._pick_on = "127.0.0.1" if netns is not None or host in ("0.0.0.0", "::") else host
        self.port = port or free_port(self._pick_on)
        self.url = f"http://{host}:{self.port}"
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                     "--model", self.model, "--served-model-name", served_model_name,
                     "--host", host, "--port", str(self.port), "--dtype", dtype,
                     "--max-model-len", str(max_model_len), "--enforce-eager",
                     "--disable-uvicorn-access-log", *args]
        if block_size is not None:
            self.argv += ["--block-size", str(block_size)]
        if kv_transfer_config is not None:
            self.argv += ["--kv-transfer-config", json.dumps(dict(kv_transfer_config))]
        if netns is not None:
            self.argv = ["ip", "netns", "exec", netns, *self.argv]
        self.env = dict(os.environ)
        if not isinstance(kv_space_gib, int) or kv_space_gib < 1:
            raise ConfigError(f"kv_space_gib must be a whole number of GiB >= 1 (vLLM reads "
                              f"VLLM_CPU_KVCACHE_SPACE as an int), got {kv_space_gib!r}")
        self.env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
        for k, v in IN_PROCESS_WORKER.items():
            self.env.setdefault(k, v)
        if cpus is not None:
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        self.env.update(env or {})
        # with the worker inside the engine core vLLM binds no thread to ``cpus`` (measured:
        # every engine-core thread kept the whole machine); the server is then pinned whole
        # (to those of them this process may use: none of them, no pin)
        self._pin: set[int] | None = None
        if cpus is not None and self.env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            self._pin = (_cpu_set(cpus) or set()) & os.sched_getaffinity(0) or None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tf-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    def start(self) -> VllmServer:
        """Start the server in a session of its own. Started from the main thread, it is also
        sent SIGTERM when this process dies (PR_SET_PDEATHSIG; vLLM then stops its engine core
        and worker): a SIGKILLed launcher leaves no server behind. (The signal follows the
        thread that started the child, so a short-lived thread must not arm it.)"""
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._log_from = log.tell()  # this start's output (the log gathers every start's)
        main = threading.current_thread() is threading.main_thread()
        pin = self._pin

        def preexec() -> None:
            if main:
                _die_with_parent()
            if pin:
                os.sched_setaffinity(0, pin)

        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True,
                                         preexec_fn=preexec if main or pin else None)
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = 300.0) -> VllmServer:
        """Block until GET /health answers 200; raise VllmStartError if the server exits or
        ``timeout`` seconds pass."""
        if self.proc is None:
            raise ConfigError("start() the server first")
        deadline = time.monotonic() + timeout
        retries = 3
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and self._port_picked and retries and \
                    b"Address already in use" in self._this_start_log():
                # the free port was taken between our pick and vLLM's bind (vLLM binds after
                # ~20 s of imports): pick another and start again
                retries -= 1
                self._repick_port()
                self.start()
                continue
            if self.proc.poll() is not None:
                raise VllmStartError(f"vLLM server {self.url} exited with {self.proc.returncode}:\n"
                                     + self.log_tail())
            if self.healthy():
                return self
            time.sleep(1.0)
        raise VllmStartError(f"vLLM server {self.url} did not answer /health within "
                             f"{timeout:.0f} s:\n" + self.log_tail())

    def _this_start_log(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                return f.read()
        except OSError:
            return b""

    def _repick_port(self) -> None:
        i = self.argv.index("--port")
        self.port = free_port(self._pick_on)
        self.argv[i + 1] = str(self.port)
        self.url = f"http://{self.host}:{self.port}"

    def healthy(self) -> bool:
        """GET /health answered 200. Anything else is not healthy, including an answer that is
        not HTTP/1 at all: another process (a Ray gRPC server, say) may hold the port between
        our pick and vLLM's bind, and vLLM then exits with "Address already in use", which
        wait_ready handles by starting on another port."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and every process it started (engine core, worker)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL whatever is left after ``grace`` seconds."""
        stop_all([self], grace)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VllmServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
