"""Admission control: refuse a request (429) when its tier's queue would make it miss
``server.request_timeout``, instead of letting it wait and time out.

Each tier keeps a moving average of how long it holds one request (:meth:`TierLoad.observe`).
A new request waits for the requests ahead of it to drain through the tier's slots (1 for a
one-at-a-time model, the batch size for vLLM), so its expected wait is roughly
``ceil((ahead + 1) / slots) * mean_hold``. Until a tier has been measured it admits everything
(the overall bound ``server.max_queue`` still holds).
"""

from __future__ import annotations

import math
import threading

from ._errors import QueueFull

__all__ = ["TierLoad"]


class TierLoad:
    """One tier's service-time estimate and its admission check."""

    def __init__(self, name: str, slots: int = 1, *, alpha: float = 0.2) -> None:
        self.name = name
        self.slots = max(int(slots), 1)
        self.alpha = alpha
        self.mean_hold: float | None = None
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            m = self.mean_hold
            self.mean_hold = seconds if m is None else (1 - self.alpha) * m + self.alpha * seconds

    def expected_wait(self, ahead: int, slots: int | None = None) -> float:
        """Seconds until a request with ``ahead`` requests before it is finished here."""
        m = self.mean_hold
        if m is None:
            return 0.0
        return math.ceil((max(ahead, 0) + 1) / max(slots or self.slots, 1)) * m

    def admit(self, ahead: int, budget: float, slots: int | None = None) -> None:
        """Raise :class:`QueueFull` if a request would not be done within ``budget`` seconds."""
        wait = self.expected_wait(ahead, slots)
        if wait > budget:
            raise QueueFull(
                f"the {self.name} tier has {ahead} requests ahead (about {wait:.0f} s at "
                f"{self.mean_hold:.1f} s each over {slots or self.slots} slot(s)), past "
                f"server.request_timeout={budget:.0f} s; retry later",
                retry_after=max(1, math.ceil(wait - budget)),
            )
