"""The command line's value parsers (typer ``parser=``): every value is checked while the
command line is parsed, so a bad one ends in a one-line usage error (exit code 2) before any
work starts. Each raises :class:`typer.BadParameter` with a message that says what to type."""

from __future__ import annotations

from collections.abc import Callable

import typer


def size(text: str) -> int:
    """A byte size: ``4096``, ``64k``, ``1m``, ``256MiB``, ``1.5g`` (powers of 1024)."""
    from tensorfabric.bench._stats import parse_size

    try:
        return parse_size(str(text))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of byte sizes: ``4k,64k,1m`` (at least one)."""
    if isinstance(text, tuple):  # already parsed (a default)
        return text
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise typer.BadParameter("give at least one size, e.g. 4k,64k,1m")
    return tuple(size(v) for v in items)


def positive_float(text: str) -> float:
    """A number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter(f"must be a positive number, not {text}")
    return value


def names(choices: tuple[str, ...], *, extra: tuple[str, ...] = ()
          ) -> Callable[[str], tuple[str, ...]]:
    """A parser for a comma-separated list of names from ``choices`` (plus ``extra`` words that
    must stand alone, such as ``all``)."""

    def parse(text: str) -> tuple[str, ...]:
        if isinstance(text, tuple):
            return text
        items = tuple(v.strip() for v in str(text).split(",") if v.strip())
        allowed = choices + extra
        bad = [v for v in items if v not in allowed]
        if bad or not items or (len(items) > 1 and set(items) & set(extra)):
            what = ", ".join(map(repr, bad)) if bad else repr(text)
            alone = f" (or {' or '.join(extra)} alone)" if extra else ""
            raise typer.BadParameter(f"{what}: use one or more of {', '.join(choices)}, comma "
                                     f"separated{alone}")
        return items

    return parse


def local_address(text: str) -> str:
    """An IP address of this machine (one a socket can bind to)."""
    import ipaddress
    import socket

    addr = str(text).strip()
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an IP address") from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((addr, 0))
    except OSError as exc:
        raise typer.BadParameter(f"{addr} is not an address of this machine ({exc.strerror})"
                                 ) from None
    return addr


def local_addresses(text: str) -> list[str]:
    """A comma-separated list of this machine's IP addresses (at least one)."""
    if isinstance(text, list):
        return text
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise typer.BadParameter("give at least one address, e.g. 10.0.0.1,10.0.1.1")
    return [local_address(v) for v in items]


def engine_address(text: str) -> str:
    """An engine address in hex, or ``@FILE`` holding one (as ``bench --listen`` prints it)."""
    value = str(text).strip()
    if value.startswith("@"):
        try:
            with open(value[1:]) as f:
                value = f.read().strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        bytes.fromhex(value)
    except ValueError:
        raise typer.BadParameter(f"{value[:40]!r} is not an engine address (the hex line "
                                 "`tensorfabric bench --listen` prints)") from None
    if not value:
        raise typer.BadParameter("empty engine address")
    return value
