"""Engine configuration files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tensorfabric as tf


def test_toml_config_with_links_and_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")
    (tmp_path / "a.toml").write_text(
        'name = "a"\nlinks = ["127.0.0.1", "127.0.0.2"]\ntransports = ["tcp"]\n'
        'secret_file = "secret"\ntimeout = 12\n')
    (tmp_path / "b.json").write_text(json.dumps({
        "name": "b", "listen": ["127.0.0.1:0", "127.0.0.2:0"], "secret_file": "secret"}))
    with tf.Engine.from_config(tmp_path / "a.toml") as a, \
            tf.Engine.from_config(tmp_path / "b.json") as b:
        assert a.timeout == 12 and a.name == "a"
        assert [h for h, _ in b.endpoints] == ["127.0.0.1", "127.0.0.2"]
        dst = b.register(np.zeros(16 << 20, np.uint8))
        a.connect(b.address, timeout=30)  # both links up before the write is striped
        a.write(np.ones(16 << 20, np.uint8), dst.descriptor()).wait(30)
        assert dst.array.all()
        sent = next(iter(a.stats()["links"].values()))
        assert len(sent) == 2 and all(n > 0 for n in sent), sent  # both links carried data


@pytest.mark.parametrize("body,match", [
    ('linkz = 3\nsecret_file = "s"', "unknown engine config key"),
    ("listen = 3", "must be a list"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_config_files(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "s").write_text("x")
    path = tmp_path / "e.toml"
    path.write_text(body)
    with pytest.raises(tf.ConfigError, match=match):
        tf.Engine.from_config(path)
    with pytest.raises(tf.ConfigError, match="cannot read config"):
        tf.Engine.from_config(tmp_path / "missing.toml")
