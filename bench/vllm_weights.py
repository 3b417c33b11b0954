"""Weight updates into running vLLM servers: tensorfabric against vLLM's own path, same run.

For 1, 2, 4 vLLM servers (the default model, float32, 538 MB of vLLM parameters each) it times:
  - tf: ``VllmWeights.publish`` -- one-sided writes into every server's staging region (chain
    fan-out), keyed checksums verified there, then the switch between engine steps (drain,
    the in-place load from staging -- or ``reload_weights`` with TENSORFABRIC_VLLM_SWITCH=reload
    in this process's environment, which the servers inherit -- and the prefix-cache reset);
    "transfer" is the part before the switch, "total" includes it;
  - raw: the engine's raw ``write`` of the same bytes into every server's staging region at once
    (chunked and windowed like the publisher, no checksums, no switch);
  - vllm: what a user has without tensorfabric on CPU: save the new weights as safetensors
    (to local disk, page cache), then on every server ``/pause``, ``collective_rpc("reload_weights",
    weights_path=...)``, ``/resume`` (dev-mode routes, ``VLLM_SERVER_DEV_MODE=1``) in parallel.
    Between emulated hosts the file is not shipped over the network (the hosts share a disk
    here), which favours this path.

    python bench/vllm_weights.py --replicas 1,2,4 --modes shm
    python bench/vllm_weights.py --replicas 1,2,4 --fabric 2gbit   # root

``--fabric RATE`` puts this process and every server in its own network namespace with one NIC
capped at RATE (tcp only: engines in other namespaces are other hosts). Between hosts the vLLM
path's file would have to reach every host: the table adds the raw write of the same bytes to
every host (measured in the same run) as "vLLM path + shipping". Best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])

import tensorfabric as tf  # noqa: E402
from tensorfabric.vllm._launch import VllmServer  # noqa: E402
from tensorfabric.vllm._model import hf_folder  # noqa: E402
from tensorfabric.vllm._weights_fleet import VllmWeights, vllm_plan, weights_server_args  # noqa: E402
from tensorfabric.vllm._weights_trainer import perturb, save_folder, trainer_tensors  # noqa: E402

SECRET = "bench-vllm-weights"
SWITCH = os.environ.get("TENSORFABRIC_VLLM_SWITCH", "in-place")


def _post(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url + path, json.dumps(body or {}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def _raw_write(fleet: VllmWeights, names: list[str]) -> float:
    """Seconds to write the publisher's staging buffer into every server's staging region."""
    pub = fleet.publisher
    descs = [pub._replicas[n].slots[0] for n in names]
    t0 = time.perf_counter()
    inflight: list[Any] = []
    for c in pub.plan.chunks:
        for d in descs:
            inflight.append(pub.engine.write(pub.staging, d, src_offset=c.offset, dst_offset=c.offset,
                                             nbytes=c.nbytes))
        while len(inflight) > pub.window * len(descs):
            inflight.pop(0).wait(120)
    for t in inflight:
        t.wait(120)
    return time.perf_counter() - t0


def _vllm_path(urls: list[str], tensors: dict[str, Any], folder: Path, tmp: Path) -> tuple[float, float]:
    """(save seconds, reload seconds) of vLLM's own path to every server."""
    dst = tmp / "weights"
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    save_folder(folder, tensors, dst)
    t1 = time.perf_counter()

    def one(url: str) -> None:
        _post(url, "/pause?mode=wait")
        _post(url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(dst)}})
        _post(url, "/resume")

    with ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(one, urls))
    return t1 - t0, time.perf_counter() - t1


