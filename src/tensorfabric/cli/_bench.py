"""``tensorfabric bench``: sweep the engine's ops against baselines measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from . import _types

_TRANSPORTS = ("tcp", "shm", "nixl", "tcp-plain", "tcp-tls", "netns")  # netns: --moe only
_OPS = ("write", "pages", "read", "imm", "sendrecv")  # bench._runner.ALL_OPS (kept import-free)


def load_config(path: Path) -> dict[str, Any]:
    """Bench options from a JSON, TOML or YAML file (by extension).

    The file may be an engine config (``Engine.from_config``: ``links`` is the list of local
    link addresses) with an optional ``[bench]`` table for bench options; keys: ``transport``,
    ``links``, ``link_addrs``, ``peer_link_addrs``, ``sizes``, ``page_sizes``, ``ops``,
    ``host``, ``chunk``. Command-line options override the file.
    """
    from tensorfabric._config import read_config_file

    data = read_config_file(path)
    opts = dict(data.get("bench", {}))
    links = data.get("links")
    if isinstance(links, list):
        opts.setdefault("link_addrs", links)
    elif isinstance(links, int):
        opts.setdefault("links", links)
    for key in ("transport", "link_addrs", "peer_link_addrs", "sizes", "page_sizes", "ops",
                "host", "chunk"):
        if key in data and key not in opts:
            opts[key] = data[key]
    return opts


def _checked(opts: dict[str, Any], path: Path) -> dict[str, Any]:
    """The config file's bench options parsed by the same rules as the command line's."""
    parsers: dict[str, Any] = {
        "transport": _types.names(_TRANSPORTS, extra=("all",)), "sizes": _types.sizes,
        "page_sizes": _types.sizes, "ops": _types.names(_OPS), "chunk": _types.size,
        "links": _positive_int, "budget": _types.positive_float, "pin": str,
        "link_addrs": _types.local_addresses, "peer_link_addrs": _types.local_addresses,
        "host": _types.local_address}
    out = dict(opts)
    for key, parse in parsers.items():
        if key not in opts:
            continue
        value = opts[key]
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        try:
            out[key] = parse(text)
        except typer.BadParameter as exc:
            raise typer.BadParameter(f"{key} in {path}: {exc.message}",
                                     param_hint="'--config'") from None
    if "budget" in out:
        out["budget_s"] = out.pop("budget")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a whole number") from None
    if value < 1:
        raise typer.BadParameter(f"must be at least 1, not {value}")
    return value


def bench(
    transport: Optional[Any] = typer.Option(
        None, parser=_types.names(_TRANSPORTS, extra=("all",)), metavar="NAMES",
        help="tcp, shm, nixl (comma separated) or all (tcp and shm, nixl if installed); "
             "tcp-plain and tcp-tls (see --integrity); netns with --moe."),
    links: Optional[int] = typer.Option(None, min=1, max=64, help="tcp links per peer (default 1)."),
    link_addrs: Optional[Any] = typer.Option(
        None, parser=_types.local_addresses, metavar="ADDRS",
        help="This side's local link addresses, comma separated (one per NIC; sets --links)."),
    peer_link_addrs: Optional[Any] = typer.Option(
        None, parser=_types.local_addresses, metavar="ADDRS",
        help="The spawned local peer's link addresses (one per NIC)."),
    config: Optional[Path] = typer.Option(None, exists=True, help="JSON/TOML/YAML file with these options."),
    sizes: Optional[Any] = typer.Option(
        None, parser=_types.sizes, metavar="SIZES",
        help="Write/read sizes, e.g. 4k,64k,1m,64m,256m (k, m, g: powers of 1024)."),
    page_sizes: Optional[Any] = typer.Option(
        None, parser=_types.sizes, metavar="SIZES",
        help="Page sizes for paged writes, e.g. 1k,4k,16k,64k."),
    ops: Optional[Any] = typer.Option(
        None, parser=_types.names(_OPS), metavar="OPS",
        help="Comma list of write, pages, read, imm, sendrecv."),
    host: Optional[str] = typer.Option(None, parser=_types.local_address, metavar="ADDR",
                                       help="Address the engines listen on (default 127.0.0.1)."),
    listen: Optional[str] = typer.Option(
        None, parser=_types.local_address, metavar="ADDR",
        help="Run only the peer side on this address and print its engine address."),
    port: int = typer.Option(0, min=0, max=65535, help="Port for --listen (0: any)."),
    connect: Optional[str] = typer.Option(
        None, parser=_types.engine_address, metavar="ADDRESS|@FILE",
        help="Drive a peer started with --listen: its address (hex) or @FILE holding it."),
    budget: Optional[float] = typer.Option(None, parser=_types.positive_float, metavar="SECONDS",
                                           help="Seconds spent per measured point."),
    chunk: Optional[int] = typer.Option(
        None, parser=_types.size, metavar="SIZE",
        help="The engines' tcp chunk size (e.g. 4m); the raw baseline uses the same."),
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and shorter points (about 15 s)."),
    pin: Optional[str] = typer.Option(
        None, help="CPU placement: 'same' (every process on one CPU) or 'split' (peers on another "
                   "CPU); latency ratios hold only under one placement for engine and baseline."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here."),
    plot: Optional[Path] = typer.Option(None, help="Draw throughput vs size to this PNG (needs matplotlib)."),
    no_baselines: bool = typer.Option(False, "--no-baselines",
                                      help="Skip the baselines (ratios left empty)."),
    moe: bool = typer.Option(False, "--moe", help="MoE dispatch/combine latency against gloo "
                                                   "all_to_all and a raw-socket all-to-all (see docs/moe.md)."),
    moe_points: Optional[str] = typer.Option(
        None, "--moe-points",
        help="With --moe: EPxTOKENSxHIDDENxEXPERTS[xTOPK] list, e.g. 2x128x2048x64,4x4096x7168x256."),
    integrity: bool = typer.Option(
        False, "--integrity",
        help="Measure the cost of link integrity: tcp-plain (frame MACs off), tcp (MACs on, "
             "the default) and tcp-tls, with each as a ratio to tcp-plain from the same run."),
) -> None:
    """Measure write, paged write, read, immediate and send/recv between two engines.

    By default two local engines run in two processes; every figure is a ratio to a baseline
    measured in the same run (raw socket for tcp, memcpy for shm, raw ping-pong for latency).
    """
    if moe:
        from tensorfabric.bench._moe import moe_command

        try:
            moe_command(moe_points, ",".join(transport) if transport else None, quick=quick,
                        json_out=json_out,
                        baselines=not no_baselines, echo=typer.echo)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        return
    from tensorfabric.bench import BenchConfig, format_table, plot_rows, run_bench

    file_opts = _checked(load_config(config), config) if config else {}
    def pick(cli: Any, key: str, default: Any) -> Any:
        return cli if cli is not None else file_opts.get(key, default)

    addrs = list(link_addrs or file_opts.get("link_addrs", []))
    peer_addrs = list(peer_link_addrs or file_opts.get("peer_link_addrs", []))
    nlinks = int(pick(links, "links", len(addrs) or 1))
    host_v = pick(host, "host", addrs[0] if addrs and not listen else "127.0.0.1")

    kind: tuple[str, ...] = pick(transport, "transport", ("all",))
    if "netns" in kind:
        raise typer.BadParameter("'netns' (ranks on emulated hosts) is a transport of --moe only",
                                 param_hint="'--transport'")
    if integrity:
        kind = ("tcp-plain", "tcp", "tcp-tls")
    if listen:
        _serve_listen(listen, port, "tcp" if kind == ("all",) else kind[0], nlinks, addrs)
        return
    if kind == ("all",):  # across hosts only tcp (and nixl, when asked for) can reach the peer
        transports: tuple[str, ...] = ("tcp",) if connect else ("tcp", "shm", "nixl")
    else:
        transports = kind
    kw: dict[str, Any] = dict(transports=transports, links=nlinks, link_addrs=addrs,
                              peer_link_addrs=peer_addrs, host=host_v,
                              baselines=not no_baselines)
    for key, cli in (("sizes", sizes), ("page_sizes", page_sizes), ("ops", ops)):
        vals = pick(cli, key, None)
        if vals:
            kw[key] = tuple(vals)
    budget_v = pick(budget, "budget_s", None)
    if budget_v is not None:
        kw["budget_s"] = budget_v
    pin_v = pick(pin, "pin", None)
    if pin_v is not None:
        from tensorfabric.bench._baselines import pin_cpus

        try:  # also: split needs two CPUs, pinning needs Linux
            pin_cpus(pin_v)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        kw["pin"] = pin_v
    chunk_v = pick(chunk, "chunk", None)
    if chunk_v:
        kw["chunk_bytes"] = chunk_v
    if connect:
        kw["connect"] = connect
    cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    report = _run_with_progress(cfg, run_bench)
    _print(report, format_table)
    if integrity:
        from tensorfabric.bench import integrity_table

        typer.echo("\ncost of integrity: ratio to tcp-plain (frame MACs off) at the same size, "
                   "same run (each variant's ratio to its raw baseline over tcp-plain's)")
        typer.echo(integrity_table(report.rows))
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=1))
        typer.echo(f"wrote {json_out}")
    if plot:
        plot_rows(report.rows, plot)
        typer.echo(f"wrote {plot}")


def _run_with_progress(cfg: Any, run: Any) -> Any:
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return run(cfg, lambda d: typer.echo(d, err=True))
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("starting engines", total=cfg.steps())
        return run(cfg, lambda d: bar.update(task, advance=1, description=d))


def _print(report: Any, format_table: Any) -> None:
    typer.echo(format_table(report.rows))
    load = report.meta.get("loadavg")
    if load:
        typer.echo(f"load average {load[0]:.1f} on {report.meta.get('cpus')} cpus "
                   "(ratios: median of engine/baseline pairs measured in alternation)")
    for mem in report.memory:
        if mem["size"] == max(m["size"] for m in report.memory):
            typer.echo(f"engine memory ({mem['transport']} write {mem['size'] >> 20} MiB): "
                       f"peer peak +{mem['peer_peak_growth'] / 2**20:.1f} MiB, "
                       f"local peak +{mem['local_peak_growth'] / 2**20:.1f} MiB over resident")
    for name, why in report.skipped.items():
        typer.echo(f"{name}: skipped ({why})")


def _serve_listen(host: str, port: int, transport: str, links: int, addrs: list[str]) -> None:
    from tensorfabric.bench._peer import main as peer_main

    argv = ["--host", host, "--port", str(port), "--transport", transport,
            "--links", str(links), "--link-addrs", ",".join(addrs)]
    peer_main(argv)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
