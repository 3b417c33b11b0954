"""The cloud tier: a process that serves chat generation and layer-split steps to edges.

It owns an :class:`~tensorfabric.Engine` listening on ``cloud.host:cloud.port`` and answers
RPCs (see :mod:`._rpc`). It only ever sees what the edge sends: scrubbed text, or hidden states
computed from scrubbed text. ``cloud.record_received`` appends every received message to a file
so an audit (and the tests) can prove that no original PII arrived.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._engine import Engine
from .._errors import ClosedError, TensorFabricError, TransferTimeout
from ._config import DeployConfig
from ._lm import ChatModel, load_chat_model
from ._errors import Overloaded, SplitConfigError
from ._rpc import TAG_JOIN, TAG_REPLY, TAG_REQUEST, decode_msg, encode_msg
from ._tls import fingerprint, tls_contexts, tls_wanted

__all__ = ["CloudTier"]

log = logging.getLogger("tensorfabric.split.cloud")


class CloudTier:
    """Serve ``ping``, ``chat`` (streamed) and ``ls_*`` (layer split) until :meth:`close`."""

    def __init__(self, cfg: DeployConfig, *, model: ChatModel | None = None) -> None:
        self.cfg = cfg
        self.disagg: Any = None
        self.vllm: Any = None  # VllmChat / VllmHttpChat when the tier runs on vLLM
        self.model: Any = None
        c = cfg.cloud
        if model is None and engine_kind(cfg) == "vllm":
            from ._vllm import VllmChat, VllmHttpChat

            if c.disaggregated:  # a prefill/decode pair joined by tensorfabric's KV connector
                self.vllm = VllmHttpChat.disaggregated(c.model, kv_space_gib=c.kv_space_gib,
                                                       max_model_len=c.max_model_len)  # fmt: skip
            else:
                self.vllm = VllmChat(c.model, kv_space_gib=c.kv_space_gib, max_num_seqs=c.max_num_seqs,
                                     max_model_len=c.max_model_len, cpus=c.cpus)  # fmt: skip
            self.vllm.warmup()
        else:
            self.model = model or load_chat_model(c.model)
            self.model.warmup()
            if c.disaggregated:
                # Prefill and decode in their own processes, KV cache moved with write_pages.
                from ..kv import DisaggregatedCluster

                self.disagg = DisaggregatedCluster(
                    None if c.model == "default" else c.model,
                    secret=cfg.resolve_secret(), timeout=c.timeout,
                )  # fmt: skip
        self.model_name = (self.vllm or self.model).name
        self._slots = c.max_num_seqs if self.vllm is not None else 1  # requests run at once
        tls_server, tls_client = tls_contexts(cfg.cloud.tls, enabled=tls_wanted(cfg))
        self.tls = tls_server is not None
        self.engine = Engine(
            cfg.resolve_secret(), host=cfg.cloud.host, port=cfg.cloud.port,
            links=cfg.cloud.links, timeout=cfg.cloud.timeout, name="tf-cloud",
            tls_server=tls_server, tls_client=tls_client,
        )  # fmt: skip
        self._record = open(cfg.cloud.record_received, "ab") if cfg.cloud.record_received else None
        self._record_lock = threading.Lock()
        # on vLLM every admitted request runs in the batch: one thread each relays its tokens
        workers = 16 if self.vllm is None else max(16, c.max_num_seqs + 8)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tf-cloud")
        self._cancelled: set[tuple[bytes, int]] = set()
        self._sessions: dict[tuple[bytes, int], Any] = {}
        self._session_ids = iter(range(1, 1 << 62))
        self._tail: Any = None
        self._tail_lock = threading.Lock()
        self._stop = threading.Event()
        self._active: dict[bytes, set[int]] = {}  # peer -> request ids queued or running
        self._active_lock = threading.Lock()
        self.served = 0
        threading.Thread(target=self._keepalive, name="tf-cloud-keepalive", daemon=True).start()
        if cfg.cloud.join:
            threading.Thread(target=self._join, name="tf-cloud-join", daemon=True).start()

    @property
    def address(self) -> bytes:
        return self.engine.address

    # ------------------------------------------------------------------ loop

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.engine.recv(tag=TAG_REQUEST, timeout=0.5)
            except TransferTimeout:
                continue
            except ClosedError:
                return
            if self._record is not None:
                with self._record_lock:
                    self._record.write(msg.data + b"\n")
                    self._record.flush()
            try:
                req = decode_msg(msg.data)
            except ValueError:
                log.warning("dropped a malformed request from %r", msg.peer[:40])
                continue
            op, rid = req.get("op"), req.get("id", -1)
            if op == "cancel":
                self._cancelled.add((msg.peer, int(req.get("target", -1))))
                continue
            if op == "ping":  # answered here, never queued behind work: busy is not down
                pong = {"id": rid, "event": "pong", "model": self.model_name, "load": self._load(),
                        "engine": "vllm" if self.vllm is not None else "transformers",
                        "slots": self._slots}
                if self.vllm is not None:
                    pong["stats"] = self.vllm.stats.snapshot()
                try:  # not waited for: this loop must never stall on one slow edge
                    self.engine.send(msg.peer, encode_msg(pong), tag=TAG_REPLY, timeout=5.0)
                except TensorFabricError:
                    pass
                continue
            with self._active_lock:
                self._active.setdefault(msg.peer, set()).add(rid)
            self._pool.submit(self._handle, msg.peer, req)

    def _load(self) -> int:
        with self._active_lock:
            return sum(len(v) for v in self._active.values())

    def _keepalive(self) -> None:
        """Every ``cloud.keepalive`` seconds tell each edge which of its requests are still
        queued or running, so a long queue never reads as an outage."""
        period = self.cfg.cloud.keepalive
        while not self._stop.wait(period):
            with self._active_lock:
                snapshot = [(peer, sorted(ids)) for peer, ids in self._active.items() if ids]
            extra: dict[str, Any] = {"load": sum(len(i) for _, i in snapshot), "slots": self._slots}
            if self.vllm is not None:  # batch statistics ride along (the edge's /metrics)
                extra["stats"] = self.vllm.stats.snapshot()
            for peer, ids in snapshot:
                try:
                    self.engine.send(peer, encode_msg({"event": "alive", "ids": ids, **extra}), tag=TAG_REPLY,
                                     timeout=max(period * 2, 1.0))  # fmt: skip
                except TensorFabricError:
                    pass

    def _join(self) -> None:
        """Announce this (re)started cloud to the edge named by ``cloud.join`` until it answers."""
        from pathlib import Path

        spec = self.cfg.cloud.join or ""
        while not self._stop.is_set():
            try:
                text = Path(spec).read_text().strip() if Path(spec).exists() else spec
                edge = bytes.fromhex(text)
                self.engine.send(edge, encode_msg({"op": "join"}), tag=TAG_JOIN, timeout=5.0).wait(5.0)
                log.warning("announced this cloud tier to the edge")
                return
            except (ValueError, OSError, TensorFabricError) as exc:
                log.info("cloud.join: edge not reachable yet (%s); retrying", exc)
            self._stop.wait(2.0)

    def _reply(self, peer: bytes, obj: dict[str, Any]) -> None:
        try:
            self.engine.send(peer, encode_msg(obj), tag=TAG_REPLY).wait(self.cfg.cloud.timeout)
        except TensorFabricError as exc:  # the edge went away; it will time out and retry
            log.info("reply to edge failed: %s", exc)

    def _handle(self, peer: bytes, req: dict[str, Any]) -> None:
        rid = req.get("id", -1)
        op = req.get("op")
        try:
            if (peer, rid) in self._cancelled:
                return  # the edge gave up while this waited in the queue
            if op == "chat":
                self._chat(peer, rid, req)
            elif op == "ls_open":
                self._ls_open(peer, rid, req)
            elif op == "ls_step":
                self._ls_step(peer, rid, req)
            elif op == "ls_close":
                self._sessions.pop((peer, int(req.get("session", -1))), None)
                self._reply(peer, {"id": rid, "event": "ok"})
            else:
                self._reply(peer, {"id": rid, "event": "error", "message": f"unknown op {op!r}"})
        except Overloaded as exc:
            self._reply(peer, {"id": rid, "event": "error", "kind": "busy", "message": str(exc)})
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            # what the request carried (a bad seed, a missing field): the client's fault
            log.info("request %s %s refused: %s", op, rid, exc)
            self._reply(peer, {"id": rid, "event": "error", "kind": "request",
                               "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        except Exception as exc:  # every request gets an answer, even a failing one
            log.exception("request %s %s failed", op, rid)
            self._reply(peer, {"id": rid, "event": "error", "kind": "internal",
                               "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        finally:
            self._cancelled.discard((peer, rid))
            with self._active_lock:
                ids = self._active.get(peer)
                if ids is not None:
                    ids.discard(rid)
                    if not ids:
                        del self._active[peer]

    # ------------------------------------------------------------------ chat

    def _chat(self, peer: bytes, rid: int, req: dict[str, Any]) -> None:
        if self.vllm is not None:
            self._chat_vllm(peer, rid, req)
            return
        m = self.model
        ids = m.encode_chat(req["messages"], prefix=req.get("prefix", ""))
        if self.disagg is not None:
            self._chat_disaggregated(peer, rid, ids, int(req.get("max_tokens", 128)))
            return
        m.acquire(timeout=self.cfg.server.request_timeout)
        t0 = time.monotonic()  # the model is this request's from here: its hold, not its wait
        n, finish = 0, "length"
        try:
            for step in m.stream(
                ids, max_new_tokens=int(req.get("max_tokens", 128)),
                temperature=float(req.get("temperature", 0.0)),
                top_p=float(req.get("top_p", 1.0)), seed=req.get("seed"),
            ):  # fmt: skip
                if (peer, rid) in self._cancelled or self._stop.is_set():
                    return
                if step.stop:
                    finish = "stop"
                    break
                n += 1
                self._reply(peer, {"id": rid, "event": "delta", "text": step.text,
                                   "token": step.token_id, "logprob": step.logprob})
        finally:
            m.lock.release()
        self.served += 1
        self._reply(peer, {"id": rid, "event": "done", "finish_reason": finish,
                           "prompt_tokens": len(ids), "completion_tokens": n,
                           "held_s": time.monotonic() - t0})

    def _chat_vllm(self, peer: bytes, rid: int, req: dict[str, Any]) -> None:
        """One request in vLLM's running batch; its tokens are relayed as vLLM makes them."""
        v = self.vllm
        ids = v.encode_chat(req["messages"], prefix=req.get("prefix", ""))
        t0 = time.monotonic()
        steps = v.stream(
            ids, max_tokens=int(req.get("max_tokens", 128)),
            temperature=float(req.get("temperature", 0.0)), top_p=float(req.get("top_p", 1.0)),
            seed=req.get("seed"), logprobs=bool(req.get("logprobs", False)),
            timeout=self.cfg.server.request_timeout,
        )  # fmt: skip
        n, finish = 0, "length"
        try:
            for st in steps:
                if (peer, rid) in self._cancelled or self._stop.is_set():
                    return  # closing the stream aborts the request in vLLM
                if st.token_ids:
                    n += len(st.token_ids)
                    self._reply(peer, {"id": rid, "event": "delta", "text": st.text, "n": len(st.token_ids),
                                       "token": st.token_ids[-1], "tokens": st.token_ids,
                                       "logprobs": st.logprobs})  # fmt: skip
                if st.finish_reason is not None:
                    finish = "stop" if st.finish_reason == "stop" else "length"
        finally:
            steps.close()
        self.served += 1
        self._reply(peer, {"id": rid, "event": "done", "finish_reason": finish,
                           "prompt_tokens": len(ids), "completion_tokens": n,
                           "held_s": time.monotonic() - t0})

    def _chat_disaggregated(self, peer: bytes, rid: int, ids: list[int], max_tokens: int) -> None:
        """Greedy generation on the kv prefill/decode workers; the answer arrives whole and is
        forwarded token by token (the kv client has no streaming interface yet)."""
        from ._lm import _Detokenizer

        t0 = time.monotonic()
        fut = self.disagg.submit(ids, max_new_tokens=max_tokens)
        deadline = time.monotonic() + self.cfg.server.request_timeout
        while not fut.done():
            if (peer, rid) in self._cancelled or time.monotonic() > deadline:
                fut.cancel()
                return
            # keep the edge's progress timer alive while the workers run
            self._reply(peer, {"id": rid, "event": "delta", "text": "", "token": -1, "logprob": 0.0})
            try:
                fut.result(timeout=min(1.0, self.cfg.cloud.timeout / 3))
            except TimeoutError:
                continue
        res = fut.result()
        detok = _Detokenizer(self.model)
        for tok in res.tokens:
            self._reply(peer, {"id": rid, "event": "delta", "text": detok.push(tok), "token": tok,
                               "logprob": 0.0})  # fmt: skip
        self.served += 1
        self._reply(peer, {"id": rid, "event": "done", "finish_reason": "stop" if res.stopped else "length",
                           "prompt_tokens": len(ids), "completion_tokens": len(res.tokens),
                           "held_s": time.monotonic() - t0})  # fmt: skip

    # ------------------------------------------------------------------ layer split

    def _stage(self) -> Any:
        with self._tail_lock:
            if self._tail is None:
                from ._layersplit import LayerStage

                k = self.cfg.layer_split.layers_at_edge
                n = len(self.model.model.model.layers)
                self._tail = LayerStage(self.model.model, k, n)
            return self._tail

    def _ls_open(self, peer: bytes, rid: int, req: dict[str, Any]) -> None:
        stage = self._stage()
        max_tokens = int(req["max_positions"])
        region = self.engine.alloc(max_tokens * stage.hidden_size * 4)
        sid = next(self._session_ids)
        self._sessions[(peer, sid)] = [region, stage.new_cache(), 0, max_tokens]
        self._reply(peer, {"id": rid, "event": "ok", "session": sid,
                           "desc": region.descriptor().to_bytes().hex(),
                           "hidden_size": stage.hidden_size, "layers_at_edge": stage.start})

    def _ls_step(self, peer: bytes, rid: int, req: dict[str, Any]) -> None:
        import numpy as np
        import torch

        sess = self._sessions.get((peer, int(req["session"])))
        if sess is None:
            raise KeyError("unknown layer-split session (expired or never opened)")
        region, cache, pos, max_tokens = sess
        n = int(req["n"])
        if pos + n > max_tokens:
            raise ValueError(f"session holds {max_tokens} positions; step needs {pos + n}")
        stage = self._stage()
        self.engine.expect(int(req["imm"]), timeout=self.cfg.cloud.timeout).wait()
        hidden = np.frombuffer(region.array, dtype=np.float32, count=n * stage.hidden_size)
        x = torch.from_numpy(hidden.copy()).view(1, n, stage.hidden_size)
        self.model.acquire(timeout=self.cfg.server.request_timeout)
        try:
            logits = stage.forward(x, cache, pos)
        finally:
            self.model.lock.release()
        sess[2] = pos + n
        logp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        self._reply(peer, {"id": rid, "event": "token", "token": tok, "logprob": float(logp[tok])})

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.vllm is not None:
            self.vllm.close()
        if self.disagg is not None:
            self.disagg.close()
        self.engine.close()
        if self._record is not None:
            self._record.close()


