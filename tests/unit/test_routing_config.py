"""The deployment config schema: defaults, examples and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorfabric.split import SplitConfigError, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORFABRIC_SECRET", raising=False)
    cfg = parse_config(None)
    assert cfg.mode == "route" and cfg.edge.quantize == "none" and cfg.cloud.launch == "local"
    assert cfg.pii.enabled and cfg.routing == {"policy": "confidence"}
    assert len(cfg.resolve_secret()) == 32  # random for a local deployment


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFABRIC_SECRET", "example")
    cfg = load_config(path)
    assert cfg.resolve_secret()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"clod": {}}, r"unknown key\(s\) \['clod'\]"),
        ({"cloud": {"timeot": 3}}, r"cloud: unknown key\(s\) \['timeot'\]"),
        ({"cloud": {"timeout": -1}}, "cloud.timeout: must be positive"),
        ({"server": {"port": 70000}}, "server.port: not a TCP port"),
        ({"server": {"port": "80"}}, "server.port: expected a number"),
        ({"edge": {"quantize": "int4"}}, r"edge.quantize: 'int4' is not one of \['int8', 'none'\]"),
        ({"mode": "pipeline"}, "mode: 'pipeline' is not one of"),
        ({"pii": {"enabled": "yes"}}, "pii.enabled: expected true or false"),
        ({"pii": {"kinds": "EMAIL"}}, "pii.kinds: expected a list of strings"),
        ({"routing": {"policy": "confidence", "treshold": -1}}, r"routing: unknown key\(s\) \['treshold'\]"),
        ({"routing": {"threshold": 2}}, "log-probability"),
        ({"cloud": {"launch": "remote"}}, "needs cloud.address"),
        ({"cloud": {"tls": {"cert": "c.pem"}}}, "both cert and key"),
        ({"edge": []}, "edge: expected a mapping"),
        ({"edge": {"cpus": "one"}}, r"edge.cpus: 'one' is not a CPU list"),
        ({"cloud": {"cpus": "3-1"}}, r"cloud.cpus: bad CPU range '3-1'"),
        ({"cloud": {"cpus": "0,"}}, r"cloud.cpus: '0,' is not a CPU list"),
        ({"cloud": {"cpus": True}}, r"cloud.cpus: expected a CPU list"),
        ({"edge": {"cpus": [0, 1]}}, r"edge.cpus: expected a CPU list"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SplitConfigError, match=message):
        parse_config(data)


def test_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SplitConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cloud: [unclosed\n")
    with pytest.raises(SplitConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("cloud:\n  links: 0\n")
    with pytest.raises(SplitConfigError, match=r"wrong.yaml: cloud.links: must be positive"):
        load_config(wrong)
    remote = parse_config({"cloud": {"launch": "remote", "address": "00"}})
    monkeypatch.delenv("TENSORFABRIC_SECRET", raising=False)
    with pytest.raises(SplitConfigError, match="needs the shared secret"):
        remote.resolve_secret()
    monkeypatch.setenv("MY_SECRET", "abc")
    assert parse_config({"secret": "env:MY_SECRET"}).resolve_secret() == "abc"
    with pytest.raises(SplitConfigError, match="NOPE is not set"):
        parse_config({"secret": "env:NOPE"}).resolve_secret()


def test_tier_cpu_lists(tmp_path: Path) -> None:
    """edge.cpus / cloud.cpus: YAML numbers and ranges are read as CPU lists; a CPU this
    process may not use is refused when the tier starts, naming the key and what is there."""
    import os

    from tensorfabric.split._cpus import parse_cpus, resolve

    f = tmp_path / "serve.yaml"
    f.write_text("edge: {cpus: 1}\ncloud: {cpus: '0,2-3'}\n")
    cfg = load_config(f)
    assert (cfg.edge.cpus, cfg.cloud.cpus) == ("1", "0,2-3")
    assert parse_cpus("cloud.cpus", cfg.cloud.cpus) == {0, 2, 3}
    allowed = sorted(os.sched_getaffinity(0))
    assert resolve("edge.cpus", str(allowed[0])) == {allowed[0]}
    assert resolve("edge.cpus", None) is None
    with pytest.raises(SplitConfigError, match=r"edge.cpus: CPU\(s\) 4095 not available to this process"):
        resolve("edge.cpus", "4095")


def test_serve_refuses_a_cpu_the_host_lacks_in_one_line(tmp_path: Path) -> None:
    """Before anything starts: exit code 2 and a one-line config error, no traceback."""
    import subprocess
    import sys

    f = tmp_path / "serve.yaml"
    f.write_text("server: {port: 0}\nedge: {cpus: '4000-4001'}\n")
    out = subprocess.run([sys.executable, "-m", "tensorfabric", "serve", "--config", str(f)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "edge.cpus: CPU(s) 4000,4001 not available" in out.stderr
    assert "Traceback" not in out.stderr and "cloud tier" not in out.stdout
