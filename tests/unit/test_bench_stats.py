"""The bench's pure helpers: sizes, striping split, percentiles, table, config files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorfabric.bench._baselines import _split
from tensorfabric.bench._stats import Row, format_table, parse_size, percentile
from tensorfabric.testing.netns import parse_rate


@pytest.mark.parametrize(
    ("text", "value"),
    [("4k", 4096), ("64KiB", 65536), ("1m", 1 << 20), ("256MiB", 256 << 20), ("1g", 1 << 30),
     ("123", 123)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_zero() -> None:
    with pytest.raises(ValueError):
        parse_size("0")


@pytest.mark.parametrize(
    ("text", "bits"),
    [("200mbit", 200e6), ("1gbit", 1e9), ("50mbps", 400e6), (1e6, 1e6), ("100kbit", 1e5)],
)
def test_parse_rate(text: str | float, bits: float) -> None:
    assert parse_rate(text) == bits


@given(size=st.integers(1, 1 << 30), parts=st.integers(1, 8),
       chunk=st.sampled_from([1, 4096, 1 << 20]))
def test_split_covers_every_byte_once_in_whole_chunks(size: int, parts: int, chunk: int) -> None:
    jobs = _split(size, parts, chunk)
    assert 1 <= len(jobs) <= parts
    pos = 0
    for off, n in jobs:
        assert off == pos and n > 0
        assert off % chunk == 0
        pos += n
    assert pos == size


def test_percentile_and_table() -> None:
    vals = [float(i) for i in range(1, 101)]
    assert percentile(vals, 50) in (50.0, 51.0)
    assert percentile(vals, 99) == 99.0
    row = Row("write", "tcp", 2, 64 << 20, 3.5, 52.1, 19000.0, 21000.0, "raw socket", 4.0, 0.875)
    table = format_table([row])
    assert "64 MiB" in table and "0.88" in table and "raw socket" in table


def test_config_file_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    typer = pytest.importorskip("typer")
    del typer
    from tensorfabric.cli._bench import load_config

    j = tmp_path / "links.json"
    j.write_text(json.dumps({"links": 2, "link_addrs": ["10.0.0.1", "10.0.1.1"]}))
    t = tmp_path / "links.toml"
    t.write_text('[bench]\nlinks = 2\nlink_addrs = ["10.0.0.1", "10.0.1.1"]\n')
    y = tmp_path / "links.yaml"
    y.write_text("links: 2\nlink_addrs: [10.0.0.1, 10.0.1.1]\n")
    for path in (j, t, y):
        assert load_config(path) == {"links": 2, "link_addrs": ["10.0.0.1", "10.0.1.1"]}
