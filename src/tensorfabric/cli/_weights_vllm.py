"""``tensorfabric weights publish``: a stand-in trainer publishing to vLLM servers it starts."""

from __future__ import annotations

from typing import Any


def register(app: Any) -> None:
    import typer

    weights = typer.Typer(help="Weight updates into running vLLM servers.", no_args_is_help=True)
    app.add_typer(weights, name="weights")

    @weights.command("publish")
    def publish(
        replicas: int = typer.Option(2, "--replicas", min=1, help="vLLM servers to start and update."),
        steps: int = typer.Option(3, "--steps", min=1, help="Fake training steps (one update each)."),
        model: str = typer.Option(None, "--model", help="Model name or path (default: the default model)."),
        scale: float = typer.Option(0.05, "--scale", help="Step size: noise as a fraction of each tensor's std."),
        prompt: str = typer.Option("The capital of France is", "--prompt",
                                   help="Asked of every replica after each update."),
        kv_space: int = typer.Option(1, "--kv-space", min=1, help="GiB of KV cache per server."),
        log_dir: str = typer.Option(None, "--log-dir", help="Write each server's log here."),
        ray_address: str = typer.Option(None, "--ray-address",
                                        help="Start the servers as actors of this Ray cluster "
                                             "('auto' or the head's host:port)."),
    ) -> None:
        """Load the model as a trainer would, start N vLLM servers with tensorfabric's weight
        extension, and publish a deterministically perturbed copy after each fake step: the
        servers keep answering, switch between engine steps, and report the version in the
        x-tensorfabric-weights-version header. The secret is $TENSORFABRIC_SECRET (a random
        one if unset). With --ray-address each server is a Ray actor (one CPU of a node)."""
        from rich.console import Console

        from tensorfabric import TensorFabricError
        from tensorfabric.vllm._model import hf_folder
        from tensorfabric.vllm._weights_drill import publish_drill

        console = Console(stderr=True)
        try:
            folder = hf_folder(model)
            where = f" as actors of the Ray cluster at {ray_address}" if ray_address else ""
            console.print(f"starting {replicas} vLLM server(s) on {folder}{where} (about a "
                          "minute each on a small CPU)...")
            results = publish_drill(replicas, steps, folder=folder, scale=scale, prompt=prompt,
                                    kv_space_gib=kv_space, log_dir=log_dir,
                                    ray_address=ray_address, model=model,
                                    say=lambda s: print(s, flush=True))
        except (TensorFabricError, ImportError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        if not all(r.ok for r in results):
            raise typer.Exit(1)
