"""``tensorfabric vllm-disagg``: prefill and decode vLLM instances behind one OpenAI endpoint."""

from __future__ import annotations

from typing import Any


def register(app: Any) -> None:
    import typer

    @app.command("vllm-disagg")
    def vllm_disagg(
        model: str = typer.Option(None, "--model", help="Model name or path (default: the default model)."),
        prefill: int = typer.Option(1, "--prefill", help="Prefill instances."),
        decode: int = typer.Option(1, "--decode", help="Decode instances."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address the proxy and the engines listen on."),
        port: int = typer.Option(8000, "--port", help="Proxy port (0: any free port)."),
        kv_space: int = typer.Option(2, "--kv-space", help="GiB of KV cache per instance (VLLM_CPU_KVCACHE_SPACE)."),
        block_size: int = typer.Option(None, "--block-size", help="vLLM --block-size for every instance."),
        timeout: float = typer.Option(30.0, "--timeout", help="Seconds a KV transfer may take before decode recomputes."),
        log_dir: str = typer.Option(None, "--log-dir", help="Write each instance's log here."),
        ray_address: str = typer.Option(None, "--ray-address", help="Start the instances as Ray actors on this Ray cluster ('auto' or host:port)."),
        proxy_mode: str = typer.Option("push", "--proxy-mode", help="push: prefill writes each layer's KV during the prefill; pull: decode takes it after."),
        api_key: str = typer.Option(None, "--api-key", help="Clients must send 'Authorization: Bearer KEY' (default: $VLLM_API_KEY; none: open)."),
    ) -> None:
        """Start N prefill and M decode vLLM instances on this machine, joined by the
        tensorfabric KV connector, and a proxy; print the URL and serve until Ctrl-C."""
        import signal
        import threading

        from rich.console import Console

        from tensorfabric import TensorFabricError
        from tensorfabric.vllm._cluster import DisaggCluster

        console = Console(stderr=True)
        try:
            cluster = DisaggCluster(model, prefill=prefill, decode=decode, host=host, port=port,
                                    kv_space_gib=kv_space, block_size=block_size,
                                    connector={"timeout": timeout}, log_dir=log_dir,
                                    ray_address=ray_address, proxy_mode=proxy_mode,
                                    api_key=api_key)
            where = f" on the Ray cluster at {ray_address}" if ray_address else ""
            console.print(f"starting {prefill} prefill + {decode} decode vLLM instances{where} "
                          "(about a minute each on a small CPU)...")
            cluster.start()
        except (TensorFabricError, ImportError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        print(cluster.url, flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        try:
            while not stop.wait(1.0):
                dead = [s.url for s in cluster.prefill + cluster.decode if not s.alive]
                if dead:
                    console.print(f"[red]vLLM instance(s) exited:[/red] {', '.join(dead)}")
                    raise typer.Exit(1)
        except KeyboardInterrupt:
            pass
        finally:
            cluster.close()
