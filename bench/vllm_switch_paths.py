"""The switch of a vLLM weight update alone: how fast each way of putting staged tensors into a
running vLLM (CPU backend) model is, in one process, same run, alternating.

  - in-place: tensorfabric's switch (``_weights_ext._apply_in_place``): copy the live
    parameters, rebuild the packed oneDNN kernels of the linear layers from the staged tensors
    with each layer's ``process_weights_after_loading``, repack the tied LM head;
  - reload: vLLM's ``model_runner.reload_weights(weights_iterator=staged)`` (what the switch
    used before), plus the tied-head repack.

Both start from the same staged tensors (the default model perturbed once, in vLLM's layout)
and must give the same greedy answers (checked). One vLLM instance, in this process:

    python bench/vllm_switch_paths.py --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the worker runs in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _reload(self: Any, staged: dict[str, Any]) -> float:
    from tensorfabric.vllm._weights_ext import _repack_tied

    t0 = time.perf_counter()
    self.model_runner.reload_weights(weights_iterator=iter(staged.items()))
    _repack_tied(self.model_runner.get_model())
    return time.perf_counter() - t0


def _in_place(self: Any, staged: dict[str, Any]) -> float:
    from tensorfabric.vllm._weights_ext import _apply_in_place, _in_place_steps

    t0 = time.perf_counter()
    model = self.model_runner.get_model()
    steps = _in_place_steps(model, iter(staged.items()))
    assert steps is not None, "the staged tensors do not map 1:1 onto the model"
    _apply_in_place(model, steps)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import torch
    from vllm import LLM, SamplingParams

    from tensorfabric.vllm._model import hf_folder
    from tensorfabric.vllm._weights_fleet import vllm_plan
    from tensorfabric.vllm._weights_trainer import perturb, trainer_tensors

    folder = str(hf_folder())
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512)
    sp = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["The capital of France is", "def fibonacci(n):"]

    def answers() -> list[str]:
        return [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]

    v0 = answers()
    tensors = perturb(trainer_tensors(folder), 1)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def vllm_tensor(name: str) -> Any:
        for f, parts in fused.items():
            if f in name:
                return torch.cat([tensors[name.replace(f, q)] for q in parts])
        return tensors[name]

    staged = {s.name: vllm_tensor(s.name).contiguous() for s in vllm_plan(tensors).layout.specs}
    mb = sum(t.numel() * t.element_size() for t in staged.values()) / 1e6
    times: dict[str, list[float]] = {"reload": [], "in-place": []}
    got: dict[str, list[str]] = {}
    for _ in range(args.repeat):
        for name, fn in (("reload", _reload), ("in-place", _in_place)):
            times[name] += llm.collective_rpc(fn, args=(staged,))
            got[name] = answers()
    assert got["reload"] == got["in-place"] != v0, got
    for t in staged.values():   # the model must hold its own copy, not point into staging
        t.mul_(0.5)
    assert answers() == got["in-place"], "the model changed with the staging region"
    load = os.getloadavg()
    print(f"# vLLM switch paths, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"load {load[0]:.1f}, {mb:.0f} MB of vLLM parameters, {args.repeat} rounds alternating")
    print("| path | best s | median s | all s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"| {name} | {ts[0]:.3f} | {ts[len(ts) // 2]:.3f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    print(f"reload / in-place (best): {min(times['reload']) / min(times['in-place']):.2f}x")


if __name__ == "__main__":
    main()
