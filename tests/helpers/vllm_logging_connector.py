"""A KV connector that only logs what vLLM calls (a test helper, not shipped).

Load it into vLLM with ``kv_connector_module_path="vllm_logging_connector"`` (this folder on
PYTHONPATH) and ``kv_connector_extra_config={"log": PATH}``: every call is appended to PATH as
one JSON line (method, pid, role, and the shapes vLLM passes), so a test can check the call
sequence and the KV cache layout our connector relies on.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)


class LoggingMetadata(KVConnectorMetadata):
    def __init__(self, reqs: list[str]) -> None:
        self.reqs = reqs


class LoggingConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._path = extra["log"]
        self._new: list[str] = []
        self._log("init", role=role.name,
                  block_size=vllm_config.cache_config.block_size)

    def _log(self, method: str, **fields: Any) -> None:
        rec = {"method": method, "pid": os.getpid(), **fields}
        with open(self._path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        tensors = list(kv_caches.values())
        base = min(t.untyped_storage().data_ptr() for t in tensors)
        self._log("register_kv_caches", layers=list(kv_caches),
                  shapes=[list(t.shape) for t in tensors], dtype=str(tensors[0].dtype),
                  contiguous=all(t.is_contiguous() for t in tensors),
                  offsets=[t.data_ptr() - base for t in tensors],
                  storages=len({t.untyped_storage().data_ptr() for t in tensors}),
                  storage_nbytes=tensors[0].untyped_storage().nbytes())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._log("start_load_kv")

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._log("wait_for_layer_load", layer=layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        self._log("save_kv_layer", layer=layer_name, shape=list(kv_layer.shape))

    def wait_for_save(self) -> None:
        self._log("wait_for_save")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, None]:
        if finished_req_ids:
            self._log("get_finished", finished=sorted(finished_req_ids))
        return None, None

    # scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self._log("get_num_new_matched_tokens", req=request.request_id,
                  prompt=len(request.prompt_token_ids or []), computed=num_computed_tokens,
                  params=request.kv_transfer_params)
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._log("update_state_after_alloc", req=request.request_id,
                  blocks=[list(g) for g in blocks.get_block_ids()],
                  external=num_external_tokens)
        self._new.append(request.request_id)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = LoggingMetadata(self._new)
        if self._new:
            self._log("build_connector_meta", reqs=self._new)
        self._new = []
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._log("request_finished", req=request.request_id, blocks=list(block_ids),
                  computed=request.num_computed_tokens, status=str(request.status))
        return False, {"logged": True}
