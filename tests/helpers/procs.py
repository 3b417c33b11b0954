"""Start and drive tests/helpers/peer.py in a separate OS process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import subprocess_env

PEER = Path(__file__).with_name("peer.py")


class PeerProcess:
    def __init__(self, size: int, *, shm: bool = False, links: int = 1,
                 secret: str = "peer-secret") -> None:
        argv = [sys.executable, str(PEER), "--size", str(size), "--links", str(links),
                "--secret", secret] + (["--shm"] if shm else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=subprocess_env())
        hello = self._line()
        self.address = bytes.fromhex(hello["address"])
        self.desc = bytes.fromhex(hello["desc"])

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited with {self.proc.wait(5)}")
        return json.loads(line)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="exit")
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
