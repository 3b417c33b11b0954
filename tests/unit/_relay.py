"""A man in the middle without the secret, as its own process: forwards tcp links between two
engines and tampers with the first link it carries. It understands the framing (not the keys):

    python _relay.py TARGET_HOST TARGET_PORT MODE [ARG]

MODE: ``pass``; ``flip`` (flip a byte of the first frame with a payload); ``replace OLD:NEW``
(rewrite bytes in payloads, hex); ``replay`` (send the first payload frame twice); ``reorder``
(swap the first two frames); ``drop`` (drop the first frame); ``splice`` (send the first frame
of link 2 on link 1: needs two links); ``address`` (rewrite the dial-back port in the hello);
``downgrade`` (clear the payload-MAC flags of the first hello: F_GMAC_SEQ, F_GMAC, F_POLY1305,
so that the link would fall back to keyed BLAKE2b); ``cut`` (close the first connection
in the middle of its handshake, as an acceptor past its deadline does);
``tls CERT KEY`` (terminate TLS with its own certificate, plaintext in between, dial TLS on).
Prints ``PORT`` once listening, and ``TAMPERED`` each time it changed something.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading

HEADER = struct.Struct("<HBBIQQQQII")
HELLO = struct.Struct("<4s16s16s32sIII")
REPLY_SIZE = 4 + 16 + 32 + 4
TAG = 16

lock = threading.Lock()
state = {"links": 0, "done": False, "spliced": None}
spare: list[bytes] = []


def _shut(*socks: socket.socket) -> None:
    """Shut both directions of each socket, ignoring ones already gone."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def say(msg: str) -> None:
    with lock:
        print(msg, flush=True)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError
        buf += got
    return buf


def frames(s: socket.socket, mac: bool):
    while True:
        head = recv_exact(s, HEADER.size)
        _, _, _, ext_len, _, _, plen, _, _, _ = HEADER.unpack(head)
        body = recv_exact(s, ext_len + (TAG if mac else 0) + plen + (TAG if mac and plen else 0))
        yield head, body, plen


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shut(src, dst)


def handle(client: socket.socket, target: tuple[str, int], mode: str, arg: str) -> None:
    server = socket.create_connection(target)
    if mode == "tls":
        cert, key = arg.split(",")
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert, key)
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        try:
            client = sctx.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            return
        server = cctx.wrap_socket(server)
        say("TAMPERED")  # it reads everything in the clear from here
    with lock:
        state["links"] += 1
        n = state["links"]
    try:
        hello = recv_exact(client, HELLO.size)
        fields = list(HELLO.unpack(hello))
        addr = recv_exact(client, fields[6])
        if mode == "cut" and n == 1:
            say("TAMPERED")  # the acceptor gave up on this handshake (its deadline passed)
            _shut(client, server)
            return
        if mode == "address" and n == 1:
            addr = addr.replace(b'"ep":[["127.0.0.1",', b'"ep":[["127.0.0.2",')
            fields[6] = len(addr)
            say("TAMPERED")
        if mode == "downgrade" and n == 1:
            fields[5] &= ~(16 | 4 | 2)
            say("TAMPERED")
        server.sendall(HELLO.pack(*fields) + addr)
        reply = recv_exact(server, REPLY_SIZE)
        client.sendall(reply)
        mac = bool(struct.unpack_from("<I", reply, 52)[0] & 1)
        client_proof = recv_exact(client, 32)
        server.sendall(client_proof)
        client.sendall(recv_exact(server, 36))
    except (OSError, ConnectionError):
        return
    threading.Thread(target=pump, args=(server, client), daemon=True).start()
    held: list[bytes] = []
    try:
        for head, body, plen in frames(client, mac):
            frame = head + body
            active = not state["done"] and n == 1
            if mode == "splice" and n == 2 and not spare:
                spare.append(frame)  # a valid frame of another link
            if not active or mode in ("pass", "tls", "address", "downgrade"):
                server.sendall(frame)
                continue
            if mode == "flip" and plen:
                frame = frame[:-TAG - 1] + bytes([frame[-TAG - 1] ^ 1]) + frame[-TAG:]
            elif mode == "replace" and plen:
                old, new = (bytes.fromhex(x) for x in arg.split(":"))
                if old not in frame:
                    server.sendall(frame)
                    continue
                frame = frame.replace(old, new)
            elif mode == "replay" and plen:
                server.sendall(frame)
            elif mode == "reorder":
                if not held:
                    held.append(frame)
                    continue
                server.sendall(frame)
                frame = held.pop()
            elif mode == "drop":
                state["done"] = True
                say("TAMPERED")
                continue
            elif mode == "splice":
                for _ in range(300):  # hold this link's frame until the other link sent one
                    if spare:
                        break
                    threading.Event().wait(0.01)
                if not spare:
                    server.sendall(frame)
                    continue
                frame = spare[0]
            else:
                server.sendall(frame)
                continue
            state["done"] = True
            say("TAMPERED")
            server.sendall(frame)
    except (OSError, ConnectionError):
        pass
    finally:
        _shut(client, server)


def main() -> None:
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    ls = socket.create_server(("127.0.0.1", 0))
    say(f"PORT {ls.getsockname()[1]}")
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c, (host, port), mode, arg), daemon=True).start()


if __name__ == "__main__":
    main()
