"""The analytic planner and ``tensorfabric plan-weights``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tensorfabric.weights import Cluster, kimi_k2, predict


def test_kimi_k2_prediction_is_nic_bound_and_near_the_anchor() -> None:
    p = predict(kimi_k2())
    # 4 replicas of 32 GPUs: each GPU receives 1e12 B / 32 = 31.25 GB over 400 Gbit/s * 0.9
    assert p.bytes_per_dst_gpu == pytest.approx(31.25e9)
    assert p.stages["receive (replica links)"] == pytest.approx(31.25 / 45.0)
    assert p.bottleneck == "receive (replica links)"
    assert 0.5 < p.total_s < 1.3  # a fully overlapped pipeline beats the measured 1.3 s


def test_stages_scale_with_hardware_and_fanout() -> None:
    base = Cluster(params=8e9, src_gpus=8, dst_gpus=8, replicas=4, src_bytes=2, dst_bytes=2)
    p1, p2 = predict(base), predict(dataclasses.replace(base, nic_gbit=800))
    assert p2.stages["receive (replica links)"] == pytest.approx(p1.stages["receive (replica links)"] / 2)
    direct = predict(dataclasses.replace(base, fanout="direct"))
    chain = predict(dataclasses.replace(base, fanout="chain"))
    tree = predict(dataclasses.replace(base, fanout="tree", degree=2))
    # direct: the trainer sends the model once per replica; chain/tree: once
    assert direct.stages["send (trainer links)"] == pytest.approx(4 * chain.stages["send (trainer links)"])
    assert tree.stages["forward (relay links)"] == pytest.approx(2 * chain.stages["forward (relay links)"])
    assert chain.fill_s > direct.fill_s  # more hops to fill
    one_host = predict(dataclasses.replace(base, cores=2, checksum_gbs=5.0))
    assert one_host.bottleneck.startswith("host CPU")


def test_one_host_memory_bus_counts_every_pass() -> None:
    """1 replica over shm, zero-copy: checksum (1) + copy (2) + verify (1) = 4 passes of the model
    over the bus; each extra replica adds 3; a converted (staged) model adds the prepare pass."""
    one = Cluster(params=1e9, src_gpus=1, dst_gpus=1, replicas=1, src_bytes=4, dst_bytes=4,
                  staged=0.0, memory_gbs=20.0, link_mem=2.0)
    assert predict(one).stages["host memory bus"] == pytest.approx(4 * 4.0 / 20.0)
    four = dataclasses.replace(one, dst_gpus=4, replicas=4)
    assert predict(four).stages["host memory bus"] == pytest.approx(13 * 4.0 / 20.0)
    bf16 = dataclasses.replace(one, dst_bytes=2, staged=1.0)  # read 4 GB, write 2 GB, then 4 x 2 GB
    assert predict(bf16).stages["host memory bus"] == pytest.approx((6.0 + 4 * 2.0) / 20.0)
    assert predict(dataclasses.replace(one, staged=1.0)).stages["prepare (gather+convert)"] > 0
    assert predict(one).stages["prepare (gather+convert)"] == 0


def test_plan_weights_cli() -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from tensorfabric.cli import _weights

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    _weights.register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["plan-weights", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["cluster"]["params"] == 1e12 and data["prediction"]["total_s"] == pytest.approx(predict(kimi_k2()).total_s)
    res = runner.invoke(app, ["plan-weights"])
    assert res.exit_code == 0 and "1.3 s" in res.output and "bottleneck" in res.output
    res = runner.invoke(app, ["plan-weights", "--params", "135M", "--src-gpus", "1", "--dst-gpus", "4",
                              "--replicas", "4", "--src-dtype", "fp32", "--dst-dtype", "bf16", "--json"])
    assert json.loads(res.output)["cluster"]["params"] == 135e6
    res = runner.invoke(app, ["plan-weights", "--dst-dtype", "fp7"])
    assert res.exit_code != 0
