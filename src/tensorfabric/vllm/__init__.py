"""vLLM integration: a KV connector that moves prefill instances' KV blocks to decode
instances over tensorfabric, and a proxy that makes them one OpenAI endpoint.

    # prefill and decode instances load the connector:
    --kv-transfer-config "$(python -c 'import json, tensorfabric.vllm as v; \
        print(json.dumps(v.kv_transfer_config("prefill", secret="s3cret")))')"

    tensorfabric vllm-disagg --prefill 1 --decode 1     # or start both and a proxy for you

Needs the ``vllm`` extra (``pip install 'tensorfabric[vllm]'``); ``vllm`` itself is imported
only when the connector class is used (``TensorFabricConnector``).
"""

from __future__ import annotations

from typing import Any

from ._cluster import DisaggCluster
from ._launch import VllmServer, VllmStartError, free_port
from ._layout import KVLayout, LayoutMismatchError
from ._model import hf_folder
from ._proxy import DisaggProxy
from ._settings import CONNECTOR_MODULE, CONNECTOR_NAME, ConnectorSettings, kv_transfer_config

__all__ = [
    # the connector vLLM loads
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "ConnectorSettings",
    "TensorFabricConnector",
    "kv_transfer_config",
    # running instances
    "DisaggCluster",
    "DisaggProxy",
    "VllmServer",
    "free_port",
    "hf_folder",
    # errors and layouts
    "KVLayout",
    "LayoutMismatchError",
    "VllmStartError",
]


def __getattr__(name: str) -> Any:
    if name in ("TensorFabricConnector", "TFConnectorMetadata", "TFHandshake"):
        try:
            from . import _connector
        except ImportError as exc:
            raise ImportError(f"tensorfabric.vllm.{name} needs vLLM: pip install "
                              f"'tensorfabric[vllm]' ({exc})") from exc
        return getattr(_connector, name)
    raise AttributeError(f"module 'tensorfabric.vllm' has no attribute {name!r}")
