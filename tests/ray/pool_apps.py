"""Deployment targets the pool tests load by import path (``pool_apps:Echo``) on Ray workers."""

from __future__ import annotations

import os


class Echo:
    """A replica that says where it runs."""

    def __init__(self, greeting: str = "hi") -> None:
        self.greeting = greeting

    def __call__(self, x: int) -> dict:
        import ray

        labels = ray.get_runtime_context().get_node_labels()
        return {"x": x, "greeting": self.greeting, "zone": labels.get("tensorfabric.io/zone"),
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def square(x: int) -> int:
    return x * x


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("model weights not found")


class SlowStart:
    """A replica whose constructor reports its node (to a file) and then takes a while, so a
    test can kill the node while the replica starts."""

    def __init__(self, path: str, delay_s: float = 10.0) -> None:
        import time

        import ray

        with open(path, "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")
        time.sleep(delay_s)

    def __call__(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
