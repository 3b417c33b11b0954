"""The MoE layer a CPU user can build today: the same routing bookkeeping as
:class:`tensorfabric.moe.ExpertParallel` (``plan_dispatch`` / ``plan_experts`` / the weighted
sum), with torch.distributed ``all_to_all_single`` on gloo as the transport. It needs a counts
all-to-all first (the receivers' split sizes), then one for the rows and one for the slot
tables; combine is one all-to-all. A baseline for ``bench --moe``, checked against
ExpertParallel's output in the same run."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..moe import _tensors as tx
from ..moe._plan import plan_dispatch, plan_experts


class GlooLayer:
    def __init__(self, rank: int, world: int, experts: int, hidden: int, topk: int,
                 max_tokens: int) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.world, self.topk, self.max_tokens = rank, world, topk, max_tokens
        self.local = experts // world
        self.row = hidden * 2  # bfloat16
        self.zero = max_tokens * topk

    def _a2a(self, send: Any, send_splits: list[int], recv_splits: list[int], dtype: Any,
             width: int) -> Any:
        out = self.torch.empty((sum(recv_splits), width), dtype=dtype)
        self.dist.all_to_all_single(out, send, recv_splits, send_splits)
        return out

    def dispatch(self, x: Any, ids: np.ndarray, w: np.ndarray) -> list[Any]:
        torch = self.torch
        xb, kind = tx.rows(x, "tokens", self.row // 2)
        plan = plan_dispatch(ids, self.world, self.local, self.zero)
        n_out = [len(r) for r in plan.rows]
        counts = torch.tensor(n_out, dtype=torch.int64)
        n_in_t = torch.empty(self.world, dtype=torch.int64)
        self.dist.all_to_all_single(n_in_t, counts)  # receivers learn their split sizes
        n_in = n_in_t.tolist()
        order = np.concatenate(plan.rows)
        rows_u8 = xb.view(np.uint8).reshape(len(xb), self.row)
        send_rows = torch.from_numpy(np.take(rows_u8, order, axis=0, mode="clip"))
        meta = np.ascontiguousarray(np.concatenate(plan.meta).astype(np.int16))
        send_meta = torch.from_numpy(meta.view(np.uint8))  # gloo moves no int16
        recv_rows = self._a2a(send_rows, n_out, n_in, torch.uint8, self.row).numpy()
        recv_meta = self._a2a(send_meta, n_out, n_in, torch.uint8,
                              2 * self.topk).numpy().view(np.int16)
        starts = np.concatenate([[0], np.cumsum(n_in)])
        metas = [recv_meta[starts[s]:starts[s + 1]] for s in range(self.world)]
        ep = plan_experts(metas, self.max_tokens, self.local)
        src = ep.gather // self.max_tokens
        idx = starts[src] + ep.gather % self.max_tokens
        X = np.take(recv_rows, idx, axis=0, mode="clip")
        self.state = (plan, ep, w, kind)
        typed = tx.wrap(X.view(np.int16), kind)
        bounds = np.concatenate([[0], np.cumsum(ep.counts)])
        self.tokens = typed
        return [typed[int(bounds[e]):int(bounds[e + 1])] for e in range(self.local)]

    def combine(self, out: Any) -> Any:
        torch = self.torch
        plan, ep, w, kind = self.state
        ob = tx.rows(out, "outputs", self.row // 2)[0].view(np.uint8).reshape(-1, self.row)
        order = np.concatenate(ep.replies)
        send = torch.from_numpy(np.take(ob, order, axis=0, mode="clip"))
        send_splits = [len(r) for r in ep.replies]
        recv_splits = [int(p) for p in plan.pairs]
        got = self._a2a(send, send_splits, recv_splits, torch.uint8, self.row).numpy()
        table = np.zeros((self.zero + 1, self.row), np.uint8)
        table[:len(got)] = got
        return tx.weighted_sum(table.view(np.int16), plan.pos, w, kind)
