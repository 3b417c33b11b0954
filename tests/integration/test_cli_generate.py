"""``tensorfabric generate`` as a user runs it: the answer streams to stdout as tokens come (in
both modes), progress lines go to stderr while the model loads and the prefill runs, and
``--quiet`` leaves only the answer."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import subprocess_env  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "What is the capital of France?"


def _run(*args: str) -> tuple[int, list[tuple[str, bytes]], bytes, bytes]:
    """Run the CLI; every read from its stdout and stderr, in the order they arrived."""
    proc = subprocess.Popen([sys.executable, "-m", "tensorfabric", "generate", PROMPT, *args],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    events: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + 500
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=5):
            data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if data:
                events.append((key.data, data))
            else:
                sel.unregister(key.fileobj)
    code = proc.wait(timeout=60)
    out = b"".join(d for k, d in events if k == "out")
    err = b"".join(d for k, d in events if k == "err")
    return code, events, out, err


def test_generate_streams_with_progress_lines() -> None:
    code, events, out, err = _run("-n", "16")
    assert code == 0, err.decode()[-3000:]
    text = err.decode()
    assert "tensorfabric: loading the model" in text and "tensorfabric: prefill:" in text
    assert "Paris" in out.decode()
    chunks = [d for k, d in events if k == "out"]
    assert len(chunks) >= 2, f"the answer came in one piece: {chunks}"
    # the prefill line came before the first piece of the answer, the statistics after the last
    kinds = [(k, d) for k, d in events]
    first_out = next(i for i, (k, _) in enumerate(kinds) if k == "out")
    before = b"".join(d for k, d in kinds[:first_out] if k == "err").decode()
    assert "prefill:" in before
    assert "generated, TTFT" in text


def test_generate_disaggregated_quiet_streams_only_the_answer() -> None:
    code, events, out, err = _run("-n", "16", "--disaggregated", "--quiet")
    assert code == 0, err.decode()[-3000:]
    assert "Paris" in out.decode() and out.decode().count("\n") == 1
    assert "tensorfabric:" not in err.decode() and "handoff" not in err.decode()
    assert len([d for k, d in events if k == "out"]) >= 2, "the answer came in one piece"
