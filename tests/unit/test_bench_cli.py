"""``tensorfabric bench`` end to end: two real engines in two processes, baselines, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from tensorfabric.cli import _bench  # noqa: E402


def _app() -> typer.Typer:
    app = typer.Typer()

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
    cfg.write_text('[bench]\nops = ["write", "pages", "imm"]\n')
    result = CliRunner().invoke(_app(), [
        "bench", "--transport", "tcp", "--config", str(cfg), "--sizes", "64k,4m",
        "--page-sizes", "16k", "--budget", "0.05", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {(r["op"], r["size"], r["page_size"]): r for r in data["rows"]}
    assert set(rows) == {("write", 64 << 10, None), ("write", 4 << 20, None),
                         ("pages", 16 << 20, 16 << 10), ("imm", 8, None), ("imm-echo", 8, None)}
    for r in data["rows"]:
        if r["op"] == "imm-echo":
            continue  # an application-level ping-pong, reported without a baseline
        assert r["transport"] == "tcp" and r["ratio"] is not None and r["ratio"] > 0
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"]
    assert rows[("write", 4 << 20, None)]["baseline"] == "raw socket"
    assert rows[("pages", 16 << 20, 16 << 10)]["baseline"] == "engine write"
    assert rows[("imm", 8, None)]["baseline"] == "raw ping-pong"
    # the receive path holds no per-op buffer: the peer's peak stays near its resident size
    assert data["memory"] and all(m["peer_peak_growth"] < 32 << 20 for m in data["memory"])
    assert png.stat().st_size > 10_000
    assert "raw socket" in result.output


def test_bench_rejects_unknown_transport() -> None:
    result = CliRunner().invoke(_app(), ["bench", "--transport", "carrier-pigeon"])
    assert result.exit_code != 0
    assert "unknown transport" in result.output
