"""A trainer process for the vLLM weight tests: joins the given vLLM servers, then publishes
one update whose last chunk is never written (so it stays mid-update until it is killed).

    python vllm_weights_publisher.py FOLDER '{"a": URL, ...}' STEP     (secret: $TENSORFABRIC_SECRET)

Prints "joined" once every server follows it and "writing" when the update has started.
"""

from __future__ import annotations

import json
import os
import sys

import tensorfabric as tf
from tensorfabric.vllm._weights_fleet import VllmWeights, vllm_plan
from tensorfabric.vllm._weights_trainer import perturb, trainer_tensors
from tensorfabric.weights import Faults


def main() -> None:
    folder, urls, step = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    secret = os.environ["TENSORFABRIC_SECRET"]
    tensors = perturb(trainer_tensors(folder), step)
    plan = vllm_plan(tensors)
    with tf.Engine(secret=secret) as eng:
        fleet = VllmWeights(eng, plan, urls, secret=secret, timeout=600)
        fleet.join_all(timeout=120)
        print("joined", fleet.publisher.version, flush=True)
        fleet.publisher.faults = Faults(drop={len(plan.chunks) - 1})
        print("writing", flush=True)
        fleet.publish(tensors)  # waits for the missing chunk until killed
        print("returned", flush=True)


if __name__ == "__main__":
    main()
