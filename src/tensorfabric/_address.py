"""Engine addresses: how a peer reaches an engine (bytes-serializable)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ._errors import ConfigError

_MAGIC = b"tfA1"
MAX_ADDRESS_BYTES = 16 << 10  # one endpoint per NIC: real addresses are a few hundred bytes
MAX_ENDPOINTS = 64


@dataclass(frozen=True)
class EngineAddress:
    """Where an engine listens and how to recognise it.

    ``endpoints`` holds one ``(host, port)`` per listening address (one per NIC); a peer's
    link ``i`` connects to ``endpoints[i % len(endpoints)]``. ``host_id``, ``pid`` and the probe
    let a peer on the same host prove that it shares memory with this engine.
    """

    engine_id: bytes
    name: str
    endpoints: tuple[tuple[str, int], ...]
    host_id: str = ""
    pid: int = 0
    probe_fd: int = -1
    probe_nonce: bytes = b""
    transports: tuple[str, ...] = ()  #: optional transports it also accepts (e.g. "nixl")

    def to_bytes(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        # computed once: every message delivered names its sender by these bytes
        body = {
            "id": self.engine_id.hex(),
            "name": self.name,
            "ep": [list(e) for e in self.endpoints],
            "host": self.host_id,
            "pid": self.pid,
            "probe": [self.probe_fd, self.probe_nonce.hex()],
        }
        if self.transports:
            body["x"] = list(self.transports)
        return _MAGIC + json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | str) -> EngineAddress:
        if isinstance(data, str):
            data = data.encode()
        try:
            data = bytes(data)
        except TypeError:
            raise ConfigError("an engine address must be bytes") from None
        if not data.startswith(_MAGIC):
            raise ConfigError("not a tensorfabric engine address (expected Engine.address bytes)")
        if len(data) > MAX_ADDRESS_BYTES:
            raise ConfigError(f"engine address of {len(data)} bytes (at most {MAX_ADDRESS_BYTES})")
        body_bytes = data[len(_MAGIC):]
        # nesting is bounded before parsing: a real address is 3 levels deep
        if body_bytes.count(b"[") + body_bytes.count(b"{") > 4 * MAX_ENDPOINTS + 8:
            raise ConfigError("malformed engine address: too deeply nested")
        try:
            body = json.loads(body_bytes)
            if not isinstance(body, dict) or not isinstance(body["ep"], list):
                raise TypeError("expected an object with an endpoint list")
            if not 0 < len(body["ep"]) <= MAX_ENDPOINTS:
                raise ValueError(f"between 1 and {MAX_ENDPOINTS} endpoints expected")
            probe = body.get("probe", [-1, ""])
            engine_id = bytes.fromhex(body["id"])
            if len(engine_id) != 16:
                raise ValueError("engine id must be 16 bytes")
            return cls(
                engine_id=engine_id,
                name=_text(body["name"]),
                endpoints=tuple((_text(h), _port(p)) for h, p in body["ep"]),
                host_id=_text(body.get("host", "")),
                pid=int(body.get("pid", 0)),
                probe_fd=int(probe[0]),
                probe_nonce=bytes.fromhex(probe[1]),
                transports=tuple(_text(x) for x in body.get("x", ())),
            )
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
            raise ConfigError(f"malformed engine address: {exc}") from None

    def __str__(self) -> str:
        return self._label

    @functools.cached_property
    def _label(self) -> str:
        # every op's transfer carries it: made once per address (frozen: it never changes)
        return f"{self.name}@" + ",".join(f"{h}:{p}" for h, p in self.endpoints)


def _text(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _port(v: object) -> int:
    if not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError(f"bad port {v!r}")
    return v
