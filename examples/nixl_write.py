"""Two processes, one write with an immediate and one read through the nixl transport.

    pip install --no-deps nixl-cu13==1.5.1        # or: pip install 'tensorfabric[nixl]'
    PYTHONPATH=src python examples/nixl_write.py            # UCX over shared memory
    PYTHONPATH=src python examples/nixl_write.py tcp        # UCX over tcp (loopback)

The owner registers a buffer and hands its descriptor to the writer over a pipe; the writer
writes 64 MiB with immediate 7 and reads it back. NIXL metadata is exchanged only over the
engines' authenticated link, after the owner checked the region key.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time

import numpy as np

SECRET = "example-secret"
N = 64 << 20


def options(tls: str) -> dict[str, str]:
    return {"tls": tls, "net_devices": "lo"}


def owner(conn, tls: str) -> None:
    import tensorfabric as tf

    with tf.Engine(SECRET, transports=("nixl", "tcp"), nixl=options(tls), name="owner") as eng:
        region = eng.register(np.zeros(N, np.uint8))
        conn.send(region.descriptor().to_bytes())
        eng.expect(7, timeout=60).wait()  # the writer's op has fully landed
        conn.send(int(region.array[::4096].astype(np.uint64).sum()))
        conn.recv()  # stay up until the writer has read back


def writer(desc_bytes: bytes, tls: str) -> tuple[float, np.ndarray]:
    import tensorfabric as tf

    with tf.Engine(SECRET, transports=("nixl", "tcp"), nixl=options(tls), name="writer") as eng:
        src = eng.register(np.random.default_rng(0).integers(0, 256, N, dtype=np.uint8))
        t0 = time.perf_counter()
        eng.write(src, desc_bytes, imm=7).wait(60)
        dt = time.perf_counter() - t0
        back = np.zeros(N, np.uint8)
        eng.read(desc_bytes, back).wait(60)
        assert np.array_equal(back, src.array), "read-back differs"
        return dt, src.array[::4096].copy()


def main() -> None:
    tls = sys.argv[1] if len(sys.argv) > 1 else "shm"
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=owner, args=(there, tls))
    proc.start()
    try:
        dt, sample = writer(here.recv(), tls)
        assert here.recv() == int(sample.astype(np.uint64).sum()), "owner saw other bytes"
        here.send("done")
        print(f"wrote {N >> 20} MiB over nixl/UCX {tls} in {dt * 1e3:.1f} ms (a first op: it "
              "includes opening the region and faulting in the owner's fresh pages) and read "
              "it back")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    main()
