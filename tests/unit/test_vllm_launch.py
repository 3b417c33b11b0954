"""The vLLM launcher's health probe, against real sockets (no vLLM needed)."""

from __future__ import annotations

import socket
import threading

from tensorfabric.vllm._launch import VllmServer

# what a gRPC (HTTP/2) server answers first: a SETTINGS frame, not an HTTP/1 status line
HTTP2_SETTINGS = bytes.fromhex("000018040000000000000400400000000500400000000600004000fe0300000001")


def _listener(answer: bytes) -> tuple[socket.socket, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve() -> None:  # one connection: a thread blocked in accept() keeps the port open
        try:
            c, _ = ls.accept()
        except OSError:
            return
        with c:
            c.recv(4096)
            c.sendall(answer)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return ls, th


def test_a_port_held_by_a_non_http1_server_is_not_healthy() -> None:
    """Seen in a loaded suite run: a Ray gRPC server took the port picked for vLLM before vLLM
    bound it; the probe raised BadStatusLine out of wait_ready instead of saying "not yet"."""
    ls, _ = _listener(HTTP2_SETTINGS)
    try:
        s = VllmServer("model", port=ls.getsockname()[1])
        assert s.healthy() is False
    finally:
        ls.close()


def test_a_200_is_healthy_and_a_closed_port_is_not() -> None:
    ls, _ = _listener(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    port = ls.getsockname()[1]
    try:
        assert VllmServer("model", port=port).healthy() is True
    finally:
        ls.close()
    assert VllmServer("model", port=port).healthy() is False


def test_a_server_with_its_worker_in_the_engine_core_is_pinned_whole(tmp_path) -> None:
    """With the worker inside the engine core (the default here) vLLM binds no thread to
    ``cpus``: the server process is pinned (its children inherit it). A started process's
    affinity is checked on a stand-in command (a vLLM server takes ~45 s to start; the vLLM
    tier runs real ones). With vLLM's own worker process it binds the worker itself: no pin."""
    import os
    import sys
    import time

    from tensorfabric.vllm._launch import _cpu_set

    assert _cpu_set("1") == {1} and _cpu_set("0-2,5") == {0, 1, 2, 5}
    assert _cpu_set("auto") is None and _cpu_set("0|1") is None
    cpu = max(os.sched_getaffinity(0))
    s = VllmServer(str(tmp_path), cpus=str(cpu), log_path=tmp_path / "s.log")
    assert s._pin == {cpu}
    s.argv = [sys.executable, "-c", "import os, time; print(sorted(os.sched_getaffinity(0)), "
              "flush=True); time.sleep(30)"]
    s.start()
    try:
        for _ in range(200):
            if s.log_path.read_text().strip():
                break
            time.sleep(0.05)
        assert s.log_path.read_text().strip() == str([cpu])
    finally:
        s.kill()
    assert VllmServer(str(tmp_path), cpus=str(cpu),
                      env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})._pin is None
