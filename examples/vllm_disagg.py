"""Disaggregated prefill/decode with vLLM: one prefill and one decode instance joined by the
tensorfabric KV connector, one OpenAI endpoint in front, compared with the decode instance
answering alone.

    PYTHONPATH=src python examples/vllm_disagg.py     # needs the vllm extra; ~1-2 min to start
"""

from __future__ import annotations

import json
import urllib.request

from tensorfabric.vllm import DisaggCluster


def complete(url: str, prompt: str) -> list[int]:
    body = {"model": "default", "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())["choices"][0]
    print(repr(out["text"]))
    return list(out["token_ids"])


if __name__ == "__main__":
    with DisaggCluster(prefill=1, decode=1, kv_space_gib=1) as cluster:
        print("endpoint:", cluster.url)
        disagg = complete(cluster.url, "The three laws of robotics are")        # prefill -> decode
        single = complete(cluster.decode[0].url, "The three laws of robotics are")  # one instance
        print("same tokens:", disagg == single)
