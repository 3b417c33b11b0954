"""Weight updates into vLLM without vLLM: the plan to vLLM's fused layout, keyed checksums,
single-slot staging, the control routes' request signatures and the switch's gate."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.weights import (LayoutError, NoVersionError, Publisher, SlotSet, Subscriber,
                                  WeightPlan, specs_of)
from tensorfabric.weights._dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from tensorfabric.weights._plan import checksum, chunk_key, weights_key
from tensorfabric.weights._vllm_layout import check_vllm_layout, vllm_layout

from helpers.weights import engine_fleet, expected_bytes, replica_bytes

SECRET = "vllm-plan-unit"


def _llama(seed: int, layers: int = 2, bias: bool = False, untied: bool = False) -> dict[str, np.ndarray]:
    """A tiny Llama-style checkpoint: 4 q heads, 2 kv heads of 4, hidden 16, mlp 24."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((50, 16), dtype=np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (16, 16)), ("self_attn.k_proj", (8, 16)),
                            ("self_attn.v_proj", (8, 16)), ("self_attn.o_proj", (16, 16)),
                            ("mlp.gate_proj", (24, 16)), ("mlp.up_proj", (24, 16)),
                            ("mlp.down_proj", (16, 24))):
            w[p + name + ".weight"] = rng.standard_normal(shape, dtype=np.float32)
            if bias and name.startswith("self_attn") and name != "self_attn.o_proj":
                w[p + name + ".bias"] = rng.standard_normal(shape[0], dtype=np.float32)
        w[p + "input_layernorm.weight"] = rng.standard_normal(16, dtype=np.float32)
    w["model.norm.weight"] = rng.standard_normal(16, dtype=np.float32)
    if untied:
        w["lm_head.weight"] = rng.standard_normal((50, 16), dtype=np.float32)
    return w


