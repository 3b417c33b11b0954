"""SIGTERM as Ctrl-C for the serve and cloud processes."""

from __future__ import annotations

import signal


def _interrupt_once(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def sigterm_interrupts_once() -> None:
    """Make the first SIGTERM raise KeyboardInterrupt in the main thread and ignore the rest: a
    group-wide SIGTERM and a parent's own stop of the child arrive together, and a second
    KeyboardInterrupt would cut the closing short (vLLM servers left running)."""
    signal.signal(signal.SIGTERM, _interrupt_once)
