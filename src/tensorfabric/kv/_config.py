"""Settings shared by the decode and prefill workers (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class WorkerConfig:
    """How a worker loads its model and sizes its KV region.

    ``num_blocks`` is the worker's KV pool in blocks of ``block_size`` tokens (the decode
    worker's must hold every running request's prompt plus ``max_new_tokens``; a prefill
    worker's must hold its longest prompt). ``timeout`` bounds every wait (seconds);
    ``prefill_timeout`` bounds one prefill attempt end to end; ``max_attempts`` is how many
    prefill workers a request may try; ``heartbeat_s`` is how often the decode worker probes
    the prefill workers serving its requests. ``torch_threads`` caps torch's intra-op threads.
    """

    model: str | None = None
    dtype: str = "float32"
    block_size: int = 32
    num_blocks: int = 256
    secret: str = ""
    name: str = ""
    timeout: float = 30.0
    prefill_timeout: float = 120.0
    max_attempts: int = 2
    heartbeat_s: float = 0.2
    abort_grace_s: float = 5.0
    torch_threads: int | None = None
    disk_cache: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerConfig:
        return cls(**data)
