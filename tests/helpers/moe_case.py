"""Inputs, expert MLPs and a single-process reference MoE layer for the MoE tests.

Every rank process and the test itself build the same inputs from the same seeds, so the test
can check each rank's combined output against the reference layer run over all ranks' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORLD, EXPERTS, HIDDEN, FFN, TOPK, MAX_TOKENS = 3, 12, 32, 24, 3, 48
SCENARIOS = ("random", "one_expert", "one_rank", "empty_experts", "masked", "single_token",
             "random")


@dataclass
class StepInput:
    tokens: np.ndarray   # [T, H] float32
    ids: np.ndarray      # [T, K] int64, -1: no expert
    weights: np.ndarray  # [T, K] float32


def step_input(scenario: str, step: int, rank: int, world: int = WORLD,
               experts: int = EXPERTS) -> StepInput:
    """The tokens and routing of ``rank`` for step ``step``, scenario ``scenario``."""
    rng = np.random.default_rng([step, rank, 7])
    T = {"single_token": 1}.get(scenario, MAX_TOKENS - 9 * rank)
    if scenario == "single_token" and rank == 0:
        T = 0  # one rank with nothing to send at all
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    w = rng.random((T, TOPK)).astype(np.float32)
    ids = np.stack([rng.choice(experts, TOPK, replace=False) for _ in range(T)]) \
        if T else np.zeros((0, TOPK), np.int64)
    if scenario == "one_expert":  # every token to expert 5 only
        ids[:, 0], ids[:, 1:] = 5, -1
    elif scenario == "one_rank":  # every slot on the last rank's experts
        local = experts // world
        ids = np.stack([rng.choice(local, TOPK, replace=False) for _ in range(T)]) \
            + (world - 1) * local if T else ids
    elif scenario == "empty_experts":  # only experts 0, 1 and 7: the rest, and rank 2, idle
        ids = np.stack([rng.permutation([0, 1, 7])[:TOPK] for _ in range(T)]) if T else ids
    elif scenario == "masked":
        ids[rng.random(ids.shape) < 0.4] = -1
    return StepInput(x, ids.astype(np.int64), w)


def expert_weights(e: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([e, 99])
    return (rng.standard_normal((HIDDEN, FFN)).astype(np.float32) / 4,
            rng.standard_normal((FFN, HIDDEN)).astype(np.float32) / 4)


def expert_mlp(e: int, x: np.ndarray) -> np.ndarray:
    w1, w2 = expert_weights(e)
    return np.maximum(x @ w1, 0) @ w2


def reference(inputs: list[StepInput], experts: int = EXPERTS) -> list[np.ndarray]:
    """The MoE layer in one process over every rank's tokens (in rank order): each expert runs
    once on its tokens in (rank, token, slot) order; each token sums weight * output over its
    slots in slot order, in float32. Returns each rank's [T, H] output."""
    x = np.concatenate([i.tokens for i in inputs])
    ids = np.concatenate([i.ids for i in inputs])
    w = np.concatenate([i.weights for i in inputs])
    out = np.zeros(ids.shape + (x.shape[1],), np.float32)
    for e in range(experts):
        g, k = np.nonzero(ids == e)
        if len(g):
            out[g, k] = expert_mlp(e, x[g])
    y = np.zeros(x.shape, np.float32)
    for k in range(ids.shape[1]):
        y += np.where(ids[:, k, None] >= 0, w[:, k, None] * out[:, k], 0)
    bounds = np.cumsum([0] + [len(i.tokens) for i in inputs])
    return [y[bounds[r]:bounds[r + 1]] for r in range(len(inputs))]
