"""Cloud health at the edge: a circuit breaker with exponential-backoff probes.

Closed (cloud in use) -> after ``failures_to_open`` consecutive failures -> open (every request
answered at the edge, marked degraded). While closed, ``watch()`` runs every ``interval``
seconds (a ping, or "heard from the cloud lately"), so a dead cloud shows even with no request
in flight. While open, a background prober pings the cloud with backoff ``initial, 2*initial,
... <= max``; the first success closes the breaker again. Only silence counts as a failure: a
cloud that answers, even with an error or "busy", is up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["CloudHealth"]


class CloudHealth:
    """Thread-safe breaker. ``probe()`` returns True when the cloud answered a ping."""

    def __init__(
        self,
        probe: Callable[[], bool],
        *,
        failures_to_open: int = 1,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        on_change: Callable[[bool], None] | None = None,
        interval: float | None = None,
        watch: Callable[[], bool] | None = None,
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._watch = watch
        self._poked = False
        self._failures_to_open = failures_to_open
        self._initial = backoff_initial
        self._max = backoff_max
        self._on_change = on_change
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._open = False
        self.opened_count = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tf-cloud-health", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        """False while the breaker is open (the cloud is considered down)."""
        with self._lock:
            return not self._open

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0

    def record_failure(self, error: str) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = error
            opened = not self._open and self._failures >= self._failures_to_open
            if opened:
                self._open = True
                self.opened_count += 1
        if opened:
            self._notify(False)
            self._wake.set()

    def _notify(self, up: bool) -> None:
        if self._on_change is not None:
            self._on_change(up)

    def poke(self) -> None:
        """Probe now (a cloud announced itself): no waiting out the backoff."""
        self._poked = True
        self._wake.set()

    def _safe_probe(self, probe: Callable[[], bool]) -> bool:
        try:
            return bool(probe())
        except Exception as exc:  # the prober must never die
            self.last_error = repr(exc)
            return False

    def _run(self) -> None:
        delay = self._initial
        while not self._stop.is_set():
            if self.available:
                if self._interval is None:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                if self._stop.wait(self._interval):
                    return
                if self.available and not self._safe_probe(self._watch or self._probe):
                    self.record_failure("the cloud tier did not answer a health ping in time")
                continue
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._poked:
                self._poked, delay = False, self._initial
            if self._safe_probe(self._probe):
                with self._lock:
                    self._open, self._failures = False, 0
                self._notify(True)
                delay = self._initial
            else:
                delay = min(self._max, delay * 2)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def wait_available(self, timeout: float) -> bool:
        """Block until the cloud is back (or ``timeout``); for tests and orderly startup."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.available:
                return True
            time.sleep(0.05)
        return self.available
