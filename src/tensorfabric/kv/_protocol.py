"""Control messages between client, decode worker and prefill workers (numpy only).

All control travels as small JSON messages over ``Engine.send`` / ``Engine.recv``; KV bytes
travel only as ``write_pages`` into the decode worker's region. Tags::

    TAG_DECODE   -> decode worker   hello (prefill joins), request (client), prefill_done,
                                    prefill_failed, aborted, stats, shutdown
    TAG_PREFILL  -> prefill worker  welcome, prefill, abort, shutdown
    TAG_PING     -> prefill worker  liveness probes from the decode worker (drained, unanswered)
    TAG_CLIENT   -> client          result, stats

A request's life: the client sends ``request``; the decode worker reserves blocks and sends
``prefill`` (token ids, block ids, immediate) to a prefill worker; that worker issues one
``write_pages`` per layer carrying the immediate, then ``prefill_done`` (first token and
timings); the decode worker waits for ``expect(imm, num_layers)`` and the message, decodes, and
sends ``result`` to the client.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

TAG_DECODE = 0x6B_76_00_01
TAG_PREFILL = 0x6B_76_00_02
TAG_PING = 0x6B_76_00_03
TAG_CLIENT = 0x6B_76_00_04


def encode(msg_type: str, /, **fields: Any) -> bytes:
    return json.dumps({"type": msg_type, **fields}, separators=(",", ":")).encode()


def decode_message(data: bytes) -> dict[str, Any]:
    msg = json.loads(data)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("not a tensorfabric.kv control message")
    return msg


@dataclass
class HandoffStats:
    """What one request's KV handoff cost.

    ``kv_bytes``: bytes written into the decode worker (whole blocks, all layers).
    ``prefill_s``: the prefill forward pass. ``transfer_busy_s``: time at least one of the
    request's ``write_pages`` was in flight (the union of their intervals); ``gbps`` is
    ``kv_bytes / transfer_busy_s / 1e9``. ``exposed_s``: transfer time left after the forward
    pass ended (what overlap did not hide). ``ttft_s``: from the decode worker admitting the
    request to holding the first token with every layer landed. ``attempts``: prefill workers
    tried. ``worker``: the prefill worker that served it.
    """

    prompt_tokens: int = 0
    kv_bytes: int = 0
    num_blocks: int = 0
    prefill_s: float = 0.0
    transfer_busy_s: float = 0.0
    exposed_s: float = 0.0
    ttft_s: float = 0.0
    queue_s: float = 0.0
    decode_s: float = 0.0
    attempts: int = 0
    worker: str = ""
    layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.kv_bytes / self.transfer_busy_s / 1e9 if self.transfer_busy_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HandoffStats:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def summary(self) -> str:
        return (
            f"kv handoff: {self.kv_bytes / 1e6:.1f} MB in {self.num_blocks} blocks x "
            f"{self.layers} layers, transfer busy {self.transfer_busy_s * 1e3:.1f} ms "
            f"({self.gbps:.2f} GB/s), exposed {self.exposed_s * 1e3:.1f} ms after a "
            f"{self.prefill_s * 1e3:.0f} ms prefill on {self.worker}; "
            f"TTFT {self.ttft_s * 1e3:.0f} ms, decode {self.decode_s * 1e3:.0f} ms, "
            f"attempts {self.attempts}"
        )


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total
