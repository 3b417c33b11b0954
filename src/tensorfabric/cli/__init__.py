"""The ``tensorfabric`` command line.

Each subcommand group lives in its own private module with a ``register(app)`` function, so
workloads add commands without touching this file's logic. Heavy imports (torch, Ray, FastAPI)
happen inside the command functions, never at module import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

# Modules providing subcommands, in the order they appear in --help.
_COMMAND_MODULES = (
    "_bench",  # tensorfabric bench
    "_generate",  # tensorfabric generate
    "_weights",  # tensorfabric plan-weights, publish
    "_serve",  # tensorfabric serve
    "_pool",  # tensorfabric pool ...
    "_models",  # tensorfabric models (the model cache)
    "_vllm",  # tensorfabric vllm-disagg ...
    "_weights_vllm",  # tensorfabric weights publish (into vLLM servers)
)


def _version(value: bool) -> None:
    if value:
        import typer

        from tensorfabric import __version__

        typer.echo(f"tensorfabric {__version__}")
        raise typer.Exit()


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
        rich_markup_mode=None,  # plain help: wrapped to the terminal, never cut
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
    ) -> None:
        """Move tensors between processes and machines, and run LLM systems on top."""

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tensorfabric.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tensorfabric.cli.{name}":
                continue  # that workload is not in this build
            raise
        module.register(app)
    return app


def build_command() -> Any:
    """The click command tree of :func:`build_app`, with plain help everywhere (sub-apps
    included) and usage lines that name arguments the usual way (``PROMPT``, not ``{prompt}``)."""
    import typer.main

    command = typer.main.get_command(build_app())
    _tidy(command)
    return command


def _tidy(command: Any) -> None:
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    pieces = command.collect_usage_pieces

    def collect_usage_pieces(ctx: Any) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces(ctx)]

    command.collect_usage_pieces = collect_usage_pieces
    for sub in getattr(command, "commands", {}).values():
        if not sub.short_help and sub.help:  # the whole first sentence, not cut at 45 chars
            first = " ".join(sub.help.strip().split("\n\n")[0].split())
            sub.short_help = first.split(". ")[0].rstrip(".")
        _tidy(sub)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status. A bad flag or value is a one-line error
    (status 2), as is a missing optional dependency; an error of ours (a bad config, an
    unreachable peer) is a one-line error with status 1. Bugs keep their traceback."""
    from tensorfabric._errors import TensorFabricError

    args = list(sys.argv[1:] if argv is None else argv)
    prog = "tensorfabric"
    try:
        command = build_command()
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
    except ImportError as exc:
        return _fail(prog, args, f"{exc}", 2)
    except TensorFabricError as exc:
        return _fail(prog, args, f"{type(exc).__name__}: {exc}", 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if code is None or not hasattr(exc, "format_message"):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            return int(code)
        where = ctx.command_path if ctx is not None else prog
        message = " ".join(exc.format_message().split())
        print(f"{where}: error: {message} (see {where} --help)", file=sys.stderr)
        return int(code)
    return result if isinstance(result, int) else 0


def _fail(prog: str, args: list[str], message: str, code: int) -> int:
    words = [a for a in args[:2] if not a.startswith("-")]
    where = " ".join([prog, *words[:1]])
    print(f"{where}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main() -> None:
    sys.exit(run())
