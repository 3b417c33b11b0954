"""The replica class the pool examples deploy (``pool_demo_app:Echo``)."""

from __future__ import annotations


class Echo:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, text: str) -> str:
        import ray

        zone = ray.get_runtime_context().get_node_labels().get("tensorfabric.io/zone")
        return f"{self.greeting}: {text} (from {zone})"