def _views(plan: WeightPlan, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return plan.layout.views(np.frombuffer(bytearray(expected_bytes(plan, w)), np.uint8))


def test_qkv_and_gate_up_are_fused_in_vllm_row_order() -> None:
    w = _llama(1, bias=True)
    dest = vllm_layout(specs_of(w))
    plan = WeightPlan(specs_of(w), dest)
    names = [s.name for s in plan.layout.specs]
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert "model.layers.0.self_attn.qkv_proj.bias" in names
    assert not any(n.endswith((".q_proj.weight", ".k_proj.weight", ".up_proj.weight")) for n in names)
    shapes = {s.name: s.shape for s in plan.layout.specs}
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (32, 16)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (48, 16)
    v = _views(plan, w)
    p = "model.layers.1."
    np.testing.assert_array_equal(v[p + "self_attn.qkv_proj.weight"], np.concatenate(
        [w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"], w[p + "self_attn.v_proj.weight"]]))
    np.testing.assert_array_equal(v[p + "self_attn.qkv_proj.bias"], np.concatenate(
        [w[p + "self_attn.q_proj.bias"], w[p + "self_attn.k_proj.bias"], w[p + "self_attn.v_proj.bias"]]))
    np.testing.assert_array_equal(v[p + "mlp.gate_up_proj.weight"],
                                  np.concatenate([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]))
    np.testing.assert_array_equal(v[p + "mlp.down_proj.weight"], w[p + "mlp.down_proj.weight"])


def test_served_dtype_conversion_and_tied_head() -> None:
    w = _llama(2, untied=True)
    tied = WeightPlan(specs_of(w), vllm_layout(specs_of(w), dtype="bfloat16"))
    assert "lm_head.weight" not in tied.layout.index  # vLLM ties it to embed_tokens
    assert {s.dtype for s in tied.layout.specs} == {"bfloat16"}
    v = _views(tied, w)
    q = "model.layers.0.self_attn.qkv_proj.weight"
    assert v[q].dtype == np.uint16  # bf16 bits
    np.testing.assert_array_equal(v[q][:16], f32_to_bf16_bits(w["model.layers.0.self_attn.q_proj.weight"]))
    assert np.abs(bf16_bits_to_f32(v[q][:16]) - w["model.layers.0.self_attn.q_proj.weight"]).max() < 0.02
    untied = WeightPlan(specs_of(w), vllm_layout(specs_of(w), tied_embeddings=False))
    np.testing.assert_array_equal(_views(untied, w)["lm_head.weight"], w["lm_head.weight"])


def test_incomplete_groups_and_a_model_mismatch_are_refused() -> None:
    w = _llama(3, layers=1)
    del w["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(LayoutError, match="v_proj"):
        vllm_layout(specs_of(w))
    w = _llama(3, layers=1)
    del w["model.layers.0.mlp.gate_proj.weight"]
    with pytest.raises(LayoutError, match="up_proj"):
        vllm_layout(specs_of(w))
    w = _llama(3, layers=1)
    plan = WeightPlan(specs_of(w), vllm_layout(specs_of(w)))
    vllm = {s.name: (s.shape, s.dtype) for s in plan.layout.specs}
    vllm["model.layers.0.extra.weight"] = ((4,), "float32")  # the model may have more
    check_vllm_layout(plan.layout, vllm)
    bad = dict(vllm, **{"model.layers.0.self_attn.qkv_proj.weight": ((48, 16), "float32")})
    with pytest.raises(LayoutError, match=r"qkv_proj.weight: vLLM has \(48, 16\)"):
        check_vllm_layout(plan.layout, bad)
    with pytest.raises(LayoutError, match="bfloat16"):
        check_vllm_layout(WeightPlan(specs_of(w), vllm_layout(specs_of(w), dtype="bfloat16")).layout, vllm)
    del vllm["model.norm.weight"]
    with pytest.raises(LayoutError, match="model.norm.weight: not a parameter"):
        check_vllm_layout(plan.layout, vllm)


def test_a_vocabulary_vllm_padded_takes_the_trainers_rows_and_nothing_else_does() -> None:
    """vLLM pads the vocabulary to a multiple of 64 rows (1000 -> 1024): the trainer's
    embedding (50 rows) fits it (64) as its first rows. Padding to anything but the next
    multiple of 64, fewer rows anywhere else, more rows, or another width are refused."""
    w = _llama(3, layers=1)
    plan = WeightPlan(specs_of(w), vllm_layout(specs_of(w)))
    vllm = {s.name: (s.shape, s.dtype) for s in plan.layout.specs}
    rows, width = vllm["model.embed_tokens.weight"][0]
    assert rows == 50
    check_vllm_layout(plan.layout, dict(vllm, **{"model.embed_tokens.weight": ((64, width), "float32")}))
    for shape in ((rows - 1, width), (64, width + 1), (74, width), (128, width), (rows + 1, width)):
        with pytest.raises(LayoutError, match="embed_tokens"):
            check_vllm_layout(plan.layout, dict(vllm, **{"model.embed_tokens.weight": (shape, "float32")}))
    norm = vllm["model.norm.weight"][0]
    with pytest.raises(LayoutError, match="model.norm.weight"):
        check_vllm_layout(plan.layout, dict(vllm, **{"model.norm.weight": ((norm[0] + 24,), "float32")}))


def test_poly1305_checksums_are_keyed_per_session_version_and_chunk() -> None:
    data = np.arange(1 << 16, dtype=np.uint8)
    key = weights_key("one secret")
    s1, s2 = b"\x01" * 16, b"\x02" * 16
    tag = checksum(data, "poly1305", key=chunk_key(key, s1, 3, 0))
    assert tag == checksum(data.copy(), "poly1305", key=chunk_key(key, s1, 3, 0))
    others = [chunk_key(weights_key("another"), s1, 3, 0), chunk_key(key, s2, 3, 0),
              chunk_key(key, s1, 4, 0), chunk_key(key, s1, 3, 1)]
    assert all(checksum(data, "poly1305", key=k) != tag for k in others)
    flipped = data.copy()
    flipped[-1] ^= 1
    assert checksum(flipped, "poly1305", key=chunk_key(key, s1, 3, 0)) != tag
    with pytest.raises(LayoutError, match="32-byte"):
        checksum(data, "poly1305")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_keyed_update_over_single_slot_staging(transport: str) -> None:
    """The publisher and replica share the key: updates verify. A replica with another key
    rejects every chunk; a replica that requires keys refuses an unkeyed round."""
    w1, w2 = _llama(1), _llama(2)
    plan = WeightPlan(specs_of(w1), vllm_layout(specs_of(w1)), chunk_bytes=4096)
    with engine_fleet(transport, 4, SECRET, "k") as engs, \
            Publisher(engs[0], plan, key=weights_key(SECRET), timeout=5) as pub:
        assert pub.checksum == "poly1305"
        good = Subscriber(engs[1], engs[0].address, plan.layout, name="good", timeout=5,
                          key=weights_key(SECRET), single_slot=True)
        wrong = Subscriber(engs[2], engs[0].address, plan.layout, name="wrong", timeout=5,
                           key=weights_key("not the secret"), single_slot=True)
        pub.wait_replicas(2, timeout=10)
        res = pub.publish(w1)
        assert res.updated == ["good"] and res.failed["wrong"].startswith("corrupt"), res
        assert replica_bytes(good) == (1, expected_bytes(plan, w1))
        with pytest.raises(NoVersionError):
            wrong.slots.acquire().__enter__()
        pub.checksum = "xxh3" if "xxh3" in tf.weights.CHECKSUMS else "crc32"  # a downgrade
        res = pub.publish(w2)
        assert "requires a keyed checksum" in res.failed["good"], res
        assert replica_bytes(good) == (1, expected_bytes(plan, w1))  # refused before the slot
        good.close()
        wrong.close()
    with pytest.raises(tf.weights.WeightsError, match="keyed"):
        with tf.Engine(secret=SECRET) as e:
            Publisher(e, plan, checksum="poly1305")


def test_single_slot_readers_and_writer_exclude_each_other() -> None:
    w = _llama(4, layers=1)
    plan = WeightPlan(specs_of(w), vllm_layout(specs_of(w)))
    slots = SlotSet(plan.layout, [np.zeros(plan.nbytes, np.uint8)])
    assert slots.reserve(1.0) == 0
    slots.commit(0, 1)
    lease = slots.acquire()
    assert lease.__enter__().version == 1
    with pytest.raises(tf.TransferTimeout, match="reader"):
        slots.reserve(0.2)  # the one buffer is being read: no writer
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(slots.reserve(5.0)))
    t.start()
    time.sleep(0.1)
    lease.__exit__(None, None, None)
    t.join(5)
    assert got == [0]
    with pytest.raises(NoVersionError):  # being overwritten: nothing to lease
        slots.acquire().__enter__()
    slots.abort(0)
    with pytest.raises(NoVersionError):  # an aborted write leaves no version
        slots.acquire().__enter__()
    assert slots.reserve(1.0) == 0
    slots.commit(0, 3)
    with slots.acquire() as snap:
        assert snap.version == 3


def test_control_request_signatures() -> None:
    """The middleware's check: right secret and path pass once; a replay, another path or body,
    a wrong secret or a stale time are refused."""
    import os

    from tensorfabric.vllm._weights_http import AUTH_HEADER, WeightsMiddleware, sign_headers

    os.environ["TENSORFABRIC_SECRET"] = SECRET
    try:
        mw = WeightsMiddleware(app=None)
    finally:
        del os.environ["TENSORFABRIC_SECRET"]
    path, body = "/tensorfabric/weights/switch", b'{"version": 2}'

    def scope(h: dict[str, str], p: str = path) -> dict:
        return {"path": p, "headers": [(k.encode(), v.encode()) for k, v in h.items()]}

    h = sign_headers(SECRET, path, body)
    assert mw._check_auth(scope(h), body) == ""
    assert "replayed" in mw._check_auth(scope(h), body)
    assert "bad MAC" in mw._check_auth(scope(sign_headers(SECRET, path, body), "/tensorfabric/weights/join"), body)
    assert "bad MAC" in mw._check_auth(scope(sign_headers(SECRET, path, body)), b'{"version": 3}')
    assert "bad MAC" in mw._check_auth(scope(sign_headers("guess", path, body)), body)
    ts, nonce, mac = sign_headers(SECRET, path, body)[AUTH_HEADER].split(":")
    assert "stale" in mw._check_auth(scope({AUTH_HEADER: f"{float(ts) - 600}:{nonce}:{mac}"}), body)
    assert "malformed" in mw._check_auth(scope({}), body)
    assert "no TENSORFABRIC_SECRET" in WeightsMiddleware(app=None)._check_auth(scope(h), body)


class _EngineClient:
    """What the middleware uses of vLLM's engine client: ``collective_rpc`` (our worker
    extension's methods; here a switch serves the version asked for) and
    ``reset_prefix_cache``. ``hang`` makes every RPC wait (an engine stuck in a step)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hang = False

    async def collective_rpc(self, method: str, timeout: float, args: tuple = ()) -> list:
        import asyncio

        self.calls.append(method)
        if self.hang:
            await asyncio.sleep(3600)
        return [{"serving": int(args[0])} if method == "tf_weights_switch" else {}]

    async def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


def test_a_switch_drains_holds_new_requests_and_says_what_is_stuck(monkeypatch) -> None:
    """The middleware's gate driven as ASGI (the vLLM tier drives it inside real servers): a
    switch waits for the request in flight (it is served by, and stamped with, the old
    version), holds a request that arrives meanwhile until the new version serves it; a
    request cancelled mid-flight leaves the count; a drain that runs out names the oldest
    request and says whether the engine still answers a state RPC."""
    import asyncio

    from tensorfabric.vllm import _weights_http
    from tensorfabric.vllm._weights_http import HEADER, WeightsMiddleware, _Busy

    monkeypatch.setattr(_weights_http, "_PROBE_S", 0.2)
    gates: dict[str, asyncio.Event] = {}
    entered: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        entered.append(scope["path"])
        await gates[scope["path"]].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        mw, engine = WeightsMiddleware(app), _EngineClient()

        async def request(path: str) -> str:
            gates[path] = asyncio.Event()
            sent: list[dict] = []

            async def receive() -> dict:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(msg: dict) -> None:
                sent.append(msg)

            await mw({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
            return dict(sent[0]["headers"])[HEADER.encode()].decode()

        async def settle() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        old = asyncio.create_task(request("/v1/old"))
        await settle()
        switch = asyncio.create_task(mw._switch(engine, 2, drain_s=30))
        await settle()
        new = asyncio.create_task(request("/v1/new"))
        await settle()
        assert "tf_weights_switch" not in engine.calls and entered == ["/v1/old"]  # draining
        gates["/v1/old"].set()
        assert await old == "0"
        assert (await switch)["serving"] == 2
        assert engine.calls == ["tf_weights_switch", "reset_prefix_cache"]
        gates["/v1/new"].set()
        assert await new == "2" and entered == ["/v1/old", "/v1/new"]

        cancelled = asyncio.create_task(request("/v1/cancelled"))
        await settle()
        cancelled.cancel()
        await settle()
        await asyncio.wait_for(mw._switch(engine, 3, drain_s=30), 10)  # nothing left running

        stuck = asyncio.create_task(request("/v1/stuck"))
        await settle()
        with pytest.raises(_Busy, match=r"1 request\(s\) still running after 0 s \(the oldest, "
                                        r"/v1/stuck, .* the engine answers a state RPC"):
            await mw._switch(engine, 4, drain_s=0.1)
        engine.hang = True
        with pytest.raises(_Busy, match="/v1/stuck.* the engine did not answer a state RPC"):
            await mw._switch(engine, 4, drain_s=0.1)
        assert mw.version == 3 and mw._open.is_set()  # refused: still serving 3, admitting
        gates["/v1/stuck"].set()
        assert await stuck == "3"

    asyncio.run(main())


def test_in_place_switch_maps_tensors_one_to_one_or_not_at_all() -> None:
    """The in-place switch's check on real torch modules: tensors that each have a parameter
    of the same shape are copied in (and the model keeps no pointer into staging); one missing
    or misshapen tensor makes the whole switch go to vLLM's reload, with nothing changed."""
    torch = pytest.importorskip("torch")
    from tensorfabric.vllm._weights_ext import _apply_in_place, _in_place_steps

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    staged = {k: torch.randn_like(v) for k, v in before.items()}
    assert _in_place_steps(model, iter({**staged, "0.missing": staged["0.bias"]}.items())) is None
    assert _in_place_steps(model, iter({**staged, "1.weight": torch.zeros(4)}.items())) is None
    assert _in_place_steps(model, iter({"2.weight": torch.zeros(3)}.items())) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    steps = _in_place_steps(model, iter(staged.items()))
    assert steps is not None and len(steps) == 4
    _apply_in_place(model, steps)
    assert all(torch.equal(v, staged[k]) for k, v in model.state_dict().items())
    for t in staged.values():   # the next version overwrites staging: the model must not follow
        t.zero_()
    assert not torch.equal(model[0].weight, staged["0.weight"])
