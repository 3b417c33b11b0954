"""The prefill worker: runs prompts and writes each layer's KV into a decode worker.

A prefill worker joins one decode worker (``hello`` / ``welcome``: addresses, KV layouts and
the decode region's descriptor), then serves ``prefill`` jobs one at a time. Its own KV pool
(a region allocated from its engine) receives each layer's keys and values from a
:class:`PagedKVCache`; the cache's per-layer hook issues that layer's ``write_pages`` to the
decode worker's blocks at once, so layer ``l`` travels while layers ``l+1..`` compute. Every
write carries the request's immediate; the decode worker counts ``num_layers`` of them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import tensorfabric as tf

from ._base import WorkerBase
from ._cache import PagedKVCache
from ._config import WorkerConfig
from ._errors import LayoutMismatchError, WorkerUnavailableError
from ._layout import KVLayout
from ._protocol import TAG_DECODE, TAG_PING, TAG_PREFILL, busy_time, decode_message, encode

log = logging.getLogger("tensorfabric.kv.prefill")


class _Aborted(Exception):
    """The decode worker aborted this job: stop the forward pass at the next layer."""


class PrefillWorker(WorkerBase):
    """One prefill worker process's state. Use :func:`run_worker` to run one."""

    def __init__(self, config: WorkerConfig, decode_address: bytes) -> None:
        super().__init__(config)
        self.decode_address = decode_address
        self.dst_desc: tf.RegionDescriptor | None = None
        self.dst_layout: KVLayout | None = None
        self._jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._aborted: set[tuple[int, int]] = set()
        self._stop = threading.Event()

    # -- joining ----------------------------------------------------------------------------

    def join(self) -> None:
        """Register with the decode worker; raise if it refuses or does not answer."""
        cfg = self.config
        self.engine.send(self.decode_address, encode(
            "hello", name=self.name, address=self.engine.address.hex(),
            layout=self.layout.to_bytes().decode()), tag=TAG_DECODE).wait(cfg.timeout)
        try:
            msg = decode_message(self.engine.recv(tag=TAG_PREFILL, timeout=cfg.timeout).data)
        except tf.TransferTimeout:
            raise WorkerUnavailableError(
                f"prefill worker {self.name}: the decode worker did not answer within "
                f"{cfg.timeout:.0f} s; check that it runs and shares the cluster secret"
            ) from None
        if msg["type"] == "reject":
            raise LayoutMismatchError(f"decode worker refused {self.name}: {msg['reason']}")
        self.dst_layout = KVLayout.from_bytes(msg["layout"].encode())
        self.layout.check_compatible(self.dst_layout)
        self.dst_desc = tf.RegionDescriptor.from_bytes(bytes.fromhex(msg["desc"]))

    # -- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve jobs until :meth:`stop` or a ``shutdown`` message."""
        threads = [threading.Thread(target=self._control_loop, name="kv-prefill-ctrl",
                                    daemon=True),
                   threading.Thread(target=self._drain_pings, name="kv-prefill-ping",
                                    daemon=True)]
        for t in threads:
            t.start()
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                break
            self._run(job)

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)

    def close(self) -> None:
        self.stop()
        self.engine.close()

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = decode_message(self.engine.recv(tag=TAG_PREFILL, timeout=0.5).data)
            except tf.TransferTimeout:
                continue
            except tf.TensorFabricError:
                return  # engine closed
            if msg["type"] == "prefill":
                self._jobs.put(msg)
            elif msg["type"] == "abort":
                self._aborted.add((msg["rid"], msg["imm"]))
            elif msg["type"] == "shutdown":
                self.stop()

    def _drain_pings(self) -> None:
        while not self._stop.is_set():
            try:
                self.engine.recv(tag=TAG_PING, timeout=0.5)
            except tf.TransferTimeout:
                continue
            except tf.TensorFabricError:
                return

    def _reply(self, kind: str, **fields: Any) -> None:
        try:
            self.engine.send(self.decode_address, encode(kind, worker=self.name, **fields),
                             tag=TAG_DECODE).wait(self.config.timeout)
        except tf.TensorFabricError as exc:
            log.warning("prefill worker %s: cannot reach the decode worker: %s", self.name, exc)

    def _run(self, job: dict[str, Any]) -> None:
        rid, imm = int(job["rid"]), int(job["imm"])
        key = (rid, imm)
        if key in self._aborted:
            self._reply("aborted", rid=rid, imm=imm)
            return
        ids: list[int] = job["ids"]
        dst_blocks: list[int] = job["blocks"]
        delay = float(job.get("fault_layer_delay_s", 0.0))  # fault injection for tests
        lay, dst = self.layout, self.dst_layout
        assert dst is not None and self.dst_desc is not None
        nb = lay.blocks_for(len(ids))
        transfers: list[tf.Transfer] = []
        intervals: list[tuple[float, float]] = []
        table = None
        started = time.perf_counter()
        try:
            if len(dst_blocks) < nb:
                raise ValueError(f"{len(dst_blocks)} destination blocks for {nb} needed")
            table = self.pool.new_table(len(ids))
            src_pages, dst_pages = table.block_ids[:nb], dst_blocks[:nb]

            def ship(layer: int, start: int, end: int) -> None:
                if key in self._aborted or self._stop.is_set():
                    raise _Aborted()
                t0 = time.perf_counter()
                t = self.engine.write_pages(
                    self.region, self.dst_desc, src_pages=src_pages, dst_pages=dst_pages,  # type: ignore[arg-type]
                    page_size=lay.page_bytes, src_offset=layer * lay.layer_bytes,
                    dst_offset=layer * dst.layer_bytes, imm=imm,
                    timeout=self.config.timeout)
                t.add_done_callback(lambda _t: intervals.append((t0, time.perf_counter())))
                transfers.append(t)
                if delay:
                    time.sleep(delay)

            from tensorfabric.models import prefill

            first = prefill(self.lm, ids, PagedKVCache(self.pool, table, on_layer=ship))
            computed = time.perf_counter()
            for t in transfers:
                t.wait(self.config.timeout)
            finished = time.perf_counter()
            extra = {}
            if job.get("measure_replay"):  # benchmark: the same writes again, without compute
                extra["replay_s"] = self._replay(src_pages, dst_pages)
            self._reply("prefill_done", rid=rid, imm=imm, first_token=first, stats={
                "prompt_tokens": len(ids), "kv_bytes": nb * lay.page_bytes * lay.num_layers,
                "num_blocks": nb, "layers": lay.num_layers, "prefill_s": computed - started,
                "transfer_busy_s": busy_time(intervals), "exposed_s": finished - computed,
                "extra": extra})
        except _Aborted:
            self._settle(transfers)
            self._reply("aborted", rid=rid, imm=imm)
        except Exception as exc:  # report every failure; the worker keeps serving
            self._settle(transfers)
            log.warning("prefill worker %s: request %d failed: %r", self.name, rid, exc)
            self._reply("prefill_failed", rid=rid, imm=imm, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._aborted.discard(key)
            if table is not None:
                table.release()

    def _replay(self, src_pages: list[int], dst_pages: list[int]) -> float:
        """Rewrite the request's pages (identical bytes, no immediate) with every layer in
        flight at once, as the handoff issues them; return the seconds it took."""
        lay, dst = self.layout, self.dst_layout
        assert dst is not None and self.dst_desc is not None
        t0 = time.perf_counter()
        writes = [self.engine.write_pages(
            self.region, self.dst_desc, src_pages=src_pages, dst_pages=dst_pages,
            page_size=lay.page_bytes, src_offset=layer * lay.layer_bytes,
            dst_offset=layer * dst.layer_bytes, timeout=self.config.timeout)
            for layer in range(lay.num_layers)]
        for t in writes:
            t.wait(self.config.timeout)
        return time.perf_counter() - t0

    def _settle(self, transfers: list[tf.Transfer]) -> None:
        """Wait out (or cancel) issued writes: the source pages are about to be reused."""
        for t in transfers:
            try:
                t.wait(self.config.timeout)
            except tf.TensorFabricError:
                t.cancel()
