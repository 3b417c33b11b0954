"""The replica class the pool benchmark deploys (loaded by import path on Ray workers)."""

from __future__ import annotations


class Echo:
    def __call__(self, x: int) -> int:
        return x
