"""Engine addresses: how a peer reaches an engine (bytes-serializable)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ._errors import ConfigError

_MAGIC = b"tfA1"


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
        data = bytes(data)
        if not data.startswith(_MAGIC):
            raise ConfigError("not a tensorfabric engine address (expected Engine.address bytes)")
        try:
            body = json.loads(data[len(_MAGIC):])
            return cls(
                engine_id=bytes.fromhex(body["id"]),
                name=str(body["name"]),
                endpoints=tuple((str(h), int(p)) for h, p in body["ep"]),
                host_id=str(body.get("host", "")),
                pid=int(body.get("pid", 0)),
                probe_fd=int(body.get("probe", [-1, ""])[0]),
                probe_nonce=bytes.fromhex(body.get("probe", [-1, ""])[1]),
                transports=tuple(str(x) for x in body.get("x", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"malformed engine address: {exc}") from None

    def __str__(self) -> str:
        return _label(self.name, self.endpoints)


@functools.lru_cache(maxsize=1024)
def _label(name: str, endpoints: tuple[tuple[str, int], ...]) -> str:
    # named once per peer: error messages and transfers carry it on every op
    return f"{name}@" + ",".join(f"{h}:{p}" for h, p in endpoints)
