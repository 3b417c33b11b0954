"""Node verification: measure what a node claims before it takes work.

The controller (on the head) starts a :class:`NodeProbe` actor pinned to the node
(``ray.io/node-id``). Its :meth:`~NodeProbe.node` measures device memory (and touches a slice
of it), runs a matmul benchmark and gets the link probe ready (a tensorfabric engine connected
to the head's, a random payload); then :meth:`~NodeProbe.link` writes the payload into a
buffer the head registered with its engine. Link probes run one at a time at the head (its
ingress is shared: six nodes writing at once would each measure a sixth of it), and the head
holds its turn only for the writes: everything slow on a busy node (the actor's start, its
imports, the connection) happens before. Each times its best of ``LINK_ROUNDS`` writes after
a warm-up write of the full size (the first write of a fresh connection runs at a third to a
half of the link's rate). The controller checks the payload's hash on arrival and compares
the figures with the node's labels (:func:`judge`).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable

from ._labels import LINK_TIERS, NodeClaims

# A node may report a little less than it claims (GB vs GiB rounding, driver reservations).
MEMORY_TOLERANCE = 0.93


def _host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _measure_memory(claims: NodeClaims) -> tuple[str, float, bool]:
    """(device, measured GB, probe ok): the probe writes and reads back part of the memory."""
    import numpy as np

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    probe_bytes = int(min(claims.gpu_memory_gb * 1e9, 256 * 2**20))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        t = torch.full((probe_bytes // 4,), 7.0, device="cuda")
        ok = bool(t.sum().item() == 7.0 * t.numel())
        return props.name, props.total_memory / 1e9, ok
    if not claims.simulated:
        return "none", 0.0, False
    buf = np.full(probe_bytes, 7, dtype=np.uint8)
    ok = int(buf[:: 4096].sum()) == 7 * len(buf[:: 4096])
    return "cpu (simulated GPU)", _host_memory_gb(), ok


def _measure_compute(seconds: float = 0.2) -> float:
    """GFLOP/s of a float32 matmul loop on the node's device (the node's score)."""
    mm: Callable[[], float]
    try:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = torch.randn(512, 512, device=dev)
        mm = lambda: (t @ t).sum().item()  # noqa: E731 - .item() synchronizes cuda
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
        mm = lambda: float((a @ a).sum())  # noqa: E731
    mm()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mm()
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - t0) / 1e9


LINK_ROUNDS = 3  # timed writes of the payload after the warm-up; the best one counts


def _measure_transfer(eng: Any, payload: Any, desc_bytes: bytes, imm: int,
                      timeout: float) -> dict[str, Any]:
    import tensorfabric as tf

    desc = tf.RegionDescriptor.from_bytes(desc_bytes)
    nbytes = payload.nbytes
    deadline = time.monotonic() + timeout
    best, started = 0.0, time.time()
    # a warm-up write (opens every link, grows the windows), then the timed ones; only the
    # last carries the immediate: the head hashes what landed after it
    for i in range(LINK_ROUNDS + 1):
        t0 = time.perf_counter()
        eng.write(payload, desc, imm=imm if i == LINK_ROUNDS else None).wait(
            max(0.1, deadline - time.monotonic()))
        if i:
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e6)
    return {"transfer_mb_s": best, "link_window": [started, time.time()],
            "sha256": hashlib.sha256(payload.tobytes()).hexdigest()}


FAULTS_ENV = "TENSORFABRIC_POOL_FAULTS"


def _node_faults() -> dict[str, Any]:
    """Fault injection for tests: ``TENSORFABRIC_POOL_FAULTS`` names a JSON file mapping a
    Ray node id to this node's faults. Faults can only make a node look worse, never better."""
    import json

    path = os.environ.get(FAULTS_ENV)
    if not path:
        return {}
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
        with open(path) as f:
            faults = json.load(f).get(node, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return faults if isinstance(faults, dict) else {}


def _inject_faults(out: dict[str, Any]) -> None:
    """Measurements to lower, e.g. ``{"<node id>": {"memory_gb": 1.0}}`` (a GPU that lost
    memory)."""
    faults = _node_faults()
    for key in ("memory_gb", "gflops", "transfer_mb_s"):
        if key in faults and key in out:
            out[key] = min(out[key], float(faults[key]))


def _hang_if_told() -> None:
    """A link probe that hangs in its turn (a hung or hostile node): ``{"<node id>":
    {"link_hang_s": 600, "link_hang_marker": "/path"}}`` touches the marker, then sleeps."""
    faults = _node_faults()
    if "link_hang_s" in faults:
        marker = faults.get("link_hang_marker")
        if marker:
            with open(marker, "w") as f:
                f.write(str(time.time()))
        time.sleep(float(faults["link_hang_s"]))


def _load_per_cpu() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0


# A busy node moves bytes slower than its link allows (the CPU, not the wire, limits it): the
# link-tier bar is lowered by the node's load per CPU, at most this many times, so an honest
# node is not failed for being busy while a claim far above the link still fails.
MAX_LOAD_RELIEF = 8.0


def measure_node(labels: dict[str, str]) -> dict[str, Any]:
    """Memory and compute of the node this runs on. Returns the raw measurements (no
    verdict)."""
    claims = NodeClaims.from_labels(labels)
    if claims is None:
        return {"error": "the node has no tensorfabric.io labels (it did not join the pool)"}
    out: dict[str, Any] = {}
    try:
        out["device"], out["memory_gb"], out["memory_probe_ok"] = _measure_memory(claims)
        out["gflops"] = _measure_compute()
        _inject_faults(out)
    except Exception as exc:  # reported as a failed claim, not a crash of the controller
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


class NodeProbe:
    """A Ray actor on the node being verified (the controller starts one per attempt and
    kills it after, which closes its engine with its process): :meth:`node`, then, when the
    head gives this node its turn, :meth:`link`."""

    def __init__(self) -> None:
        self._eng: Any = None
        self._payload: Any = None

    def node(self, labels: dict[str, str], head: bytes, nbytes: int,
             timeout: float) -> dict[str, Any]:
        """Memory and compute (:func:`measure_node`), then the link probe made ready: an
        engine connected to the head's (``head``: its address bytes) and ``nbytes`` of
        random payload."""
        out = measure_node(labels)
        if "error" in out:
            return out
        try:
            import numpy as np
            import ray

            import tensorfabric as tf

            self._payload = np.random.default_rng().integers(0, 256, nbytes, dtype=np.uint8)
            host = ray.util.get_node_ip_address()
            self._eng = tf.Engine(host=host, port=0, timeout=timeout, name="pool-verify")
            self._eng.connect(head, timeout=timeout)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    def link(self, desc_bytes: bytes, imm: int, timeout: float) -> dict[str, Any]:
        """The link into the head's buffer (``desc_bytes``), and the node's load per CPU
        while it ran."""
        out: dict[str, Any] = {}
        try:
            if self._eng is None:
                raise RuntimeError("the link probe was not made ready (call node() first)")
            _hang_if_told()
            out.update(_measure_transfer(self._eng, self._payload, desc_bytes, imm, timeout))
            out["load_per_cpu"] = _load_per_cpu()
            _inject_faults(out)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out


def judge(claims: NodeClaims, measured: dict[str, Any], landed_sha256: str | None) -> tuple[bool, str]:
    """(verified, reason) from a node's claims and its measurements."""
    if "error" in measured:
        return False, f"verification failed on the node: {measured['error']}"
    if measured["device"] == "none":
        return False, f"claims GPU {claims.gpu_model} but no CUDA device is visible on the node"
    if not measured["device"].startswith("cpu") and claims.gpu_model.lower() not in measured[
        "device"
    ].lower().replace(" ", ""):
        return False, f"claims GPU {claims.gpu_model} but the device is {measured['device']}"
    if not measured["memory_probe_ok"]:
        return False, "the memory probe read back wrong values"
    if measured["memory_gb"] < claims.gpu_memory_gb * MEMORY_TOLERANCE:
        return False, (
            f"claims {claims.gpu_memory_gb:g} GB of GPU memory, measured "
            f"{measured['memory_gb']:.1f} GB"
        )
    if landed_sha256 != measured["sha256"]:
        return False, "the verification payload arrived corrupted"
    need = LINK_TIERS[claims.link_tier]
    relief = min(MAX_LOAD_RELIEF, max(1.0, float(measured.get("load_per_cpu", 1.0))))
    if measured["transfer_mb_s"] < need / relief:
        busy = f" (bar lowered {relief:.1f}x for the node's load)" if relief > 1 else ""
        return False, (
            f"claims link tier {claims.link_tier} (>= {need:g} MB/s), measured "
            f"{measured['transfer_mb_s']:.0f} MB/s{busy}"
        )
    return True, "ok"