def run_case(mode: str, n: int, servers: list[VllmServer], tensors: dict[str, Any],
             args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fab = args.fab
    transports = ("tcp",) if mode == "tcp" else ("shm", "tcp")
    eng_kw: dict[str, Any] = {"transports": transports}
    if fab:
        eng_kw["host"] = fab.addr(0)
    plan = vllm_plan(tensors, chunk_bytes=int(args.chunk_mb * 2**20))
    names = [f"v{i}" for i in range(n)]
    with tf.Engine(secret=SECRET, **eng_kw) as eng:
        fleet = VllmWeights(eng, plan, {nm: s.url for nm, s in zip(names, servers)}, secret=SECRET,
                            transports=transports, fanout=args.fanout,
                            timeout=120)
        for i, nm in enumerate(names):
            if fab:
                fleet.hosts[nm] = fab.addr(i + 1)
        try:
            fleet.join_all(timeout=120)
            warm = fleet.publish(tensors)  # first touch of every page on both sides
            assert warm.ok, warm
            best: dict[str, float] = {}
            for _ in range(args.repeat):
                raw = _raw_write(fleet, names)
                perturb(tensors, 100 + fleet.publisher.version, 0.01)
                res = fleet.publish(tensors)
                assert res.ok, res
                assert res.transfer is not None
                save, reload = _vllm_path([s.url for s in servers[:n]], tensors, args.folder, tmp)
                for k, v in (("raw", raw), ("transfer", res.transfer.seconds), ("switch", res.switch_s),
                             ("total", res.seconds), ("vllm_save", save), ("vllm_reload", reload),
                             ("vllm", save + reload)):
                    best[k] = min(best.get(k, float("inf")), v)
            fleet.sync(timeout=120)  # the servers now hold the vLLM path's load: back to ours
        finally:
            fleet.close()
    if fab:
        mode = f"tcp, {args.fabric} NIC per host"
    else:
        mode = "shm, one host" if mode == "shm" else "tcp loopback, one host"
    return {"mode": mode, "replicas": n, "mb": plan.nbytes / 1e6, **best,
            "transfer_vs_raw": best["raw"] / best["transfer"], "total_vs_raw": best["raw"] / best["total"],
            "vllm_vs_tf": best["vllm"] / best["total"]}


def _table(rows: list[dict[str, Any]]) -> str:
    one = {r["mode"]: r["total"] for r in rows if r["replicas"] == 1}
    out = ["| link | replicas | raw write s | tf transfer s | tf switch s | tf total s | raw / tf transfer "
           "| raw / tf total | tf total vs 1 replica | vLLM path s (save + reload) | vLLM path / tf total "
           "| vLLM path + shipping / tf total |",
           "|" + "---|" * 12]
    for r in rows:
        base = one.get(r["mode"])
        out.append(f"| {r['mode']} | {r['replicas']} | {r['raw']:.3f} | {r['transfer']:.3f} | "
                   f"{r['switch']:.3f} | {r['total']:.3f} | {r['transfer_vs_raw']:.2f} | "
                   f"{r['total_vs_raw']:.2f} | {r['total'] / base:.2f}x | "
                   f"{r['vllm']:.3f} ({r['vllm_save']:.2f} + {r['vllm_reload']:.2f}) | "
                   f"{r['vllm_vs_tf']:.2f}x | {(r['vllm'] + r['raw']) / r['total']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--modes", default="shm,tcp", help="shm and/or tcp")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--fanout", default="chain", help="direct, chain or tree")
    p.add_argument("--chunk-mb", type=float, default=8.0)
    p.add_argument("--fabric", metavar="RATE", help="tcp between emulated hosts (root), NIC rate RATE")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    args.folder = hf_folder()
    tensors = trainer_tensors(args.folder)
    counts = [int(x) for x in args.replicas.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    rows = []
    args.fab = None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        logs = Path(args.log_dir) if args.log_dir else tmp
        if args.fabric:
            from tensorfabric.testing.netns import NetnsHosts

            args.fab = stack.enter_context(NetnsHosts(max(counts) + 1, rate=args.fabric))
        servers = [VllmServer(args.folder, cpus=str(cpus[i % len(cpus)]), kv_space_gib=1,
                              args=weights_server_args(), log_path=logs / f"bench-{i}.log",
                              env={"TENSORFABRIC_SECRET": SECRET, "VLLM_SERVER_DEV_MODE": "1",
                                   "TENSORFABRIC_VLLM_SWITCH": SWITCH},
                              netns=args.fab.ns[f"h{i + 1}"] if args.fab else None,
                              host=args.fab.addr(i + 1) if args.fab else "127.0.0.1")
                   for i in range(max(counts))]
        for s in servers:
            stack.callback(s.stop, 10)
            s.start()
        if args.fab:  # this process is host 0 (threads it starts from here on too)
            stack.enter_context(args.fab.inside(0))
        for s in servers:
            s.wait_ready(1200)
        for mode in (["tcp"] if args.fab else args.modes.split(",")):
            for n in counts:
                row = run_case(mode, n, servers, tensors, args, tmp)
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    load = os.getloadavg()
    print()
    print(f"# vLLM weight updates, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()} ({os.cpu_count()} cores, load {load[0]:.1f}), fan-out {args.fanout}, "
          f"chunk {args.chunk_mb} MiB, checksum poly1305 (keyed), switch {SWITCH}, "
          f"best of {args.repeat}")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
