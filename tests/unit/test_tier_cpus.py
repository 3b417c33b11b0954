"""edge.cpus / cloud.cpus: a tier's process runs on its CPUs (every thread), and a cloud that
serve spawns, first or after a crash, starts on cloud.cpus or on serve's own CPUs, never on the
edge's placement. Real processes; the affinity read back from /proc."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tensorfabric.split import parse_config

CPUS = sorted(os.sched_getaffinity(0))


def _task_cpus(pid: int) -> dict[int, set[int]]:
    """The CPUs each thread of ``pid`` may run on (Cpus_allowed_list of /proc/PID/task/*)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        m = re.search(r"Cpus_allowed_list:\s*(\S+)", status)
        assert m, status
        cpus: set[int] = set()
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        out[int(task.name)] = cpus
    return out


def test_a_tier_pins_every_thread_of_its_process() -> None:
    """Threads started before the pinning and after it, torch's pool sized to the list."""
    edge = CPUS[-1]
    code = textwrap.dedent(f"""
        import json, os, threading, time
        import torch
        from tensorfabric.split._cpus import pin_process
        stop = threading.Event()
        early = threading.Thread(target=stop.wait, daemon=True)
        early.start()                       # started before the tier pins its process
        got = pin_process("edge.cpus", "{edge}")
        late = threading.Thread(target=stop.wait, daemon=True)
        late.start()
        torch.ones(1 << 16).sum()           # torch's own threads, if it starts any
        print(json.dumps({{"pid": os.getpid(), "got": sorted(got), "torch": torch.get_num_threads()}}), flush=True)
        time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line, "the child printed nothing"
        info = json.loads(line)
        assert info["got"] == [edge] and info["torch"] == 1
        threads = _task_cpus(info["pid"])
        assert len(threads) >= 3
        assert all(c == {edge} for c in threads.values()), threads
    finally:
        p.kill()
        p.wait(10)


@pytest.mark.parametrize("cloud_cpus", [None, "first"])
def test_a_spawned_cloud_never_inherits_the_edge_placement(cloud_cpus: str | None) -> None:
    """serve spawns (and respawns, from a thread of the pinned edge) its cloud: the child starts
    on cloud.cpus, else on the CPUs serve started with."""
    from tensorfabric.serve._launch import spawn_cloud_process
    from tensorfabric.split._cpus import START_CPUS

    want = {CPUS[0]} if cloud_cpus else set(START_CPUS)
    cfg = parse_config({"cloud": {"cpus": str(CPUS[0])}} if cloud_cpus else {})
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CPUS[-1]})  # this thread stands for the pinned edge's supervisor
    try:
        proc = spawn_cloud_process(cfg)
    finally:
        os.sched_setaffinity(0, before)
    try:
        # set in the child before exec: the whole cloud process starts there
        assert _task_cpus(proc.pid)[proc.pid] == want
    finally:
        proc.kill()
        proc.wait(10)
