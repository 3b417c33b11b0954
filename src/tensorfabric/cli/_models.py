"""``tensorfabric models``: list and prune the cache of converted models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

_CACHE_DIR_HELP = ("The cache directory (default: $TENSORFABRIC_CACHE_DIR/models or "
                   "~/.cache/tensorfabric/models).")


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return str(nbytes)  # pragma: no cover


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _age(created: float | None) -> str:
    if created is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(created))


def _cache_dir(cache_dir: Optional[Path], ctx: Any = None) -> Path:
    """This command's --cache-dir, else the group's (``models --cache-dir X prune``), else the
    default."""
    from tensorfabric.models import default_cache_dir

    group = getattr(ctx, "obj", None) if ctx is not None else None
    chosen = cache_dir if cache_dir is not None else group
    return Path(chosen) if chosen is not None else default_cache_dir()


def list_models(
    ctx: typer.Context,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP,
                                             file_okay=False, metavar="DIR"),
) -> None:
    """List the converted models in the cache: size, source file, state."""
    from tensorfabric.models import list_cache

    root = _cache_dir(cache_dir, ctx)
    entries = list_cache(root)
    if not entries:
        typer.echo(f"no converted models in {root}")
        return
    typer.echo(f"converted models in {root}:")
    for e in entries:
        state = "stale: prune removes it" if e.stale else "current"
        took = f" in {e.convert_seconds:.0f} s" if e.convert_seconds is not None else ""
        typer.echo(f"  {e.name}  {_human(e.size_bytes)}  {state}")
        typer.echo(f"      from {e.source or '(unknown: written by an older tensorfabric)'}"
                   f"{f' ({e.dtype})' if e.dtype else ''}, converted {_age(e.created)}{took}")
    total = sum(e.size_bytes for e in entries)
    stale = [e for e in entries if e.stale]
    typer.echo(f"{_count(len(entries))}, {_human(total)}"
               + (f"; {len(stale)} stale ({_human(sum(e.size_bytes for e in stale))}): "
                  "`tensorfabric models prune` removes them" if stale else ""))


def prune_models(
    ctx: typer.Context,
    everything: bool = typer.Option(False, "--all", help="Remove every entry, not only stale ones."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go, remove nothing."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP,
                                             file_okay=False, metavar="DIR"),
) -> None:
    """Remove stale cache entries (their source changed or is gone, or an older format), or
    all of them with --all. Entries being converted right now are kept."""
    from tensorfabric.models import list_cache, prune_cache

    root = _cache_dir(cache_dir, ctx)
    if dry_run:
        doomed: list[Any] = [e for e in list_cache(root) if everything or e.stale]
    else:
        doomed = prune_cache(root, everything=everything)
    verb = "would remove" if dry_run else "removed"
    for e in doomed:
        typer.echo(f"{verb} {e.path} ({_human(e.size_bytes)})")
    typer.echo(f"{verb} {_count(len(doomed))}, {_human(sum(e.size_bytes for e in doomed))}"
               if doomed else f"nothing to remove in {root}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The cache of converted models: list it, prune it.",
                        no_args_is_help=False, invoke_without_command=True)

    @group.callback(invoke_without_command=True)
    def _default(
        ctx: typer.Context,
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP,
                                                 file_okay=False, metavar="DIR"),
    ) -> None:
        """The cache of converted models (GGUF files dequantized once): list it, prune it.

        With no subcommand, lists it."""
        ctx.obj = cache_dir
        if ctx.invoked_subcommand is None:
            list_models(ctx, None)

    group.command("list")(list_models)
    group.command("prune")(prune_models)
    app.add_typer(group, name="models")
