"""Run ``tensorfabric serve`` as a child process and wait for its URL (tests, benchmarks)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ServerProcess"]


class ServerProcess:
    """``with ServerProcess(config) as s: httpx.get(s.url + "/models")``.

    The child runs ``python -m tensorfabric serve --config FILE``; it prints the URL once both
    tiers are up. ``output`` keeps its stdout/stderr lines for error messages.
    """

    def __init__(self, config: str | Path | None, *, env: dict[str, str] | None = None,
                 timeout: float = 600.0, extra_args: list[str] | None = None) -> None:  # fmt: skip
        argv = [sys.executable, "-m", "tensorfabric", "serve"]
        if config is not None:
            argv += ["--config", str(config)]
        argv += extra_args or []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env if env is not None else dict(os.environ), start_new_session=True,
        )  # fmt: skip
        self.output: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = ""
        try:
            while not self.url:
                try:
                    line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    raise RuntimeError("tensorfabric serve did not start:\n" + "".join(self.output[-40:]))
                if line.startswith("tensorfabric serve: "):
                    self.url = line.split()[2]
        except BaseException:  # our timeout, a caller's (pytest-timeout), Ctrl-C: no orphan stack
            self.stop()
            raise

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the server's process group (server and cloud tier), then SIGKILL after
        ``timeout`` s (the server waits for its cloud tier, which may stop vLLM servers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
