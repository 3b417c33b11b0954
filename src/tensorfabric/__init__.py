"""tensorfabric: move tensors between processes, GPUs and machines over any fabric.

>>> import tensorfabric as tf
>>> with tf.Engine(secret="s3cret") as a, tf.Engine(secret="s3cret") as b:
...     dst = b.alloc(1024)
...     a.write(b"x" * 1024, dst.descriptor(), imm=7).wait()
...     b.expect(7).wait()
...     bytes(dst.array[:3])
b'xxx'
"""

from __future__ import annotations

from ._address import EngineAddress
from ._buffers import Buffer
from ._engine import Engine, Message, ScatterDest
from ._errors import (
    AccessError,
    AuthenticationError,
    BrokenError,
    CancelledError,
    ClosedError,
    ConfigError,
    ProtocolError,
    TensorFabricError,
    TransferTimeout,
    TransportError,
)
from ._region import Access, MemoryRegion, RegionDescriptor
from ._transfer import Transfer, gather

__version__ = "0.1.0"

__all__ = [
    # the engine and its memory
    "Engine",
    "EngineAddress",
    "MemoryRegion",
    "RegionDescriptor",
    "Access",
    "Buffer",
    # operations
    "Transfer",
    "ScatterDest",
    "Message",
    "gather",
    # errors
    "TensorFabricError",
    "ConfigError",
    "AccessError",
    "TransferTimeout",
    "CancelledError",
    "TransportError",
    "ClosedError",
    "BrokenError",
    "AuthenticationError",
    "ProtocolError",
]
