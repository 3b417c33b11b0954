"""The connector's transfer protocol between two real engines, without vLLM: the worker
halves of a prefill and a decode connector over KV buffers shaped like vLLM's CPU cache
(layers as views of one buffer), and the settings, layout and grant checks."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tensorfabric import ConfigError  # noqa: E402
from tensorfabric.vllm import KVLayout, LayoutMismatchError, kv_transfer_config  # noqa: E402
from tensorfabric.vllm._cluster import DisaggCluster  # noqa: E402
from tensorfabric.vllm._proxy import DisaggProxy  # noqa: E402
from tensorfabric.vllm._layout import shm_allocation  # noqa: E402
from tensorfabric.vllm._settings import ConnectorSettings  # noqa: E402
from tensorfabric.vllm._worker import WorkerSide  # noqa: E402

from helpers.vllm_kv import BLOCKS, BS, LAYERS, params_for, side, wait_recv  # noqa: E402


@pytest.fixture
def pd() -> Any:
    p, pc = side("kv_producer")
    d, dc = side("kv_consumer", blocks=BLOCKS + 4)   # only the block count may differ
    yield p, pc, d, dc
    p.close()
    d.close()


def test_blocks_of_every_layer_land_in_the_decoders_blocks(pd: Any) -> None:
    p, pc, d, dc = pd
    assert p.region.descriptor().shm and d.region.descriptor().shm   # vLLM's KV in shm
    for name, t in pc.items():
        t.normal_()
    d.load("r1", [9, 3, 11], 0, params_for(p, "r1", [2, 5, 7], 3 * BS - 2))
    done, failed, bad = wait_recv(d)
    assert done == {"r1"} and not failed and not bad
    for name in pc:
        for src, dst in ((2, 9), (5, 3), (7, 11)):
            assert torch.equal(pc[name][src], dc[name][dst])
        assert not dc[name][0].any()   # nothing else written
    # the prefill side frees the blocks once vLLM has reported the request finished
    assert p.finished_sending(set()) == set()
    assert p.finished_sending({"r1"}) == {"r1"}


def test_a_local_prefix_hit_pulls_only_the_rest(pd: Any) -> None:
    p, pc, d, dc = pd
    for t in pc.values():
        t.normal_()
    d.wait_progress(0)
    t0 = time.monotonic()
    d.load("r2", [4], 2, params_for(p, "r2", [1, 2, 3], 3 * BS))
    d.wait_progress(8)   # an idle vLLM step waits here: the load's end wakes it
    assert time.monotonic() - t0 < 5
    assert wait_recv(d)[0] == {"r2"}
    assert all(torch.equal(pc[n][3], dc[n][4]) for n in pc)


@pytest.mark.parametrize("tamper", ["token", "blocks", "expired"])
def test_forged_reused_or_expired_grants_are_refused(pd: Any, tamper: str) -> None:
    p, pc, d, dc = pd
    for t in pc.values():
        t.fill_(7.0)
    params = params_for(p, "r3", [1, 2], 2 * BS,
                        expiry=time.time() - 1 if tamper == "expired" else None)
    g = params["tf_grant"]
    if tamper == "token":
        g["token"] = "0" * 64
    elif tamper == "blocks":
        g["blocks"] = [1, 2, 8]   # asks for a block the grant did not name
        params["remote_block_ids"] = g["blocks"]
    d.load("r3", [5, 6], 0, params)
    done, failed, bad = wait_recv(d)
    assert done == failed == {"r3"} and bad == {5, 6}
    assert not any(t[5].any() for t in dc.values())   # no page reached the decoder


def test_a_grant_is_used_once(pd: Any) -> None:
    p, pc, d, dc = pd
    params = params_for(p, "r4", [1], BS)
    d.load("r4", [2], 0, params)
    assert wait_recv(d)[1] == set()
    d.load("r4-again", [3], 0, params)
    done, failed, _ = wait_recv(d)
    assert failed == {"r4-again"}


def test_dead_prefill_fails_the_load_fast_and_unasked_blocks_expire(pd: Any) -> None:
    p, pc, d, dc = pd
    params = params_for(p, "r5", [1], BS)
    p.hold({"r6": time.time() + 0.2})
    time.sleep(0.3)
    assert p.finished_sending({"r6"}) == {"r6"}   # nobody asked within hold_s: freed
    p.close()
    t0 = time.monotonic()
    d.load("r5", [2], 0, params)
    done, failed, bad = wait_recv(d)
    assert failed == {"r5"} and bad == {2}
    assert time.monotonic() - t0 < 4   # well before the 5 s transfer timeout


def test_tcp_only_registers_vllms_own_buffer() -> None:
    p, pc = side("kv_producer", transports=["tcp"])
    d, dc = side("kv_consumer", transports=["tcp"])
    try:
        assert not d.region.descriptor().shm
        for t in pc.values():
            t.normal_()
        d.load("r7", [1, 2], 0, params_for(p, "r7", [3, 4], 2 * BS))
        assert wait_recv(d)[0] == {"r7"}
        assert all(torch.equal(pc[n][3:5], dc[n][1:3]) for n in pc)
    finally:
        p.close()
        d.close()


def test_layout_mismatch_is_refused_with_the_difference() -> None:
    a = KVLayout(("l0", "l1"), (0, 10), 1024, (3, 8, 16), "float32", 16, 10)
    b = KVLayout(("l0", "l1"), (0, 20), 1024, (3, 8, 16), "float32", 32, 20)
    a.check_compatible(KVLayout.from_json(a.to_json()))
    with pytest.raises(LayoutMismatchError, match="block_size: decode 16, prefill 32"):
        a.check_compatible(b)
    with pytest.raises(LayoutMismatchError, match="block size 16 and decode block size 32"):
        DisaggCluster(prefill_block_size=16, decode_block_size=32)


def test_settings_and_config_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown tensorfabric connector option"):
        ConnectorSettings.from_extra({"secret": "x", "timeot": 3})
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        kv_transfer_config("decode", secret="x", timeout=0)
    with pytest.raises(ConfigError, match="role must be one of"):
        kv_transfer_config("producer")
    with pytest.raises(ConfigError, match="push_layers must be a whole number >= 1"):
        kv_transfer_config("prefill", secret="x", push_layers=0)
    with pytest.raises(ConfigError, match="mode must be 'push' or 'pull'"):
        DisaggProxy(["http://a"], ["http://b"], mode="fast")
    cfg = kv_transfer_config("prefill", host="10.0.0.1")
    assert cfg["kv_role"] == "kv_producer" and "secret" not in cfg["kv_connector_extra_config"]


def test_shm_allocation_takes_only_the_kv_buffer() -> None:
    got: list[int] = []

    def alloc(n: int) -> Any:
        got.append(n)
        return torch.ones(n, dtype=torch.int8)

    with shm_allocation(alloc):
        kv = torch.zeros(2 << 20, dtype=torch.int8, device="cpu")
        small = torch.zeros(10, dtype=torch.int8)
        other = torch.zeros(2 << 20, dtype=torch.float32)
    assert got == [2 << 20] and kv.all() and not small.any() and not other.any()
    assert torch.zeros(3).sum() == 0   # restored


def test_cli_refuses_bad_arguments_before_starting_anything() -> None:
    typer_testing = pytest.importorskip("typer.testing")
    from tensorfabric.cli import build_app

    runner = typer_testing.CliRunner()
    r = runner.invoke(build_app(), ["vllm-disagg", "--prefill", "0"])
    assert r.exit_code == 2 and "at least one prefill" in r.output
    r = runner.invoke(build_app(), ["vllm-disagg", "--timeout", "-1"])
    assert r.exit_code == 2 and "timeout must be > 0" in r.output


# -- push mode: the prefill side writes layers while it computes them ----------------------

PID = "ab" * 16


def push_params(p: WorkerSide, pid: str = PID) -> dict[str, Any]:
    return {"do_remote_prefill": True, "tf_push": pid, "tf_engine": p.handshake()["address"]}


def wait_for_true(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def compute(p: WorkerSide, pc: dict[str, Any], req: str, blocks: list[int], start: int,
            end: int, prompt: int, *, fill: float, between: Any = None) -> None:
    """One vLLM step of the prefill instance: begin, every layer 'computed' (its blocks
    written) then saved, end."""
    p.begin_step({req: (PID, blocks, start, end, prompt, False)}, [])
    for i, name in enumerate(pc):
        for b in blocks[start // BS:-(-end // BS)]:
            pc[name][b].fill_(fill + i)
        p.pusher.save_layer(name)
        if between is not None and i == 1:
            between()
    p.pusher.end_step()


def test_push_writes_layers_during_the_prefill_and_completes_the_load() -> None:
    p, pc = side("kv_producer", push_layers=2)
    d, dc = side("kv_consumer", blocks=BLOCKS + 4)
    try:
        _push_layer_by_layer(p, pc, d, dc)
    finally:
        p.close()
        d.close()


def _push_layer_by_layer(p: WorkerSide, pc: dict[str, Any], d: WorkerSide,
                         dc: dict[str, Any]) -> None:
    names = list(pc)
    events: list[Any] = []
    p.pushed = lambda *a, **kw: (events.append(kw), WorkerSide.pushed(p, *a, **kw))  # type: ignore[method-assign]
    # the decode instance offers first (it had room), then the prefill computes in two chunks
    d.load("dec-1", [9, 3, 11], 0, push_params(p))
    time.sleep(0.2)   # let the offer land
    seen: list[bool] = []

    def layers_0_1_landed_before_2_is_computed() -> None:
        landed = wait_for_true(lambda: all(torch.equal(pc[n][2], dc[n][9]) for n in names[:2]))
        seen.append(landed and not dc[names[2]][9].any())

    compute(p, pc, "pre-1", [2, 5, 7], 0, 2 * BS, 3 * BS - 2, fill=1.0,
            between=layers_0_1_landed_before_2_is_computed)
    assert seen == [True]
    assert d.finished_recving()[0] == set()   # not complete before the last chunk
    compute(p, pc, "pre-1", [2, 5, 7], 2 * BS, 3 * BS - 2, 3 * BS - 2, fill=1.0)
    done, failed, bad = wait_recv(d)
    assert done == {"dec-1"} and not failed and not bad
    for name in pc:
        for src, dst in ((2, 9), (5, 3), (7, 11)):
            assert torch.equal(pc[name][src], dc[name][dst])
        assert not dc[name][0].any()
    # written layer group by layer group while computing, not after
    assert events and events[0]["writes"] >= 2 and events[0]["early"] >= 2
    assert not events[0]["error"]
    assert p.finished_sending({"pre-1"}) == {"pre-1"}


def test_a_late_offer_catches_up_then_follows_the_layers(pd: Any) -> None:
    p, pc, d, dc = pd
    # layers 0-1 of the only chunk are computed before the offer arrives
    compute(p, pc, "pre-2", [1, 4], 0, 2 * BS - 3, 2 * BS - 3, fill=5.0,
            between=lambda: (d.load("dec-2", [6], 1, push_params(p)), time.sleep(0.3)))
    done, failed, _ = wait_recv(d)
    assert done == {"dec-2"} and not failed
    assert all(torch.equal(pc[n][4], dc[n][6]) for n in pc)   # block 1 only (local prefix)
    # every page written once: the layers of the catch-up write are not written again
    assert wait_for_true(lambda: p.stats["pushes"] == 1)
    assert p.stats["bytes"] == LAYERS * d.layout.block_bytes
    # a second offer for the same push id is refused: no page reaches it
    d.load("dec-2b", [8], 0, push_params(p))
    done, failed, bad = wait_recv(d)
    assert failed == {"dec-2b"} and not any(t[8].any() for t in dc.values())


def test_a_push_for_an_aborted_prefill_fails_the_load_and_frees_both_sides(pd: Any) -> None:
    p, pc, d, dc = pd
    d.load("dec-3", [2], 0, push_params(p))
    time.sleep(0.2)
    p.begin_step({"pre-3": (PID, [3], 0, BS // 2, BS, False)}, [])
    p.pusher.save_layer(next(iter(pc)))
    p.pusher.end_step()
    p.begin_step({}, ["pre-3"])   # vLLM aborted the prefill request
    done, failed, bad = wait_recv(d)
    assert failed == {"dec-3"} and bad == {2}
    p.hold({"pre-3": time.time()})
    assert p.finished_sending({"pre-3"}) == {"pre-3"}


def test_an_offer_nobody_prefills_is_withdrawn_and_answered(pd: Any) -> None:
    p, pc, d, dc = pd
    d.load("dec-4", [2], 0, push_params(p))
    time.sleep(0.2)
    t0 = time.monotonic()
    d.cancel_load("dec-4")   # vLLM aborted the decode request while it waited
    done, failed, bad = wait_recv(d)
    assert failed == {"dec-4"} and time.monotonic() - t0 < 4
    # the prefill request that comes later pushes nothing
    compute(p, pc, "pre-4", [5], 0, BS, BS, fill=2.0)
    assert not any(t[2].any() for t in dc.values())


def test_a_prefill_prefix_cache_hit_is_pushed_too(pd: Any) -> None:
    p, pc, d, dc = pd
    for n in pc:
        pc[n][6].fill_(9.0)   # block 0 of the prompt: computed by an earlier request
    d.load("dec-5", [1, 2], 0, push_params(p))
    time.sleep(0.2)
    compute(p, pc, "pre-5", [6, 7], BS, 2 * BS - 1, 2 * BS - 1, fill=3.0)
    done, failed, _ = wait_recv(d)
    assert done == {"dec-5"} and not failed
    assert all(torch.equal(pc[n][6], dc[n][1]) and torch.equal(pc[n][7], dc[n][2]) for n in pc)
