"""The trainer side of weight updates into running vLLM servers.

``VllmWeights`` wraps a ``tensorfabric.weights.Publisher`` whose plan maps the trainer's
tensors to vLLM's parameters (``vllm_plan``), joins every vLLM server (started with
``weights_server_args()``) to it, and after each verified update switches every replica over
through the server's authenticated ``/tensorfabric/weights/switch`` route. ``sync()`` brings
replicas that joined late, restarted or missed a switch to the current version.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .._errors import ConfigError, TensorFabricError
from ..weights import Publisher, PublishResult, WeightPlan, specs_of
from ..weights._plan import weights_key
from ..weights._vllm_layout import check_vllm_layout, vllm_layout
from ._weights_ext import EXTENSION_CLS
from ._weights_http import MIDDLEWARE, PREFIX, sign_headers

log = logging.getLogger("tensorfabric.vllm.weights")


class ReplicaError(TensorFabricError):
    """A vLLM server refused or did not answer a weights control request (the message has
    its answer)."""


def weights_server_args() -> list[str]:
    """The ``vllm serve`` arguments that load tensorfabric's weight-update extension (the
    server also needs ``TENSORFABRIC_SECRET`` in its environment)."""
    return ["--worker-extension-cls", EXTENSION_CLS, "--middleware", MIDDLEWARE]


def vllm_plan(tensors: Mapping[str, Any], *, dtype: str = "float32", tied_embeddings: bool = True,
              **kw: Any) -> WeightPlan:
    """The static plan from the trainer's ``tensors`` (name -> array/tensor) to vLLM's
    parameters (fused qkv/gate_up, cast to ``dtype``). ``kw`` goes to ``WeightPlan``."""
    src = specs_of(tensors)
    return WeightPlan(src, vllm_layout(src, dtype=dtype, tied_embeddings=tied_embeddings), **kw)


@dataclass
class VllmPublishResult:
    """One update: ``serving`` replicas now answer with ``version``; ``failed`` keep their
    previous version (reason per name). ``transfer`` is the tensorfabric part (write + verify),
    ``seconds`` the whole update including the switch."""

    version: int
    serving: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    transfer: PublishResult | None = None
    switch_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


class VllmWeights:
    """Publishes the trainer's weights to vLLM servers (``replicas``: name -> base URL).

    ``engine``: the trainer's tensorfabric Engine (same secret as the servers); ``secret``:
    that secret (keys the checksums and signs control requests); ``host``/``transports``: what
    each server's worker engine listens on and may use (``("tcp",)`` between hosts).
    """

    def __init__(self, engine: Any, plan: WeightPlan, replicas: Mapping[str, str], *,
                 secret: str | bytes, host: str = "127.0.0.1",
                 transports: Sequence[str] = ("shm", "tcp"), timeout: float = 60.0,
                 drain_s: float = 60.0, **publisher_kw: Any) -> None:
        if not secret:
            raise ConfigError("VllmWeights needs the shared secret")
        self.plan, self.secret, self.timeout, self.drain_s = plan, secret, timeout, drain_s
        self.urls = dict(replicas)
        self.hosts = {name: host for name in self.urls}
        self.transports = tuple(transports)
        self.publisher = Publisher(engine, plan, key=weights_key(secret), timeout=timeout,
                                   **publisher_kw)
        self.address = engine.address
        self._lock = threading.Lock()
        self._closed = threading.Event()

    # -- control requests ----------------------------------------------------------------------
    def call(self, name: str, op: str, body: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """POST ``/tensorfabric/weights/OP`` to replica ``name``; its JSON answer."""
        path = PREFIX + op
        data = json.dumps(dict(body or {})).encode()
        headers = {"Content-Type": "application/json", **sign_headers(self.secret, path, data)}
        req = urllib.request.Request(self.urls[name] + path, data, headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout + self.drain_s) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            raise ReplicaError(f"{name} {op}: HTTP {exc.code}: {raw[:500]}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ReplicaError(f"{name} {op}: {exc}") from None

    def join(self, name: str) -> dict[str, Any]:
        """Check the plan against the replica's model, then make it subscribe to this
        publisher (its catch-up to the current version starts at once; ``sync`` switches)."""
        params = self.call(name, "params")
        params.pop("version", None)
        check_vllm_layout(self.plan.layout, {k: (v[0], v[1]) for k, v in params.items()})
        cfg = {"publisher": self.address.hex(), "layout": self.plan.layout.to_json(), "name": name,
               "timeout": self.timeout, "host": self.hosts[name], "transports": list(self.transports)}
        state = self.call(name, "join", {"config": cfg})
        # the replica's new engine says hello on its own: until the publisher has it, a
        # publish would still write to the engine it replaced (or leave it out)
        self.publisher.wait_member(name, bytes.fromhex(str(state.get("address", ""))),
                                   self.timeout)
        with self._lock:  # a new publisher continues after the newest version anyone serves
            if int(state.get("serving", 0)) > self.publisher.version:
                self.publisher.version = int(state["serving"])
                self.publisher.crcs = []  # nothing of that number to catch anyone up with
        return state

    def join_all(self, timeout: float | None = None) -> None:
        for name in self.urls:
            self.join(name)
        self.publisher.wait_replicas(len(self.urls), timeout or self.timeout)

    def state(self, name: str) -> dict[str, Any]:
        return self.call(name, "state", timeout=min(self.timeout, 30.0))

    def switch(self, name: str, version: int) -> dict[str, Any]:
        return self.call(name, "switch", {"version": version, "drain_s": self.drain_s})

    # -- updates -------------------------------------------------------------------------------
    def publish(self, tensors: Mapping[str, Any], *, timeout: float | None = None) -> VllmPublishResult:
        """Write ``tensors`` as the next version into every joined replica's staging region
        (while they serve the old one), verify it there (keyed checksums), then switch every
        replica that verified it. Replicas that did not keep their previous version."""
        t0 = time.perf_counter()
        res = self.publisher.publish(tensors, timeout=timeout)
        out = VllmPublishResult(res.version, failed=dict(res.failed), transfer=res)
        t1 = time.perf_counter()
        self._switch_many(res.updated, res.version, out)
        out.switch_s = time.perf_counter() - t1
        out.seconds = time.perf_counter() - t0
        return out

    def _switch_many(self, names: Sequence[str], version: int, out: VllmPublishResult) -> None:
        if not names:
            return
        with ThreadPoolExecutor(len(names)) as pool:
            answers = {n: pool.submit(self.switch, n, version) for n in names}
        for n, fut in answers.items():
            try:
                got = fut.result()
            except ReplicaError as exc:
                out.failed[n] = f"switch: {exc}"
                continue
            if int(got.get("version", -1)) == version:
                out.serving.append(n)
            else:
                out.failed[n] = f"switch: serving {got.get('version')} after the switch"

    def sync(self, timeout: float = 120.0) -> dict[str, int]:
        """Bring every replica to the publisher's current version: (re)join those that follow
        another publisher or none (restarted), catch up those that missed it, switch. Returns
        the version each serves; raises TransferTimeout if some are still behind after
        ``timeout``."""
        deadline = time.monotonic() + timeout
        want = self.publisher.version
        asked: set[str] = set()
        while True:
            serving = self._pass(want, asked)
            if all(v == want for v in serving.values()):
                return serving
            if time.monotonic() > deadline:
                from .. import TransferTimeout

                raise TransferTimeout(f"replicas still behind version {want} after {timeout:.0f} s: "
                                      f"{serving}")
            time.sleep(0.5)

    def _pass(self, want: int, asked: set[str]) -> dict[str, int]:
        serving: dict[str, int] = {}
        for name in list(self.urls):
            try:
                st = self.state(name)
                if (st.get("publisher") != self.address.hex()
                        or name not in self.publisher.replicas):  # or dropped after a failure
                    st = self.join(name)
                elif int(st["staged"]) == want and int(st["version"]) != want:
                    st = self.switch(name, want)
                elif int(st["version"]) != want and name not in asked:
                    asked.add(name)  # it missed the version (say it failed there)
                    self.publisher.catch_up([name])
                serving[name] = int(st["version"])
            except (ReplicaError, TensorFabricError) as exc:
                log.info("sync: %s", exc)
                serving[name] = -1
        return serving

    def watch(self, every: float = 2.0) -> None:
        """Keep syncing in the background (until ``close``): a replica that restarts or joins
        late is caught up and switched without a call to ``sync``."""
        def loop() -> None:
            asked: set[str] = set()
            seen = -1
            while not self._closed.wait(every):
                want = self.publisher.version
                if want != seen:
                    asked, seen = set(), want
                if want:
                    self._pass(want, asked)

        threading.Thread(target=loop, name="vllm-weights-watch", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.publisher.close()

    def __enter__(self) -> VllmWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
