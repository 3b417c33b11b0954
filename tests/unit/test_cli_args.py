"""The ``tensorfabric`` command line as a user meets it: bad values are one-line errors with exit
code 2 (no traceback), a missing extra names what to install, ``--version``, clean ``--help``.

Most cases call :func:`tensorfabric.cli.run` (the console script's body) in this process; a few
run the real ``python -m tensorfabric`` to check what reaches the terminal end to end.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("typer")

from tensorfabric.cli import build_command, run  # noqa: E402



def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "says"), [
    (["bench", "--sizes", "garbage"], "'garbage' is not a size"),
    (["bench", "--sizes", "0"], "at least one byte: '0'"),
    (["bench", "--sizes", "1x"], "'1x' is not a size"),
    (["bench", "--sizes", ","], "at least one size"),
    (["bench", "--page-sizes", "x"], "'x' is not a size"),
    (["bench", "--links", "0"], "--links"),
    (["bench", "--budget", "-1"], "must be a positive number, not -1"),
    (["bench", "--budget", "0"], "must be a positive number"),
    (["bench", "--budget", "soon"], "'soon' is not a number"),
    (["bench", "--chunk", "1q"], "'1q' is not a size"),
    (["bench", "--transport", "carrier-pigeon"], "'carrier-pigeon': use one or more of tcp"),
    (["bench", "--transport", "tcp,all"], "all alone"),
    (["bench", "--ops", "write,teleport"], "'teleport'"),
    (["bench", "--port", "70000"], "--port"),
    (["bench", "--link-addrs", "127.0.0.1,fast-nic"], "'fast-nic' is not an IP address"),
    (["bench", "--host", "192.0.2.77"], "192.0.2.77 is not an address of this machine"),
    (["bench", "--connect", "@/nonexistent/peer.addr"], "cannot read /nonexistent/peer.addr"),
    (["bench", "--connect", "zz"], "'zz' is not an engine address"),
    (["bench", "--no-such-flag"], "No such option"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--dtype", "float64"], "'float64': use one of float32"),
    (["generate"], "PROMPT"),
    (["no-such-command"], "No such command"),
    (["plan-weights", "--params", "lots"], "'lots' is not a parameter count"),
    (["plan-weights", "--replicas", "0"], "--replicas"),
    (["plan-weights", "--src-dtype", "fp3"], "unknown dtype 'fp3'"),
    (["plan-weights", "--fanout", "star"], "'star': use direct, chain or tree"),
    (["plan-weights", "--efficiency", "2"], "--efficiency"),
    (["plan-weights", "--dst-gpus", "10", "--replicas", "4"], "multiple of --replicas"),
    (["models", "prune", "--nope"], "No such option"),
])
def test_bad_values_are_one_line_errors_with_exit_code_2(
        capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "error:" in lines[0], err
    assert "Traceback" not in err + out and out == ""


def test_the_size_parser_keeps_every_b(capsys: pytest.CaptureFixture[str]) -> None:
    """It used to strip every "b" (``garbage`` became ``garage`` in the message)."""
    code, _, err = _run(capsys, "bench", "--sizes", "64k,garbage")
    assert code == 2 and "'garbage'" in err and "garage" not in err
    from tensorfabric.bench import parse_size
    from tensorfabric.cli import _types

    assert _types.sizes("4k,,1m") == (4096, 1 << 20)  # empty items are skipped

    assert [parse_size(t) for t in ("512b", "4KiB", "1 MB", "1.5k")] == [512, 4096, 1 << 20, 1536]
    for bad in ("bb", "1bk", "4kk", "-1", "nan", "1e3"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_a_bad_config_file_value_is_a_usage_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "bench.toml"
    cfg.write_text('[bench]\nsizes = ["4k", "lots"]\n')
    code, _, err = _run(capsys, "bench", "--config", str(cfg))
    assert code == 2 and "sizes in" in err and "'lots' is not a size" in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_extra_names_the_pip_extra(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``None`` in ``sys.modules`` makes ``import torch`` fail as on an install without it."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, out, err = _run(capsys, "generate", "hi", "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "pip install 'tensorfabric[llm]'" in err
    assert "Traceback" not in err


def test_our_errors_are_one_line_with_exit_code_1(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A TensorFabricError while the command runs: its class and message, one line."""
    bad = tmp_path / "bench.toml"
    bad.write_text("[bench\nsizes = 1\n")
    code, _, err = _run(capsys, "bench", "--config", str(bad))
    assert code == 1 and "ConfigError" in err and "is not valid TOML" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_version_and_help_end_to_end(child_env) -> None:  # type: ignore[no-untyped-def]
    env = child_env
    ver = subprocess.run([sys.executable, "-m", "tensorfabric", "--version"], env=env,
                         capture_output=True, text=True, timeout=120)
    from tensorfabric import __version__

    assert ver.returncode == 0 and ver.stdout.strip() == f"tensorfabric {__version__}"
    bad = subprocess.run([sys.executable, "-m", "tensorfabric", "bench", "--sizes", "garbage"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "'garbage' is not a size" in bad.stderr


def _commands(command, path=()):  # type: ignore[no-untyped-def]
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_is_clean_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """No ``{prompt}``, ``<bool>``, ``--no-no-...``, ``--help <bool>`` or cut text, in every
    command's help and in the command lists."""
    paths = [p for p, _ in _commands(build_command())]
    assert ("models",) in paths and ("models", "prune") in paths and ("generate",) in paths
    for path in paths:
        code, out, err = _run(capsys, *path, "--help")
        assert code == 0 and err == "", (path, err)
        text = out
        for bad in ("{", "<bool>", "--no-no-", "\u2026"):
            assert bad not in text, (path, bad, text)
        for line in text.splitlines():
            assert not line.rstrip().endswith("...") or line.startswith("Usage:"), (path, line)
    code, out, _ = _run(capsys, "generate", "--help")
    assert "Usage: tensorfabric generate [OPTIONS] PROMPT" in out and "--quiet" in out
    code, out, _ = _run(capsys, "bench", "--help")
    assert "--no-baselines " in out and "--quick " in out


def test_no_arguments_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys)
    assert code == 2 and "Usage: tensorfabric" in out and "models" in out and "--version" in out
