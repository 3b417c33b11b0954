"""The ``tensorfabric`` command line.

Each subcommand group lives in its own private module with a ``register(app)`` function, so
workloads add commands without touching this file's logic. Heavy imports (torch, Ray, FastAPI)
happen inside the command functions, never at module import.
"""

from __future__ import annotations

import importlib
from typing import Any
import sys

# Modules providing subcommands, in the order they appear in --help.
_COMMAND_MODULES = (
    "_bench",  # tensorfabric bench
    "_generate",  # tensorfabric generate
    "_weights",  # tensorfabric plan-weights, publish
    "_serve",  # tensorfabric serve
    "_pool",  # tensorfabric pool ...
    "_models",  # tensorfabric models (the model cache)
    "_vllm",  # tensorfabric vllm-disagg ...
)


def build_app() -> Any:
    try:
        import typer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the tensorfabric command line needs typer and rich: pip install 'tensorfabric[cli]'"
        ) from exc
    app = typer.Typer(
        name="tensorfabric",
        help="Move tensors between processes and machines, and run LLM systems on top.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
    )
    @app.callback()
    def _root() -> None:
        """tensorfabric: move tensors between processes and machines, run LLM systems on top."""

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tensorfabric.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tensorfabric.cli.{name}":
                continue  # that workload is not in this build
            raise
        module.register(app)
    return app


def main() -> None:
    app = build_app()
    sys.exit(app())
