"""``tensorfabric serve``: the edge/cloud deployment behind an OpenAI-compatible API."""

from __future__ import annotations

from typing import Any


def register(app: Any) -> None:
    import typer

    @app.command("serve")
    def serve(
        config: str = typer.Option(None, "--config", "-c", help="YAML deployment config (docs/serve.md)."),
        role: str = typer.Option("all", "--role", help="all (edge + local cloud process), edge, or cloud."),
        port: int = typer.Option(None, "--port", help="HTTP port (overrides server.port)."),
    ) -> None:
        """Serve chat completions: edge model here, cloud tier in its own process.

        With no arguments: the default model, int8-quantized at the edge and full in a local
        cloud process, PII scrubbing on, confidence routing; prints the URL.
        """
        from rich.console import Console

        from tensorfabric.serve import launch
        from tensorfabric.split import SplitConfigError, load_config

        console = Console(stderr=True)
        try:
            cfg = load_config(config)
            if port is not None:
                cfg.server.port = port
            if role == "cloud":
                from tensorfabric.split._cloud import run_cloud

                run_cloud(cfg, announce=lambda s: print(s, flush=True))
                return
            if role == "edge" and cfg.cloud.launch == "local":
                raise SplitConfigError("--role edge needs cloud.launch: remote and cloud.address in the config")
            if role not in ("all", "edge"):
                raise SplitConfigError(f"--role must be all, edge or cloud, got {role!r}")
            launch(cfg, announce=lambda s: print(s, flush=True))
        except SplitConfigError as exc:
            console.print(f"[red]config error:[/red] {exc}")
            raise typer.Exit(2) from None
