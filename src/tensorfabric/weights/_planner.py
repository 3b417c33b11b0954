"""Analytic model of a weight update: predicted time, and where it goes.

Every source GPU works on its 1/src_gpus share in parallel; the stages of a chunk (prepare on the
sender: gather + convert; send; forward along the fan-out tree; checksum on the receiver) overlap
in a pipeline, so the update takes about as long as its slowest stage, plus the time to fill the
pipeline (one chunk through every stage and every relay hop), plus per-op submit costs and the
control round trips. The same model runs on the rates measured on this machine by
``bench/weights_update.py``, which is how it is validated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tensorfabric.weights._plan import depth, fanout


@dataclass
class Cluster:
    """Inputs of the planner. Rates are per GPU (or process) in GB/s unless named *_gbps_bits."""

    params: float  # number of parameters
    src_gpus: int
    dst_gpus: int
    replicas: int = 1  # model copies on the destination side; each has dst_gpus/replicas GPUs
    src_bytes: float = 2.0  # bytes per parameter on the trainer (bf16)
    dst_bytes: float = 1.0  # bytes per parameter on the replicas (fp8)
    nics_per_gpu: int = 1
    nic_gbit: float = 400.0  # line rate of one NIC, Gbit/s
    link_efficiency: float = 0.9  # achievable fraction of line rate for large one-sided writes
    fanout: str = "direct"  # direct | chain | tree (between replicas)
    degree: int = 2  # children per relay in a tree
    chunk_bytes: float = 64e6
    prepare_gbs: float | None = None  # gather + convert rate per source GPU; None: NIC rate
    h2d_gbs: float | None = None  # host->device copy rate if trainer weights sit in host memory
    checksum_gbs: float = 1000.0  # receiver verification rate (GPU: memory-bound)
    staged: float = 1.0  # share of the replica bytes prepared into staging (zero-copy skips it)
    memory_gbs: float | None = None  # one host: its memory bus, GB read + written per second
    link_mem: float = 2.0  # one host: memory passes per byte a link moves (shm copy 2, tcp loopback 4)
    cores: float | None = None  # all processes share this many CPU cores (one host); None: cluster
    link_cpu: float = 1.0  # cores a link keeps busy at full rate (one host: shm 1, tcp loopback 2)
    submit_s: float = 23e-6  # CPU cost to post one write (TransferEngine: ~23 us per WR)
    control_s: float = 2e-3  # control round trips per update (go, commit, acks)


@dataclass
class Prediction:
    total_s: float
    bottleneck: str
    stages: dict[str, float] = field(default_factory=dict)  # seconds each stage would take alone
    fill_s: float = 0.0
    submit_s: float = 0.0
    control_s: float = 0.0
    bytes_per_dst_gpu: float = 0.0
    link_gbs: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _relays(n: int, kind: str, degree: int) -> tuple[int, int, int]:
    """(roots fed by the publisher, max children per relay, hops on the longest path)."""
    if n <= 0:
        return 0, 0, 0
    parents = fanout(n, kind, degree=degree)
    kids = [parents.count(i) for i in range(n)]
    return parents.count(-1), max(kids), depth(parents)


def predict(c: Cluster) -> Prediction:
    """Predict one update of ``c``; see the module docstring for the model."""
    link = c.nics_per_gpu * c.nic_gbit / 8 * c.link_efficiency  # GB/s per GPU, each direction
    per_replica = c.dst_gpus / c.replicas
    shard = c.params * c.dst_bytes / per_replica / 1e9  # GB each destination GPU must receive
    roots, children, hops = _relays(c.replicas, c.fanout, c.degree)
    src_share = c.params * c.src_bytes / c.src_gpus / 1e9  # GB of trainer weights per source GPU
    sent = c.params * c.dst_bytes * roots / c.src_gpus / 1e9  # GB each source GPU writes
    stages = {
        "prepare (gather+convert)": src_share * c.staged / (c.prepare_gbs or link),
        "send (trainer links)": sent / link,
        "receive (replica links)": shard / link,
        "verify (checksums)": shard / c.checksum_gbs,
    }
    if children:
        stages["forward (relay links)"] = shard * children / link
    if c.h2d_gbs:
        stages["h2d"] = src_share / c.h2d_gbs
    if c.memory_gbs:  # one host: every pass over the bytes crosses the same memory bus
        model_gb = c.params * c.dst_bytes / 1e9
        traffic = (c.staged * (src_share + model_gb)  # prepare: read the source, write staging
                   + model_gb  # the publisher's checksum
                   + c.replicas * model_gb * (c.link_mem + 1))  # each replica: the copy, the verify
        stages["host memory bus"] = traffic / c.memory_gbs
    if c.cores:  # one host: every copy and checksum competes for the same cores
        model_gb = c.params * c.dst_bytes / 1e9
        moved = model_gb * c.replicas
        cpu = (stages["prepare (gather+convert)"] + model_gb / c.checksum_gbs
               + moved / link * c.link_cpu + moved / c.checksum_gbs)
        stages[f"host CPU ({c.cores:.1f} cores shared)"] = cpu / c.cores
    bottleneck = max(stages, key=lambda k: stages[k])
    chunk = min(c.chunk_bytes / 1e9, shard, sent or shard)
    fill = chunk / (c.prepare_gbs or link) + hops * chunk / link + chunk / c.checksum_gbs
    writes = math.ceil(sent / chunk) if chunk else 0
    submit = writes * c.submit_s
    total = stages[bottleneck] + fill + submit + c.control_s
    return Prediction(total, bottleneck, stages, fill, submit, c.control_s, shard * 1e9, link)


def kimi_k2() -> Cluster:
    """Perplexity's setup: Kimi-K2 (1 T parameters), 256 training GPUs (bf16) -> 128 inference
    GPUs (fp8) in 4 instances of 32 (EP32), one 400 Gbit/s NIC per GPU, direct writes."""
    return Cluster(params=1e12, src_gpus=256, dst_gpus=128, replicas=4, src_bytes=2, dst_bytes=1,
                   nics_per_gpu=1, nic_gbit=400)
