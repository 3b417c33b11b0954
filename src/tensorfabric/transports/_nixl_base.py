"""NIXL transport, shared parts: wire formats, the agent's making, op and region records.

See ``_nixl`` for the protocol.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import AccessError, ConfigError, TensorFabricError
from .._ops import WireOp
from .._region import RegionDescriptor

log = logging.getLogger("tensorfabric.nixl")

EXTRA_HINT = ("install the nixl extra: pip install 'tensorfabric[nixl]' "
              "(CPU-only machines: pip install --no-deps nixl-cu13==1.5.1)")
#: UCX_TLS presets. tcp stays in "shm" because NIXL asks UCX for peer-failure detection,
#: which UCX's shared-memory transports lack for its control messages.
TLS_PRESETS = {"shm": "sm,tcp,self", "tcp": "tcp,self"}

TAG_OPEN = 0xFFFF_FFFF_4E49_0001  # control tags (>= engine CONTROL_TAG_BASE)
TAG_OPEN_REPLY = 0xFFFF_FFFF_4E49_0002
TAG_REVOKE = 0xFFFF_FFFF_4E49_0003  # owner -> opener: a region is unregistered
TAG_REVOKE_REPLY = 0xFFFF_FFFF_4E49_0004  # opener -> owner: dropped, nothing of ours in flight
_REVOKE = struct.Struct("<4sQQ")  # magic, request id, region
_REVOKED_MAX = 4096  # (owner, region) pairs an initiator remembers as revoked
_OPEN = struct.Struct("<4sQQB16sI")  # magic, request id, region, need, key, metadata length
_REPLY = struct.Struct("<4sQBQQII")  # magic, request id, status, address, nbytes, text len, md len
_NOTE = struct.Struct("<4sQQBBQ16s")  # magic, op id, region, need, flags, imm, key (+ table)
_F_IMM, _F_NO_ACK = 1, 2
_ACK = struct.Struct("<4sQB")  # magic, op id, status (+ text)
_SEG1 = struct.Struct("<QQ")  # one entry of a segment table (w.SEG_DTYPE): offset, length
_NO_SEGS = np.zeros(0, dtype=w.SEG_DTYPE)
_env_lock = threading.Lock()
_HOT_S = 0.5  # keep polling without sleeping this long after the last sign of traffic
_IDLE_S = 0.0005  # then sleep this long between polls
_PREP_MAX = 64  # op shapes whose transfer requests are kept for reposting
_ACK_SHARE = 0.05  # an op done while posting waits for its acknowledgement this share longer
_PREP_IDLE = 2  # idle requests kept per shape (more are made while ops overlap)


def load_nixl(module: str | None = None) -> Any:
    """NIXL's Python API module. Tries the CUDA-specific wheels first (importing the ``nixl``
    meta package may import torch to pick one)."""
    names = [module] if module else ["nixl_cu13", "nixl_cu12", "nixl"]
    err: Exception | None = None
    for name in names:
        try:
            api = importlib.import_module(f"{name}._api")
        except ImportError as exc:
            err = exc
            continue
        for logger in (name, f"{name}._api", "nixl"):  # NIXL logs every agent start at INFO
            logging.getLogger(logger).setLevel(logging.WARNING)
        return api
    raise ImportError(f"the nixl transport needs NVIDIA NIXL: {EXTRA_HINT}") from err


def agent_name(engine_id: bytes) -> str:
    return "tf-" + engine_id.hex()


@dataclass
class _Remote:
    agent: str
    base: int
    nbytes: int
    revoked: bool = False  # the owner unregistered it: nothing may be posted to it


@dataclass(eq=False)
class _Prepared:
    """One op shape: its descriptor lists and the idle NIXL transfer requests made from them.
    ``local_rid`` is the region of this engine whose registration the local side lies in;
    None (a per-op registration) is never kept."""
    remote: _Remote
    local_rid: int | None
    kind: str
    local: np.ndarray
    far: np.ndarray
    tail: bytes  # the segment table every op's notification carries
    idle: list[Any] = field(default_factory=list)
    live: bool = True  # False once dropped: requests then are released, not kept


@dataclass
class _Op:
    wop: WireOp
    peer: EngineAddress
    region: int
    handle: Any = None  # None: notification-only op (no bytes)
    prep: _Prepared | None = None  # where the handle came from (and goes back to)
    xfer_done: bool = False
    ack: tuple[int, str] | None = None
    keep: list[Any] = field(default_factory=list)  # views and per-op registrations


def make_agent(api: Any, name: str, backend: str, tls: str | None, net_devices: str | None,
               params: dict[str, str], progress_thread: bool, ucx_modules: str | None) -> Any:
    """A NIXL agent named ``name`` with its ``backend`` started (UCX settings from the
    options, put in the environment only while the backend starts)."""
    env = {}
    if tls:
        env["UCX_TLS"] = TLS_PRESETS.get(tls, tls)
    if net_devices:
        env["UCX_NET_DEVICES"] = net_devices
    if ucx_modules is None and tls in TLS_PRESETS and "UCX_MODULES" not in os.environ:
        # no InfiniBand needed: skip UCX's ib module, whose bundled libnl-route crashes
        # the process at exit (nixl-cu13 1.5.1, seen on machines without RDMA NICs)
        ucx_modules = "^ib,rdmacm"
    if ucx_modules:
        env["UCX_MODULES"] = ucx_modules
    # NIXL's own locking too: UCX may report a failed peer from its async thread
    cfg = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=[],
                                sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    with _env_lock:  # UCX reads its settings from the environment when the backend starts
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            agent = api.nixl_agent(name, cfg)
            if backend not in agent.get_plugin_list():
                raise ConfigError(f"NIXL has no {backend} plugin here (available: "
                                  f"{agent.get_plugin_list()})")
            agent.create_backend(backend, params)
        except TensorFabricError:
            raise
        except Exception as exc:
            hint = ("its plugin needs libfabric.so.1 (EFA installer), libhwloc.so.15 and "
                    "libcuda.so.1 on the library path" if backend == "LIBFABRIC" else
                    "check the tls and net_devices options")
            raise ConfigError(f"NIXL could not start its {backend} backend ({exc}): "
                              f"{hint}; see docs/troubleshooting/nixl.md") from exc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return agent


def _address(view: memoryview) -> int:
    try:  # ctypes is cheaper than numpy here, but needs a writable buffer of >= 1 byte
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _check_bounds(remote: _Remote, desc: RegionDescriptor, off: np.ndarray, n: np.ndarray,
                  peer: EngineAddress) -> None:
    """The whole op, before anything is posted: every segment against the size the owner
    reported (not the forgeable descriptor's), without wrapping around (``off + n`` could)."""
    size = np.uint64(remote.nbytes)
    off = off.astype(np.uint64, copy=False)
    n = n.astype(np.uint64, copy=False)
    if len(n) and bool(np.any((off > size) | (n > size - np.minimum(off, size)))):
        raise AccessError(f"access outside peer {peer}'s {remote.nbytes}-byte region "
                          f"{desc.region_id}", peer=str(peer), region=desc.region_id)


__all__ = ["EXTRA_HINT", "TLS_PRESETS", "agent_name", "load_nixl", "make_agent"]
