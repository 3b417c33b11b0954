"""A real TCP relay between an edge and a cloud tier: records, rewrites, flips, replays, or
terminates TLS with its own certificate (a man in the middle). Loopback only.

    with Relay(("127.0.0.1", cloud_port)) as r:
        address = r.address_via(cloud_engine_address)  # the cloud's address, through the relay
        ...
        r.seen()  # every byte that crossed, both directions
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

from tensorfabric._address import EngineAddress


class Relay:
    """Forward every connection to ``target``. ``mode`` acts on edge->cloud bytes once
    :meth:`arm` was called: ``record`` (nothing), ``rewrite`` (``old`` -> ``new``), ``flip``
    (one bit in the first chunk after arming), ``replay`` (every chunk sent twice), ``mitm``
    (TLS terminated with ``mitm_server`` / re-originated with ``mitm_client``)."""

    def __init__(self, target: tuple[str, int], mode: str = "record", *, old: bytes = b"France",
                 new: bytes = b"Norway", mitm_server: ssl.SSLContext | None = None,
                 mitm_client: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.target, self.mode, self.old, self.new = target, mode, old, new
        self.mitm_server, self.mitm_client = mitm_server, mitm_client
        self.up = bytearray()  # edge -> cloud, as the relay read it (plaintext for mitm)
        self.down = bytearray()  # cloud -> edge
        self.tampered = 0
        self._armed = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._ls = socket.create_server(("127.0.0.1", 0))
        self.port = self._ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def address_via(self, address: bytes) -> bytes:
        """``address`` (an engine's) with its endpoints replaced by this relay."""
        a = EngineAddress.from_bytes(address)
        fields = {f: getattr(a, f) for f in a.__dataclass_fields__}  # type: ignore[attr-defined]
        fields["endpoints"] = (("127.0.0.1", self.port),)
        return EngineAddress(**fields).to_bytes()

    def arm(self, on: bool = True) -> None:
        self._armed = on

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self.up) + b"\n" + bytes(self.down)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._ls.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
                if self.mode == "mitm":
                    assert self.mitm_server is not None and self.mitm_client is not None
                    client = self.mitm_server.wrap_socket(client, server_side=True)
                    server = self.mitm_client.wrap_socket(server, server_hostname=self.target[0])
            except (OSError, ssl.SSLError):
                client.close()
                continue
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _tamper(self, data: bytes) -> list[bytes]:
        if not self._armed or self.mode in ("record", "mitm"):
            return [data]
        if self.mode == "rewrite" and self.old in data:
            self.tampered += 1
            return [data.replace(self.old, self.new)]
        if self.mode == "flip" and self.tampered == 0 and len(data) > 40:
            self.tampered += 1
            i = len(data) // 2
            return [data[:i] + bytes([data[i] ^ 0x04]) + data[i + 1:]]
        if self.mode == "replay":
            self.tampered += 1
            return [data, data]
        return [data]

    def _pump(self, src: Any, dst: Any, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    (self.up if upstream else self.down).extend(data)
                for piece in self._tamper(data) if upstream else [data]:
                    dst.sendall(piece)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._ls.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
