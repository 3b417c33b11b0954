"""The edge tier: PII scrubbing, routing, the local model, and the cloud client with failover.

:meth:`EdgeTier.chat` is a generator of events for one request: first a :class:`RouteInfo`
(where it is answered and why), then text pieces (PII already restored), then :class:`Done`.
The HTTP layer turns them into an OpenAI response or server-sent events.

Failure handling: a cloud call that fails or stalls for ``cloud.timeout`` seconds opens the
breaker (:class:`CloudHealth`); the edge then answers with its own model, continuing from any
text the cloud already produced, and marks the reply ``degraded``. While the breaker is open
every request is answered at the edge; a background prober closes it when the cloud is back.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from .._address import EngineAddress
from .._engine import Engine
from .._errors import TensorFabricError, TransferTimeout
from .._region import RegionDescriptor
from ._config import DeployConfig
from ._errors import CloudFailed, CloudUnavailable, InvalidRequest, SplitConfigError
from ._admission import TierLoad
from ._health import CloudHealth
from ._lm import ChatModel, TokenStep
from ._pii import PiiMapping, StreamRestorer
from ._requests import ChatRequest, Done, RouteInfo, StopCutter, build_scrubber
from ._routing import Decision, Probe, RouteRequest, RoutingPolicy, make_policy
from ._rpc import TAG_JOIN, CloudClient
from ._tls import tls_contexts, tls_wanted

__all__ = ["ChatRequest", "Done", "EdgeTier", "RouteInfo", "StopCutter", "build_scrubber"]


class EdgeTier:
    """Everything the edge process does for a request, minus HTTP."""

    def __init__(
        self,
        cfg: DeployConfig,
        model: ChatModel,
        cloud_address: bytes | None,
        *,
        policy: RoutingPolicy | None = None,
        full_model: ChatModel | None = None,
        on_cloud_change: Any = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.policy = policy or make_policy(cfg.routing)
        self.scrubber = build_scrubber(cfg)
        self.engine: Engine | None = None
        self.cloud: CloudClient | None = None
        self.health: CloudHealth | None = None
        self._head: Any = None
        self._head_lock = threading.Lock()
        self._imm = itertools.count(secrets.randbits(40) << 20)
        self._file_address = cloud_address
        self.hidden_bytes_shipped = 0  # layer split: bytes of hidden states written to the cloud
        self.edge_load = TierLoad("edge", getattr(model, "slots", 1))
        self.cloud_load = TierLoad("cloud", 1)
        self._cloud_inflight = 0  # this edge's requests at the cloud (when it reports no stats)
        self._inflight_lock = threading.Lock()
        if cloud_address is not None:
            hosts = tuple(h for h, _ in EngineAddress.from_bytes(cloud_address).endpoints)
            tls_server, tls_client = tls_contexts(cfg.cloud.tls, enabled=tls_wanted(cfg, hosts))
            self.tls = tls_server is not None
            self.engine = Engine(
                cfg.resolve_secret(), host=cfg.edge.host, port=cfg.edge.port, links=cfg.cloud.links,
                timeout=cfg.cloud.timeout, name="tf-edge", connect_timeout=cfg.cloud.connect_timeout,
                tls_server=tls_server, tls_client=tls_client,
            )  # fmt: skip
            if cfg.edge.address_file:
                tmp = cfg.edge.address_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(self.engine.address.hex())
                os.replace(tmp, cfg.edge.address_file)
            self.cloud = CloudClient(self.engine, cloud_address, dead_after=cfg.cloud.dead_after)
            h = cfg.health
            client = self.cloud
            # The first ping sets the links up (TLS handshakes both ways over a slow WAN link
            # take longer than a health ping may): give it the connect budget.
            up = client.ping(cfg.cloud.connect_timeout)
            self.health = CloudHealth(
                lambda: self._probe_cloud(h.probe_timeout),
                failures_to_open=h.failures_to_open, backoff_initial=h.backoff_initial,
                backoff_max=h.backoff_max, on_change=on_cloud_change, interval=h.interval,
                watch=lambda: client.heard_within(h.interval) or self._probe_cloud(h.probe_timeout),
            )  # fmt: skip
            if not up:
                self.health.record_failure("the cloud tier did not answer at start")
            threading.Thread(target=self._joins, name="tf-edge-join", daemon=True).start()
        if cfg.mode == "layer_split":
            if full_model is None:
                raise SplitConfigError("mode: layer_split needs the full-precision model at the edge")
            from ._layersplit import LayerStage

            self._full = full_model
            self._head = LayerStage(full_model.model, 0, cfg.layer_split.layers_at_edge)

    def _probe_cloud(self, timeout: float) -> bool:
        """Ping the cloud; with ``cloud.address_file``, follow a restarted cloud's new address."""
        assert self.cloud is not None
        path = self.cfg.cloud.address_file
        if path:
            try:
                with open(path) as f:
                    fresh = bytes.fromhex(f.read().strip())
            except (OSError, ValueError):
                fresh = b""
            # Follow the file when it changes (a restarted cloud wrote it), not when it merely
            # differs: a cloud that rejoined through cloud.join may be newer than the file.
            if fresh and fresh != self._file_address:
                self._file_address = fresh
                self.cloud.cloud = fresh
        return self.cloud.ping(timeout)

    def _joins(self) -> None:
        """A (re)started cloud announces itself (``cloud.join``): switch to it and probe now."""
        assert self.engine is not None and self.cloud is not None and self.health is not None
        while True:
            try:
                msg = self.engine.recv(tag=TAG_JOIN, timeout=1.0)
            except TransferTimeout:
                continue
            except TensorFabricError:
                return  # closed
            self.cloud.cloud = msg.peer
            self.health.poke()

    def tier_stats(self) -> dict[str, dict[str, float]]:
        """Per tier: requests queued, batch size (requests running at once), KV cache use (0-1)
        and generated tokens so far; the cloud's as of its last health pong."""
        m = self.model
        running = getattr(m, "running", None)  # batched runtimes count; one-at-a-time ones lock
        batch = float(running if running is not None else m.lock.locked())
        out = {"edge": {"queue": float(m.waiting), "batch": batch, "kv_usage": 0.0,
                        "hold": self.edge_load.mean_hold or 0.0}}
        eng = getattr(m, "engine", None)
        if eng is not None and hasattr(eng, "stats"):
            out["edge"]["kv_usage"] = float(eng.stats.kv_usage)
        pong = self.cloud.last_pong if self.cloud is not None else {}
        st = pong.get("stats")
        if st:
            out["cloud"] = {"queue": float(st.get("waiting", 0)), "batch": float(st.get("running", 0)),
                            "kv_usage": float(st.get("kv_usage", 0.0)),
                            "generated": float(st.get("generation_tokens", 0))}  # fmt: skip
        elif pong:
            out["cloud"] = {"queue": float(max(int(pong.get("load", 0)) - 1, 0)),
                            "batch": float(min(int(pong.get("load", 0)), 1)), "kv_usage": 0.0}  # fmt: skip
        if "cloud" in out:
            out["cloud"]["hold"] = self.cloud_load.mean_hold or 0.0
        return out

    @property
    def cloud_available(self) -> bool:
        return self.health is not None and self.health.available

    # ------------------------------------------------------------------ request

    def scrub(self, messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], PiiMapping]:
        mapping = PiiMapping()
        if self.scrubber is None:
            return [dict(m) for m in messages], mapping
        out = []
        for m in messages:
            text, _ = self.scrubber.scrub(str(m.get("content", "")), mapping)
            out.append({"role": m.get("role", "user"), "content": text})
        return out, mapping

    def chat(self, req: ChatRequest) -> Iterator[RouteInfo | str | Done]:
        """Events for one request; see the module docstring. Closing it early is safe."""
        msgs, mapping = self.scrub(req.messages)
        restorer = StreamRestorer(mapping)
        prompt_ids = self.model.encode_chat(msgs)
        limit = self.cfg.edge.max_context
        if len(prompt_ids) + req.max_tokens > limit:
            raise InvalidRequest(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds "
                f"the context of {limit} tokens (edge.max_context); shorten the conversation or "
                "lower max_tokens"
            )
        last_user = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
        rreq = RouteRequest(len(prompt_ids), req.max_tokens, req.explicit, mapping.counts(),  # type: ignore[arg-type]
                            req.stream, last_user)  # fmt: skip
        timeout = self.cfg.server.request_timeout
        edge_steps: Generator[TokenStep, None, None] | None = None
        probe: list[TokenStep] = []
        decision = self.policy.pre_route(rreq)
        if decision is None and self._edge_busier():
            decision = Decision("cloud", "edge_busy")  # a probe would only queue behind others
        held = [0.0]  # when this request took the edge model (its hold time feeds admission)
        try:
            if decision is None or decision.tier == "edge":
                m = self.model
                self.edge_load.admit(m.waiting + int(getattr(m, "running", m.lock.locked())), timeout)
                self.model.acquire(timeout)
                held[0] = time.monotonic()
                edge_steps = self._edge_stream(prompt_ids, req)
            if decision is None:
                for step in edge_steps:  # type: ignore[union-attr]
                    probe.append(step)
                    if step.stop or len(probe) >= self.policy.probe_tokens:
                        break
                done = bool(probe) and probe[-1].stop
                decision = self.policy.after_probe(
                    rreq, Probe([s.token_id for s in probe], [s.logprob for s in probe], done)
                )
            degraded = False
            if decision.tier == "cloud" and not self.cloud_available:
                degraded = True
                decision = Decision("edge", "cloud_down", decision.confidence)
                if edge_steps is None:
                    self.model.acquire(timeout)
                    held[0] = time.monotonic()
                    edge_steps = self._edge_stream(prompt_ids, req)
            if decision.tier == "cloud" and edge_steps is not None:
                edge_steps.close()
                self.model.lock.release()
                self.edge_load.observe(time.monotonic() - held[0])
                edge_steps, probe = None, []
            if decision.tier == "cloud":
                self._admit_cloud(timeout)
            yield RouteInfo(decision, degraded, mapping.counts(), len(prompt_ids))
            if edge_steps is not None:
                yield from self._finish_edge(probe, edge_steps, restorer, decision, degraded, rreq,
                                             mapping, cutter=StopCutter(req.stop))  # fmt: skip
                return
            yield from self._cloud_path(msgs, prompt_ids, req, restorer, decision, rreq, mapping)
        finally:
            if edge_steps is not None:
                edge_steps.close()
                self.model.lock.release()
                self.edge_load.observe(time.monotonic() - held[0])

    def _edge_busier(self) -> bool:
        """True when the edge model's slots are all taken and the cloud, up, would answer
        sooner than the edge could start: auto-routed requests then skip the probe."""
        if not self.cloud_available or not getattr(self.policy, "spill", True):
            return False
        m = self.model
        slots = int(getattr(m, "slots", 1))
        ahead = m.waiting + int(getattr(m, "running", m.lock.locked()))
        if ahead < slots:
            return False
        pong = self.cloud.last_pong if self.cloud is not None else {}
        st = pong.get("stats") or {}
        cloud_ahead = int(st.get("waiting", 0)) + int(st.get("running", 0)) if st else self._cloud_inflight
        cloud_wait = self.cloud_load.expected_wait(cloud_ahead, int(pong.get("slots", 1)))
        return self.edge_load.expected_wait(ahead, slots) >= cloud_wait

    def _admit_cloud(self, budget: float) -> None:
        """429 now if the cloud's queue would keep this request past ``budget`` seconds."""
        pong = self.cloud.last_pong if self.cloud is not None else {}
        st = pong.get("stats") or {}
        if st:
            ahead, slots = int(st.get("waiting", 0)) + int(st.get("running", 0)), int(pong.get("slots", 1))
        else:
            ahead, slots = self._cloud_inflight, int(pong.get("slots", 1))
        self.cloud_load.admit(ahead, budget, slots)

    def _edge_stream(
        self, prompt_ids: Sequence[int], req: ChatRequest
    ) -> Generator[TokenStep, None, None]:
        return self.model.stream(
            prompt_ids, max_new_tokens=req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed,
        )  # fmt: skip

    def _finish_edge(
        self, probe: list[TokenStep], steps: Iterator[TokenStep], restorer: StreamRestorer,
        decision: Decision, degraded: bool, rreq: RouteRequest, mapping: PiiMapping,
        tier: str = "edge", already: int = 0, cloud_error: str | None = None,
        cutter: StopCutter | None = None,
    ) -> Iterator[str | Done]:  # fmt: skip
        cutter = cutter or StopCutter(())
        n, finish = already, "length"
        for step in itertools.chain(probe, steps):
            if step.stop:
                finish = "stop"
                break
            n += 1
            text = cutter.feed(restorer.feed(step.text))
            if text:
                yield text
            if cutter.hit:
                finish = "stop"
                break
            if n >= rreq.max_tokens:
                break
        tail = cutter.feed(restorer.flush())
        tail += cutter.flush()
        if tail:
            yield tail
        if cutter.hit:
            finish = "stop"
        yield Done(tier, decision.reason, degraded, finish, rreq.prompt_tokens, n,
                   decision.confidence, mapping.counts(), cloud_error)  # fmt: skip

    def _cloud_path(
        self, msgs: list[dict[str, str]], prompt_ids: list[int], req: ChatRequest,
        restorer: StreamRestorer, decision: Decision, rreq: RouteRequest, mapping: PiiMapping,
    ) -> Iterator[str | Done]:  # fmt: skip
        assert self.cloud is not None and self.health is not None
        produced: list[str] = []
        cutter = StopCutter(req.stop)
        n, finish = 0, "length"
        started = time.monotonic()
        held: float | None = None  # the cloud's own measure of the time it worked on this one
        with self._inflight_lock:
            self._cloud_inflight += 1
        try:
            if self.cfg.mode == "layer_split":
                events = self._split_stream(prompt_ids, req)
            else:
                events = self.cloud.stream(
                    "chat", self.cfg.server.request_timeout, messages=msgs,
                    max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    seed=req.seed,
                )  # fmt: skip
            for ev in events:
                if ev["event"] == "done":
                    finish = ev.get("finish_reason", "stop")
                    held = ev.get("held_s")
                    break
                if ev.get("token", 0) < 0:
                    continue  # keep-alive from a cloud still working (disaggregated workers)
                n += int(ev.get("n", 1))  # a vLLM step may carry several tokens
                produced.append(ev["text"])
                text = cutter.feed(restorer.feed(ev["text"]))
                if text:
                    yield text
                if cutter.hit:
                    finish = "stop"
                    close = getattr(events, "close", None)
                    if close is not None:
                        close()  # tells the cloud to stop generating
                    break
        except CloudUnavailable as exc:
            if not isinstance(exc, CloudFailed):
                self.health.record_failure(str(exc))  # silence: the cloud is down
            yield from self._take_over(msgs, req, restorer, decision, rreq, mapping, produced, n, exc, cutter)
            return
        finally:
            with self._inflight_lock:
                self._cloud_inflight -= 1
        # what admission needs is how long the cloud holds a request, not how long this one
        # waited behind others there (counted in, a burst of n inflated it about n/2 times and
        # later requests got 429 that would have finished in time); a cloud that does not say
        # (layer split) is timed here
        seen = time.monotonic() - started
        ok = isinstance(held, (int, float)) and 0 <= held <= seen
        self.cloud_load.observe(float(held) if ok else seen)  # type: ignore[arg-type]
        self.health.record_success()
        tail = cutter.feed(restorer.flush()) + cutter.flush()
        if tail:
            yield tail
        if cutter.hit:
            finish = "stop"
        yield Done("cloud", decision.reason, False, finish, rreq.prompt_tokens, n,
                   decision.confidence, mapping.counts())  # fmt: skip

    def _take_over(
        self, msgs: list[dict[str, str]], req: ChatRequest, restorer: StreamRestorer,
        decision: Decision, rreq: RouteRequest, mapping: PiiMapping, produced: list[str], n: int,
        exc: Exception, cutter: StopCutter,
    ) -> Iterator[str | Done]:  # fmt: skip
        """Finish at the edge, continuing from what the cloud already produced (degraded)."""
        self.model.acquire(self.cfg.server.request_timeout)
        steps = None
        try:
            left = req.max_tokens - n
            ids = self.model.encode_chat(msgs, prefix="".join(produced))
            steps = self.model.stream(ids, max_new_tokens=max(left, 0), temperature=req.temperature,
                                      top_p=req.top_p, seed=req.seed)  # fmt: skip
            tier = "cloud+edge" if n else "edge"
            reason = decision.reason if n else "cloud_failed"
            yield from self._finish_edge(
                [], steps, restorer, Decision("edge", reason, decision.confidence), True, rreq,
                mapping, tier=tier, already=n, cloud_error=str(exc), cutter=cutter,
            )  # fmt: skip
        finally:
            if steps is not None:
                steps.close()
            self.model.lock.release()

    # ------------------------------------------------------------------ layer split

    def _split_stream(self, prompt_ids: list[int], req: ChatRequest) -> Iterator[dict[str, Any]]:
        """Greedy generation with layers [0, k) here and [k, n) in the cloud."""
        import torch

        from ._lm import _Detokenizer

        assert self.cloud is not None and self.engine is not None
        t = self.cfg.cloud.timeout
        total = len(prompt_ids) + req.max_tokens
        opened = self.cloud.call("ls_open", t, max_positions=total)
        sid = opened["session"]
        if opened.get("layers_at_edge") != self._head.end:
            self.cloud.call("ls_close", 2.0, session=sid)
            raise SplitConfigError(
                f"layer split mismatch: this edge runs {self._head.end} layers but the cloud "
                f"expects {opened.get('layers_at_edge')}; set the same layer_split.layers_at_edge "
                "on both tiers"
            )
        desc = RegionDescriptor.from_bytes(bytes.fromhex(opened["desc"]))
        cache = self._head.new_cache()
        detok = _Detokenizer(self._full)
        x = torch.tensor([prompt_ids], dtype=torch.long)
        pos = 0
        try:
            for _ in range(req.max_tokens):
                with self._head_lock:
                    h = self._head.forward(x, cache, pos).contiguous().numpy()
                imm = next(self._imm)
                self.engine.write(h, desc, imm=imm, timeout=t).wait(t + 1.0)
                self.hidden_bytes_shipped += h.nbytes
                rep = self.cloud.call("ls_step", t, session=sid, n=int(x.shape[1]), imm=imm)
                pos += int(x.shape[1])
                tok = int(rep["token"])
                if tok in self._full.stop_ids:
                    yield {"event": "done", "finish_reason": "stop"}
                    return
                yield {"event": "delta", "text": detok.push(tok), "token": tok,
                       "logprob": rep["logprob"]}  # fmt: skip
                x = torch.tensor([[tok]], dtype=torch.long)
            yield {"event": "done", "finish_reason": "length"}
        except Exception as exc:
            if isinstance(exc, CloudUnavailable):
                raise
            from .._errors import TensorFabricError

            if isinstance(exc, TensorFabricError):
                raise CloudUnavailable(f"layer-split transfer failed: {exc}") from exc
            raise
        finally:
            try:
                self.cloud.call("ls_close", 2.0, session=sid)
            except CloudUnavailable:
                pass

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close is not None:  # an edge runtime with its own engine (vLLM, llama.cpp)
            close()
        if self.health is not None:
            self.health.close()
        if self.cloud is not None:
            self.cloud.close()
        if self.engine is not None:
            self.engine.close()
