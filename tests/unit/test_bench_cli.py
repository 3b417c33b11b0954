"""``tensorfabric bench`` end to end: two real engines in two processes, baselines, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from tensorfabric.cli import _bench  # noqa: E402


def _app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)  # plain errors, as the real CLI prints them

    @app.callback()
    def _group() -> None:  # keeps "bench" a subcommand even when it is the only one
        pass

    _bench.register(app)
    return app


@pytest.mark.slow
def test_bench_quick_tcp_writes_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cfg = tmp_path / "links.toml"
    cfg.write_text('[bench]\nops = ["write", "pages", "imm", "sendrecv"]\n')
    result = CliRunner().invoke(_app(), [
        "bench", "--transport", "tcp", "--config", str(cfg), "--sizes", "64k,4m",
        "--page-sizes", "16k", "--budget", "0.05", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {(r["op"], r["size"], r["page_size"]): r for r in data["rows"]}
    assert {k for k in rows if k[0] != "sendrecv"} == {
        ("write", 64 << 10, None), ("write", 4 << 20, None), ("pages", 16 << 20, 16 << 10),
        ("imm", 8, None), ("imm-echo", 8, None)}
    for r in data["rows"]:
        if r["op"] == "imm-echo":
            continue  # an application-level ping-pong, reported without a baseline
        assert r["transport"] == "tcp" and r["ratio"] is not None and r["ratio"] > 0
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"]
    assert rows[("write", 4 << 20, None)]["baseline"] == "raw socket"
    assert rows[("pages", 16 << 20, 16 << 10)]["baseline"] == "engine write"
    assert rows[("imm", 8, None)]["baseline"] == "raw ping-pong"
    sendrecv = [r for k, r in rows.items() if k[0] == "sendrecv"]
    assert 64 in {r["size"] for r in sendrecv}
    assert all(r["baseline"] == "raw ping-pong" for r in sendrecv)  # paired op by op
    # the receive path holds no per-op buffer: the peer's peak stays near its resident size
    assert data["memory"] and all(m["peer_peak_growth"] < 32 << 20 for m in data["memory"])
    assert png.stat().st_size > 10_000
    assert "raw socket" in result.output


@pytest.mark.parametrize(("args", "says"), [
    (["--transport", "carrier-pigeon"], "use one or more of tcp, shm, nixl"),
    (["--sizes", "garbage"], "'garbage' is not a size"),
    (["--page-sizes", "x"], "'x' is not a size"),
    (["--links", "0"], "--links"),
    (["--budget", "-1"], "must be a positive number"),
])
def test_bench_rejects_bad_values_before_starting_anything(args: list[str], says: str) -> None:
    """Checked while the command line is parsed: usage error (exit code 2), no engine started."""
    result = CliRunner().invoke(_app(), ["bench", *args])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_bench_config_file_values_are_checked_like_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "bench.json"
    cfg.write_text(json.dumps({"bench": {"page_sizes": [4096, "4x"]}}))
    result = CliRunner().invoke(_app(), ["bench", "--config", str(cfg)])
    assert result.exit_code == 2 and "'4x' is not a size" in " ".join(result.output.split())


def _allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.mark.slow
def test_bench_pin_places_the_peers_and_restores_this_thread(tmp_path: Path) -> None:
    """``--pin split``: the engine peer and the raw-socket peer run on the second CPU (the
    latency ratio compares the engine and its baseline under one placement); afterwards this
    thread's CPUs are what they were."""
    import os

    from tensorfabric.bench import BenchConfig
    from tensorfabric.bench._baselines import RawSocketPeer, pin_cpus
    from tensorfabric.bench._runner import PeerProcess

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    assert pin_cpus("same") == ({cpus[0]}, {cpus[0]}) and pin_cpus("split") == ({cpus[0]}, {cpus[1]})
    with pytest.raises(ValueError, match="use same or split"):
        pin_cpus("diagonal")
    peer = PeerProcess("tcp", BenchConfig(), {cpus[1]})
    raw = RawSocketPeer(bufsize=1 << 20, cpus={cpus[1]})
    try:
        assert _allowed(peer.proc.pid) == str(cpus[1])
        assert raw._proc is not None and _allowed(raw._proc.pid) == str(cpus[1])
    finally:
        raw.close()
        peer.proc.kill()
        peer.proc.wait()
    before = os.sched_getaffinity(0)
    out = tmp_path / "pin.json"
    result = CliRunner().invoke(_app(), ["bench", "--transport", "tcp", "--ops", "imm", "--pin", "split",
                                         "--budget", "0.05", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert os.sched_getaffinity(0) == before
    data = json.loads(out.read_text())
    assert data["meta"]["config"]["pin"] == "split"
    assert {r["op"] for r in data["rows"]} == {"imm", "imm-echo"}
    bad = CliRunner().invoke(_app(), ["bench", "--pin", "diagonal"])
    assert bad.exit_code != 0 and "use same or split" in bad.output
