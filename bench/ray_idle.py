"""CPU an idle Ray test cluster burns: six local nodes as ``tests/ray`` starts them.

    python bench/ray_idle.py                 # the test cluster's settings
    python bench/ray_idle.py '{"enable_metrics_collection": false, "event_stats": false}'

Starts the head (2 CPUs) and five 1-CPU nodes with the health-check settings of
``tests/ray/conftest.py`` plus any ``_system_config`` entries given as JSON, connects a driver,
lets it settle 15 s, then samples every process under this one for 30 s and prints the CPU
seconds per second, in all and per kind of process (docs/benchmarks.md, "Whole suite, tenth
pass": why the Ray tier's CPU doubles under load).
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time

import psutil
import ray
from ray.cluster_utils import Cluster

SETTLE_S, SAMPLE_S = 15, 30


def _cpu() -> dict[int, tuple[float, str]]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            cmd = p.cmdline()
        except psutil.Error:
            continue
        kind = re.sub(r"[.\d]+$", "", " ".join(x.rsplit("/", 1)[-1] for x in cmd[:2])[:60])
        out[p.pid] = (t.user + t.system, kind)
    return out


def main(argv: list[str]) -> int:
    extra = json.loads(argv[0]) if argv else {}
    cfg = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
           "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0,
           "memory_monitor_refresh_ms": 0, **extra}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "_system_config": cfg})
    try:
        for _ in range(5):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        time.sleep(SETTLE_S)
        before, t0 = _cpu(), time.monotonic()
        time.sleep(SAMPLE_S)
        after, dt = _cpu(), time.monotonic() - t0
        kinds: collections.Counter[str] = collections.Counter()
        for pid, (cpu, kind) in after.items():
            if pid in before:
                kinds[kind] += (cpu - before[pid][0]) / dt
        print(f"extra _system_config {json.dumps(extra)}: {sum(kinds.values()):.3f} CPU-s per s "
              f"over {len(after)} processes")
        for kind, rate in kinds.most_common():
            print(f"  {rate:.4f}  {kind}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
