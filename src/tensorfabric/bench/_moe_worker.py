"""One rank of the MoE benchmark, in its own process (``python -m tensorfabric.bench._moe_worker
ARGS_JSON``): MoE dispatch/combine over the engine, then the same bytes between the same
processes with torch.distributed ``all_to_all_single`` on gloo and with a raw-socket
all-to-all, in alternation, each iteration. Writes its timings to ``<dir>/rank<r>.json``."""

from __future__ import annotations

import datetime
import json
import os
import resource
import selectors
import socket
import sys
import time
from typing import Any

import numpy as np

from ..moe._plan import plan_dispatch
from ._moe_gloo import GlooLayer

_HDR = 64


def routing(it: int, rank: int, tokens: int, experts: int,
            topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k distinct experts per token, uniformly at random (seeded by iteration and rank)."""
    rng = np.random.default_rng([it, rank, 11])
    ids = np.argpartition(rng.random((tokens, experts), dtype=np.float32), topk, axis=1)[:, :topk]
    w = rng.random((tokens, topk), dtype=np.float32)
    return ids.astype(np.int64), w / w.sum(axis=1, keepdims=True)


def pair_bytes(a: dict[str, Any], it: int) -> tuple[np.ndarray, np.ndarray]:
    """[src, dst] bytes the engine moves at iteration ``it``: dispatch (header, rows and slot
    table; the own slot just rows) and combine (one row per (token, slot) pair)."""
    world, row, K = a["world"], a["hidden"] * 2, a["topk"]
    local = a["experts"] // world
    disp = np.zeros((world, world), np.int64)
    comb = np.zeros((world, world), np.int64)
    for s in range(world):
        ids, _ = routing(it, s, a["tokens"], a["experts"], K)
        plan = plan_dispatch(ids, world, local, 0)
        for d in range(world):
            n = len(plan.rows[d])
            disp[s, d] = n * row if s == d else _HDR + n * (row + 2 * K)
            comb[d, s] = int(plan.pairs[d]) * row
    return disp, comb


class RawMesh:
    """A full mesh of TCP sockets; ``all_to_all`` moves one buffer to each peer at once with a
    selector loop (no framing: both sides know the sizes, like all_to_all_single's splits)."""

    def __init__(self, rank: int, hosts: list[str], lsock: socket.socket, ports: list[int],
                 timeout: float = 60.0) -> None:
        """``lsock``: this rank's listener (bound before the ports were exchanged: a port
        picked, closed and bound again later can be taken in between); ``ports``: every
        rank's listener port."""
        self.rank, self.world = rank, len(hosts)
        self.socks: dict[int, socket.socket] = {}
        for peer in range(rank):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    s = socket.create_connection((hosts[peer], ports[peer]), timeout=timeout)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            s.sendall(rank.to_bytes(4, "little"))
            self.socks[peer] = s
        lsock.settimeout(timeout)
        for _ in range(rank + 1, self.world):
            s, _ = lsock.accept()
            peer = int.from_bytes(s.recv(4, socket.MSG_WAITALL), "little")
            self.socks[peer] = s
        lsock.close()
        for s in self.socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        self.sel = selectors.DefaultSelector()

    def all_to_all(self, send: list[memoryview], recv: list[memoryview]) -> None:
        recv[self.rank][:] = send[self.rank]
        out = {p: send[p] for p in self.socks if len(send[p])}
        inn = {p: recv[p] for p in self.socks if len(recv[p])}
        for p, s in self.socks.items():
            ev = (selectors.EVENT_WRITE if p in out else 0) | \
                (selectors.EVENT_READ if p in inn else 0)
            if ev:
                self.sel.register(s, ev, p)
        try:
            while out or inn:
                for key, ev in self.sel.select(60):
                    p, s = key.data, self.socks[key.data]
                    if ev & selectors.EVENT_WRITE and p in out:
                        n = s.send(out[p])
                        out[p] = out[p][n:]
                        if not len(out[p]):
                            del out[p]
                    if ev & selectors.EVENT_READ and p in inn:
                        n = s.recv_into(inn[p])
                        if n == 0:
                            raise ConnectionError(f"raw peer {p} closed")
                        inn[p] = inn[p][n:]
                        if not len(inn[p]):
                            del inn[p]
                    ev2 = (selectors.EVENT_WRITE if p in out else 0) | \
                        (selectors.EVENT_READ if p in inn else 0)
                    if ev2:
                        self.sel.modify(s, ev2, p)
                    else:
                        self.sel.unregister(s)
        finally:
            for k in list(self.sel.get_map().values()):
                self.sel.unregister(k.fileobj)


def main(a: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    import tensorfabric as tf
    from tensorfabric.moe import ExpertParallel, FileExchange

    torch.set_num_threads(1)
    rank, world, hosts = a["rank"], a["world"], a["hosts"]
    T, H, E, K = a["tokens"], a["hidden"], a["experts"], a["topk"]
    transports = ("shm", "tcp") if a["transport"] == "shm" else ("tcp",)
    eng = tf.Engine(a["secret"], host=hosts[rank], transports=transports, name=f"ep{rank}",
                    timeout=120, link_timeout=30,  # 8 ranks on 2 cores stall links for s
                    integrity=a["transport"] != "tcp-plain")  # tcp-plain: no frame MACs
    ep = ExpertParallel(eng, rank=rank, world=world, num_experts=E, hidden=H, topk=K,
                        max_tokens=T, dtype="bfloat16", timeout=120,
                        exchange=FileExchange(a["dir"], rank, world, key="ep", timeout=120))
    # gloo's store (rank 0) and each rank's raw-mesh listener bind port 0 and the ports go
    # round through files: no port is picked, released and bound again (another process on
    # the host took one in between once: EADDRINUSE)
    wait = datetime.timedelta(seconds=120)
    store = (dist.TCPStore(hosts[0], 0, world, True, timeout=wait, wait_for_workers=False)
             if rank == 0 else None)
    lsock = socket.create_server((hosts[rank], 0), backlog=world) if a["baselines"] else None
    mine = {"store": store.port if store else None,
            "mesh": lsock.getsockname()[1] if lsock else None}
    ports = [json.loads(b) for b in FileExchange(a["dir"], rank, world, key="ports",
                                                 timeout=120)(json.dumps(mine).encode())]
    if store is None:
        store = dist.TCPStore(hosts[0], ports[0]["store"], world, False, timeout=wait)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
    raw = RawMesh(rank, hosts, lsock, [p["mesh"] for p in ports]) if lsock else None
    x = torch.randn(T, H).to(torch.bfloat16)
    nroute = min(a["iters"], 4)
    routes = [routing(i, rank, T, E, K) for i in range(nroute)]
    sizes = [pair_bytes(a, i) for i in range(nroute)] if a["baselines"] else []
    big = max((int(max(d[rank].sum(), d[:, rank].sum(), c[rank].sum(), c[:, rank].sum()))
               for d, c in sizes), default=0)
    sbuf, rbuf = torch.empty(big, dtype=torch.uint8), torch.empty(big, dtype=torch.uint8)
    samples: dict[str, list[float]] = {k: [] for k in (
        "engine_dispatch", "engine_combine", "gloo_dispatch", "gloo_combine",
        "raw_dispatch", "raw_combine", "engine_dispatch_wait", "engine_combine_wait",
        "glayer_dispatch", "glayer_combine", "compact_dispatch", "compact_combine")}
    layer = GlooLayer(rank, world, E, H, K, T) if a["baselines"] else None

    parts: dict[str, list[float]] = {}

    #: the CPU this process (all its threads: the engine's receive threads, gloo's) spent
    #: while each timed call ran: summed over the ranks, what the step cost the machine
    cpu: dict[str, list[float]] = {}

    def timed(key: str, fn: Any, *args: Any) -> Any:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        if it >= a["warmup"]:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            samples[key].append(t1 - t0)
            cpu.setdefault(key, []).append(r1.ru_utime - r0.ru_utime + r1.ru_stime
                                           - r0.ru_stime)
        return out

    def gloo(split_out: np.ndarray, split_in: np.ndarray) -> None:
        dist.all_to_all_single(rbuf[:int(split_in.sum())], sbuf[:int(split_out.sum())],
                               split_in.tolist(), split_out.tolist())

    def mesh(split_out: np.ndarray, split_in: np.ndarray) -> None:
        assert raw is not None
        so = np.concatenate([[0], np.cumsum(split_out)])
        si = np.concatenate([[0], np.cumsum(split_in)])
        smv, rmv = memoryview(sbuf.numpy()), memoryview(rbuf.numpy())  # type: ignore[arg-type]
        raw.all_to_all([smv[so[p]:so[p + 1]] for p in range(world)],
                       [rmv[si[p]:si[p + 1]] for p in range(world)])

    for it in range(a["warmup"] + a["iters"]):
        ids, w = routes[it % nroute]
        dist.barrier()
        got = timed("engine_dispatch", ep.dispatch, x, ids, w)
        timed("engine_combine", ep.combine, got.tokens)
        if it >= a["warmup"]:  # where a step's time goes: pack, wait (fabric), unpack
            for k, v in ep.timings.items():
                parts.setdefault(k, []).append(v)
            samples["engine_dispatch_wait"].append(ep.timings["dispatch_wait"])
            samples["engine_combine_wait"].append(ep.timings["combine_wait"])
        dist.barrier()  # the compact layout: the identity experts gather their own rows
        got = timed("compact_dispatch", lambda: ep.dispatch(x, ids, w, expand=False))
        outs = got.rows[got.order]  # the experts' work, not timed
        yc = timed("compact_combine", ep.combine, outs)
        if it >= a["warmup"]:
            for k, v in ep.timings.items():
                parts.setdefault(f"compact_{k}", []).append(v)
        if not a["baselines"]:
            continue
        disp, comb = sizes[it % nroute]
        dist.barrier()
        timed("gloo_dispatch", gloo, disp[rank], disp[:, rank])
        timed("gloo_combine", gloo, comb[rank], comb[:, rank])
        dist.barrier()
        timed("raw_dispatch", mesh, disp[rank], disp[:, rank])
        timed("raw_combine", mesh, comb[rank], comb[:, rank])
        assert layer is not None
        dist.barrier()
        timed("glayer_dispatch", layer.dispatch, x, ids, w)
        y = timed("glayer_combine", layer.combine, layer.tokens)
        if it == 0:  # the two layers agree: same routing, same bookkeeping, other transport
            assert torch.equal(y, ep.combine(ep.dispatch(x, ids, w).tokens))
            assert torch.equal(y, yc)
    dispatch_bytes = [int(d[rank].sum() - d[rank, rank]) for d, _ in sizes]
    with open(os.path.join(a["dir"], f"rank{rank}.json"), "w") as f:
        json.dump({"samples": samples, "cpu": cpu, "sent_bytes": dispatch_bytes,
                   "parts_p50_us": {k: float(np.median(v) * 1e6) for k, v in parts.items()}}, f)
    dist.barrier()
    dist.destroy_process_group()
    ep.close()
    eng.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    # Results written, group and engine closed: leave without running C++ destructors. A
    # TCPStore client torn down at exit after rank 0 (its server) has gone aborted now and then
    # ("terminate called without an active exception", SIGABRT with no Python frame: about 1
    # point in 10-15 at EP 4 on a busy 2-core machine), and the harness drops a point whose rank
    # exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
