"""The actor each replica runs in: it hosts the user's class or function by import path."""

from __future__ import annotations

import importlib
import os
import time
from typing import Any


def load_target(target: str) -> Any:
    """Import ``package.module:Name`` (``Name`` may be dotted) and return the object."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class ReplicaHost:
    """Runs one replica. Ray wraps this class with ``ray.remote`` in the controller.

    ``kind == "actor"``: the target class is instantiated with ``args``/``kwargs`` and
    :meth:`call` invokes its methods (``method=None`` calls ``__call__``).
    ``kind == "function"``: :meth:`call` calls the function with the request's arguments.
    """

    def __init__(self, kind: str, target: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 deployment: str, index: int) -> None:  # fmt: skip
        self._kind = kind
        self.deployment = deployment
        self.index = index
        self.served = 0
        # the replica's own error is kept and raised by ready(), so it reaches the controller
        # as this task's error; raised from here, it would travel through Ray's actor-death
        # path, which a crash of the exiting worker can overwrite (loaded suite run 41: Ray's
        # core worker aborted on a corrupt mutex while exiting, and the deploy reported a
        # crash instead of the replica's error)
        self._failed: Exception | None = None
        try:
            obj = load_target(target)
            self._obj = obj(*args, **kwargs) if kind == "actor" else obj
        except Exception as exc:
            self._failed = exc

    def ready(self) -> dict[str, Any]:
        """Where this replica runs: node id, labels and pid (called once it is constructed);
        raises the error its target's import or constructor raised."""
        if self._failed is not None:
            raise self._failed
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "labels": dict(ctx.get_node_labels()),
                "pid": os.getpid(), "time": time.time()}  # fmt: skip

    def ping(self) -> int:
        return self.served

    def call(self, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.served += 1
        if self._kind == "function":
            return self._obj(*args, **kwargs)
        fn = getattr(self._obj, method) if method else self._obj
        return fn(*args, **kwargs)
