"""Talk to a running `tensorfabric serve` with the official OpenAI client.

    tensorfabric serve --port 8000 &          # or: tensorfabric serve --config examples/serve.yaml
    python examples/serve_client.py http://127.0.0.1:8000/v1

Shows where each answer was produced (edge or cloud, why, degraded or not), that personal data
is replaced before it leaves the edge and put back in the reply, and streaming.
"""

from __future__ import annotations

import sys

from openai import OpenAI


def main(base_url: str) -> None:
    import os

    # the server's server.api_key, if it has one (required when it listens beyond loopback)
    client = OpenAI(base_url=base_url, api_key=os.environ.get("TENSORFABRIC_API_KEY", "unused"))
    print("models:", [m.id for m in client.models.list().data])

    for prompt in ["What is the capital of France?",
                   "Explain the significance of the Treaty of Westphalia."]:  # fmt: skip
        r = client.chat.completions.create(
            model="tensorfabric", messages=[{"role": "user", "content": prompt}], max_tokens=40
        )
        info = r.model_extra["tensorfabric"]
        print(f"\n> {prompt}\n[{info['tier']}, {info['reason']}, confidence "
              f"{info['confidence']:.2f}, degraded={info['degraded']}]\n{r.choices[0].message.content}")  # fmt: skip

    pii = "Please confirm my email jane.doe@example.com and card 4111 1111 1111 1111."
    r = client.chat.completions.create(
        model="tensorfabric-cloud", messages=[{"role": "user", "content": pii}], max_tokens=40
    )
    print(f"\n> {pii}\n[replaced before the cloud saw it: {r.model_extra['tensorfabric']['pii_replaced']}]")
    print(r.choices[0].message.content)

    print("\n> streaming: Write a haiku about the sea.")
    for chunk in client.chat.completions.create(
        model="tensorfabric", stream=True, max_tokens=40,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if getattr(chunk, "model_extra", None) and "tensorfabric" in chunk.model_extra:
            print(f"\n[{chunk.model_extra['tensorfabric']['tier']}]")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
