"""Where a test-suite run's CPU goes: CPU seconds per test module, children included.

Run it beside the suite (it samples /proc once a second until the suite's pytest exits):

    python -m pytest -q -p no:cacheprovider & python bench/suite_cpu.py --out cpu.json
    python -m pytest -q -p no:cacheprovider & python bench/suite_cpu.py --out cpu.json --load 2

``--load N`` runs ``stress-ng --cpu N`` beside the suite for as long as it runs (issue 15's
loaded runs) and stops it after; it refuses to start without stress-ng (a loaded run that
silently ran idle once), and the report names the load's CPU apart, as "(load: stress-ng)".

Every process's CPU time (user + system, from /proc/PID/stat) between two samples is charged
to the test that the nearest pytest-xdist worker among its ancestors was running then (the
worker's process title names it: "[pytest-xdist running] TEST"); vLLM servers, served stacks,
Ray clusters and CLIs started by a test count for that test. Processes with no worker above
them are charged to "(outside the suite)". A process that starts and ends between two samples
is missed (at most a second of CPU each). The report: total CPU, CPU per tier and module, the
top tests, and the machine's busy share over the run (from /proc/stat).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
TITLE = re.compile(r"\[pytest-xdist (\w+)\] ?(\S*)")


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, cpu ticks, cmdline head)."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat.rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read(300).replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmd)
    return out


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report (per-test CPU seconds)")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--wait", type=float, default=120.0,
                    help="seconds to wait for the suite's workers to appear")
    ap.add_argument("--load", type=int, default=0,
                    help="run stress-ng --cpu N beside the suite (needs stress-ng)")
    args = ap.parse_args()
    load = None
    if args.load:
        if shutil.which("stress-ng") is None:
            sys.exit("suite_cpu: --load needs stress-ng (apt-get install stress-ng); "
                     "not measuring a loaded run without its load")
        load = subprocess.Popen(["stress-ng", "--cpu", str(args.load), "--quiet"])
    try:
        _sample(args)
    finally:
        if load is not None:
            load.terminate()
            load.wait(30)


def _sample(args: argparse.Namespace) -> None:
    per_test: collections.Counter[str] = collections.Counter()  # clock ticks
    last: dict[int, int] = {}
    seen_worker = False
    started = time.monotonic()
    b0 = _busy()
    while True:
        procs = _procs()
        workers = {pid: (m.group(2) if m.group(1) == "running" else "(between tests)")
                   for pid, (_, _, cmd) in procs.items() if (m := TITLE.match(cmd))}
        if workers:
            seen_worker = True
        elif seen_worker or time.monotonic() - started > args.wait:
            break
        for pid, (ppid, ticks, cmd) in procs.items():
            # a process new since the last sample: all its CPU is the suite's, once it runs
            delta = ticks - last.get(pid, 0 if seen_worker else ticks)
            last[pid] = ticks
            if delta <= 0:
                continue
            owner, p, hops = "(outside the suite)", pid, 0
            if cmd.startswith("stress-ng"):
                owner, p = "(load: stress-ng)", 1
            while p > 1 and hops < 64:
                if p in workers:
                    owner = workers[p].split("@")[0]
                    break
                p = procs.get(p, (1, 0, ""))[0]
                hops += 1
            per_test[owner] += delta  # ticks
        for pid in list(last):
            if pid not in procs:
                del last[pid]
        time.sleep(args.every)
    b1 = _busy()
    wall = time.monotonic() - started
    modules: collections.defaultdict[str, float] = collections.defaultdict(float)
    tiers: collections.defaultdict[str, float] = collections.defaultdict(float)
    seconds = {test: ticks / HZ for test, ticks in per_test.items()}
    for test, cpu in seconds.items():
        mod = test.split("::")[0]
        modules[mod] += cpu
        tiers[mod.split("/")[1] if mod.startswith("tests/") and mod.count("/") > 1 else mod] += cpu
    tier_s = {k: round(v) for k, v in sorted(tiers.items(), key=lambda kv: -kv[1])}
    module_s = {k: round(v, 1) for k, v in sorted(modules.items(), key=lambda kv: -kv[1])}
    report = {"wall_s": round(wall), "cpu_s": round(sum(seconds.values())),
              "machine_busy": round((b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 3),
              "tiers": tier_s, "modules": module_s,
              "tests": {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wall {report['wall_s']} s, CPU {report['cpu_s']} s, machine busy "
          f"{report['machine_busy']:.0%}")
    for k, n in list(tier_s.items())[:8]:
        print(f"  {n:7d} s  {k}")
    for k, v in list(module_s.items())[:25]:
        print(f"  {v:7.1f} s  {k}")


if __name__ == "__main__":
    main()
