"""Publish new weights of the default model (SmolLM2-135M) to two replica processes.

The trainer (this process) converts fp32 -> bf16 while sending; the replicas
(``python -m tensorfabric.weights.replica``) bind a model to their receive slots, serve the old
version until the new one is verified, and swap atomically. Run from a checkout:

    PYTHONPATH=src python examples/weights_update.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import tensorfabric as tf
from tensorfabric.models import load_model
from tensorfabric.weights import Publisher, WeightPlan, model_tensors, same_layout, specs_of

SECRET = os.environ.setdefault("TENSORFABRIC_SECRET", "example-secret")
PROMPT = [1, 504, 3458, 314, 253, 3575, 30]


def ask(proc: subprocess.Popen[str], **cmd: object) -> dict[str, object]:
    assert proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    lm = load_model()
    weights = model_tensors(lm.model)
    src = specs_of(weights)
    plan = WeightPlan(src, same_layout(src, dtype="bfloat16"))
    tmp = Path(tempfile.mkdtemp())
    lm.config.save_pretrained(tmp / "config")
    (tmp / "layout.json").write_text(json.dumps(plan.layout.to_json()))
    with tf.Engine(secret=SECRET, name="trainer") as eng, Publisher(eng, plan, fanout="chain") as pub:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        replicas = [subprocess.Popen(
            [sys.executable, "-m", "tensorfabric.weights.replica", "--name", f"replica-{i}",
             "--publisher", eng.address.hex(), "--layout", str(tmp / "layout.json"),
             "--model-config", str(tmp / "config"), "--dtype", "bfloat16"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for i in range(2)]
        try:
            for r in replicas:
                assert r.stdout and json.loads(r.stdout.readline())["ready"]
            pub.wait_replicas(2, timeout=120)
            for step in range(1, 4):
                if step > 1:  # a stand-in for a training step: nudge every matrix
                    with torch.no_grad():
                        for t in weights.values():
                            if t.ndim == 2:
                                t.mul_(1.01)
                result = pub.publish(weights)
                print(f"version {result.version}: {plan.nbytes / 1e6:.0f} MB to {result.updated} "
                      f"in {result.seconds:.3f} s; failed: {result.failed or 'none'}")
                for r in replicas:
                    out = tmp / "logits.npy"
                    reply = ask(r, cmd="logits", ids=PROMPT, out=str(out))
                    top = int(np.load(out)[0, -1].argmax())
                    print(f"  replica serves version {reply['version']}, next token {top!r}: "
                          f"{lm.tokenizer.decode([top])!r}")
        finally:
            for r in replicas:
                if r.stdin:
                    r.stdin.close()
                r.wait(timeout=30)


if __name__ == "__main__":
    main()
