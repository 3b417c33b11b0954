"""``TensorFabricConnector``: vLLM's KV connector API (v1) over a tensorfabric engine.

vLLM builds one instance in its scheduler process (role SCHEDULER) and one in each worker
(role WORKER); the worker's engine address, grant key and KV layout reach the scheduler
through vLLM's handshake metadata, and the scheduler's decisions reach the worker as
:class:`TFConnectorMetadata` every step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from .._errors import ConfigError
from . import _tokens
from ._layout import KVLayout, LayoutMismatchError
from ._settings import ConnectorSettings
from ._worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("tensorfabric.vllm")
if not log.handlers:
    # vLLM configures only its own loggers: show ours in the server's log too
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [tensorfabric] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(os.environ.get("TENSORFABRIC_VLLM_LOG", "INFO").upper())
    log.propagate = False


@dataclass
class TFHandshake(KVConnectorHandshakeMetadata):
    info: dict[str, Any]


@dataclass
class TFConnectorMetadata(KVConnectorMetadata):
    # decode: request -> (local block ids, index of the first remote block, transfer params)
    recv: dict[str, tuple[list[int], int, dict[str, Any]]] = field(default_factory=dict)
    # decode: transfer params of requests whose remote blocks must be freed without a pull
    release: list[dict[str, Any]] = field(default_factory=list)
    # prefill: request -> time.time() after which its blocks are freed if nobody pulled
    hold: dict[str, float] = field(default_factory=dict)
    # prefill, push mode: request -> (push id, block ids, first token computed in this step,
    # tokens computed after it, prompt length, resumed after preemption)
    push: dict[str, tuple[str, list[int], int, int, int, bool]] = field(default_factory=dict)
    # prefill, push mode: requests that ended before their prompt was pushed
    abort: list[str] = field(default_factory=list)
    # decode, push mode: requests aborted while they wait for their KV
    cancel: list[str] = field(default_factory=list)
    # nothing scheduled: vLLM steps only to poll transfers (requests waiting for KV, blocks
    # held for a decode instance); the worker then waits for progress instead of spinning
    idle: bool = False


_FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")
_IDLE_WAIT_S = 0.02   # longest an idle step waits; any transfer's end wakes it at once


class TensorFabricConnector(KVConnectorBase_V1):
    """Moves a prefill instance's KV blocks into a decode instance with tensorfabric.

    Load it with ``--kv-transfer-config`` (see :func:`tensorfabric.vllm.kv_transfer_config`).
    The proxy sends a request to the prefill instance with ``kv_transfer_params =
    {"do_remote_decode": true}`` and ``max_tokens=1``; the response's ``kv_transfer_params``
    (engine address, block ids and a grant) go with the request to the decode instance, which
    pulls the blocks and decodes.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if tp != 1 or pp != 1:
            raise ConfigError(f"the tensorfabric KV connector supports tensor- and pipeline-"
                              f"parallel size 1, got tp={tp} pp={pp}")
        kvc = self._kv_transfer_config   # the base class refuses a missing one
        self.settings = ConnectorSettings.from_extra(kvc.kv_connector_extra_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.WORKER:
            self.worker = WorkerSide(self.settings, self.block_size, str(kvc.kv_role))
        # scheduler state
        self._peer: dict[str, Any] | None = None
        self._recv: dict[str, tuple[list[int], int, dict[str, Any]]] = {}
        self._release: list[dict[str, Any]] = []
        self._hold: dict[str, float] = {}
        self._warned: set[str] = set()
        self._bad: set[int] = set()
        self._push: dict[str, tuple[str, int]] = {}     # prefill: request -> (push id, prompt)
        self._push_blocks: dict[str, list[int]] = {}
        self._abort: list[str] = []
        self._push_loads: set[str] = set()   # decode: push-mode requests waiting for KV
        self._hit: dict[str, int] = {}        # decode: request -> tokens found in the local cache
        self._cancel: list[str] = []

    # -- worker side ----------------------------------------------------------------------

    def get_mem_pool_context(self) -> Any:
        return self.worker.allocation_context() if self.worker else None

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self.worker is not None
        self.worker.register(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return TFHandshake(self.worker.handshake()) if self.worker else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # before the forward pass (vLLM calls start_load_kv after it when no load is
        # synchronous): which blocks of which push requests this step computes
        if self.worker is not None and isinstance(connector_metadata, TFConnectorMetadata):
            self.worker.begin_step(connector_metadata.push, connector_metadata.abort)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TFConnectorMetadata)
        if meta.hold:
            self.worker.hold(meta.hold)
        for req_id in meta.cancel:
            self.worker.cancel_load(req_id)
        for params in meta.release:
            self.worker.release(params)
        for req_id, (blocks, first, params) in meta.recv.items():
            self.worker.load(req_id, blocks, first, params)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish before vLLM schedules the request (asynchronous loading)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        # push mode: write this layer's new blocks to the decode instance (every push_layers
        # layers); pull mode: blocks stay in place until the decode instance asks
        if self.worker is not None:
            self.worker.pusher.save_layer(layer_name)

    def wait_for_save(self) -> None:
        # the step's last layers go out now; nothing waits for the writes (vLLM keeps the
        # blocks until get_finished reports the request)
        if self.worker is not None:
            self.worker.pusher.end_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.worker is not None
        meta = self._connector_metadata
        if isinstance(meta, TFConnectorMetadata) and meta.idle and not (
                meta.recv or meta.release or meta.hold or meta.push or meta.abort
                or meta.cancel or finished_req_ids):
            # an idle step: wait (briefly) for a transfer to finish rather than let vLLM's
            # engine loop spin across its processes and take the CPU the prefill needs
            self.worker.wait_progress(_IDLE_WAIT_S)
        sending = self.worker.finished_sending(set(finished_req_ids))
        recving, failed, bad = self.worker.finished_recving()
        self._bad |= bad
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._bad = self._bad, set()
        return bad

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()

    # -- scheduler side -------------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        meta = metadata.get(0)
        if isinstance(meta, TFHandshake):
            self._peer = meta.info

    def _local(self) -> dict[str, Any]:
        if self._peer is None:
            raise RuntimeError("the tensorfabric connector's worker sent no handshake")
        return self._peer

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or "tf_engine" not in params:
            return 0, False
        if "tf_push" not in params and "tf_grant" not in params:
            return 0, False
        try:
            if "tf_layout" in params or "tf_grant" in params:   # push mode: the prefill checks
                KVLayout.from_json(self._local()["layout"]).check_compatible(
                    KVLayout.from_json(params.get("tf_layout") or {}))
        except (LayoutMismatchError, ConfigError) as exc:
            if request.request_id not in self._warned:
                self._warned.add(request.request_id)
                log.error("tensorfabric: %s: recomputing request %s here", exc, request.request_id)
            return 0, False
        count = request.num_prompt_tokens   # push mode: the prefill computes the whole prompt
        if "tf_grant" in params:
            count = min(int(params.get("remote_num_tokens", 0)), count)
        count -= num_computed_tokens
        if count > 0:
            # the local prefix-cache hit: request.num_computed_tokens is still 0 when vLLM
            # calls update_state_after_alloc for a new request
            self._hit[request.request_id] = num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_decode") and params.get("tf_push"):
            self._push[request.request_id] = (str(params["tf_push"]), request.num_prompt_tokens)
            return
        if not params or not params.get("do_remote_prefill") or "tf_engine" not in params:
            return
        params["do_remote_prefill"] = False   # one transfer per request
        if num_external_tokens <= 0:
            self._release.append(params)
            return
        nc = self._hit.pop(request.request_id, request.num_computed_tokens)
        first = nc // self.block_size
        n = -(-(nc + num_external_tokens) // self.block_size) - first
        local = list(blocks.get_unhashed_block_ids())[:n]
        self._recv[request.request_id] = (local, first, params)
        if params.get("tf_push"):
            self._push_loads.add(request.request_id)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = TFConnectorMetadata(recv=self._recv, release=self._release, hold=self._hold,
                                   push=self._push_step(scheduler_output), abort=self._abort,
                                   cancel=self._cancel,
                                   idle=not scheduler_output.total_num_scheduled_tokens)
        self._recv, self._release, self._hold, self._abort, self._cancel = {}, [], {}, [], []
        return meta

    def _push_step(self, out: Any) -> dict[str, tuple[str, list[int], int, int, int, bool]]:
        """Push-mode requests in this step: their blocks and the prompt tokens computed."""
        if not self._push:
            return {}
        step: dict[str, tuple[str, list[int], int, int, int, bool]] = {}
        n = out.num_scheduled_tokens
        for new in out.scheduled_new_reqs:
            if new.req_id in self._push:
                self._push_blocks[new.req_id] = list(new.block_ids[0])
                self._add(step, new.req_id, new.num_computed_tokens, n.get(new.req_id, 0), False)
        cached = out.scheduled_cached_reqs
        for i, req in enumerate(cached.req_ids):
            if req not in self._push:
                continue
            resumed = req in cached.resumed_req_ids
            added = cached.new_block_ids[i]
            if resumed:
                self._push_blocks[req] = list(added[0]) if added else []
            elif added:
                self._push_blocks.setdefault(req, []).extend(added[0])
            self._add(step, req, cached.num_computed_tokens[i], n.get(req, 0), resumed)
        return step

    def _add(self, step: dict[str, Any], req: str, start: int, count: int, resumed: bool) -> None:
        pid, prompt = self._push[req]
        if start < prompt and count > 0:
            step[req] = (pid, list(self._push_blocks.get(req, [])), start,
                         min(start + count, prompt), prompt, resumed)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._hit.pop(request.request_id, None)
        params = request.kv_transfer_params
        if not params:
            return False, None
        if request.request_id in self._push_loads:
            self._push_loads.discard(request.request_id)
            if request.status.name not in _FINISHED_OK:   # aborted while waiting for its KV
                self._cancel.append(request.request_id)
            return False, None
        if params.get("do_remote_prefill") and "tf_engine" in params:
            self._release.append(params)   # finished (aborted) before it was scheduled
            params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        pushed = self._push.pop(request.request_id, None) is not None
        self._push_blocks.pop(request.request_id, None)
        if pushed and block_ids and request.status.name not in _FINISHED_OK:
            # writes of its layers may be in flight: free the blocks once they are over
            self._abort.append(request.request_id)
            self._hold[request.request_id] = round(time.time(), 3)
            return True, None
        if request.status.name not in _FINISHED_OK or not block_ids:
            return False, None
        local = self._local()
        expiry = round(time.time() + self.settings.hold_s, 3)
        blocks = [int(b) for b in block_ids]
        self._hold[request.request_id] = expiry
        grant = {"req": request.request_id, "blocks": blocks, "expiry": expiry,
                 "token": _tokens.grant(bytes.fromhex(local["key"]), request.request_id,
                                        blocks, expiry)}
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_request_id": request.request_id,
            "remote_block_ids": blocks,
            "remote_num_tokens": min(request.num_computed_tokens, request.num_prompt_tokens),
            "tf_engine": local["address"],
            "tf_grant": grant,
            "tf_layout": local["layout"],
        }