def engine_kind(cfg: DeployConfig) -> str:
    """The cloud tier's generation engine: ``vllm`` or ``transformers`` (``cloud.engine``)."""
    from ._vllm import have_vllm

    kind = cfg.cloud.engine
    if kind == "auto":
        return "vllm" if cfg.mode == "route" and have_vllm() else "transformers"
    if kind == "vllm":
        if cfg.mode == "layer_split":
            raise SplitConfigError("cloud.engine: vllm cannot run layer_split mode (it needs the "
                                   "model's layers in this process); use engine: transformers")
        if not have_vllm():
            raise ImportError("cloud.engine: vllm needs the vllm extra: pip install 'tensorfabric[vllm]'")
    return kind


def run_cloud(cfg: DeployConfig, *, announce: Any = print) -> None:
    """Run a cloud tier in this process until interrupted; announce its address (hex)."""
    started = time.perf_counter()
    from ._cpus import pin_process

    pin_process("cloud.cpus", cfg.cloud.cpus)  # before the model and vLLM's processes start
    tier = CloudTier(cfg)
    if tier.tls:
        from ._tls import default_dir

        cert = cfg.cloud.tls.cert or str((Path(cfg.cloud.tls.dir or default_dir()) / "tier-cert.pem"))
        announce(f"TENSORFABRIC_CLOUD_TLS {fingerprint(Path(cert).read_bytes())} {cert}")
    announce(f"TENSORFABRIC_CLOUD_ADDRESS {tier.address.hex()}")
    if cfg.cloud.address_file:
        tmp = Path(cfg.cloud.address_file + ".tmp")
        tmp.write_text(tier.address.hex())
        tmp.replace(cfg.cloud.address_file)  # readers never see half an address
    log.info("cloud tier ready in %.1f s on %s", time.perf_counter() - started, tier.engine)
    try:
        tier.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        tier.close()
