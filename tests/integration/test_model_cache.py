"""The model cache with real processes and a real GGUF: two processes that need the same
model at once convert it once (the second waits on the file lock and reads the result), older
entries of the same source go, and ``tensorfabric models`` lists and prunes the cache.

The GGUF is a 4-layer Llama with the default model's metadata and the first 1,000 tokens of
its vocabulary (helpers/tiny_gguf.py): the cache's locking, manifests and pruning do not depend
on the model's size, and its conversion takes seconds where the default model's takes ~30 s of
CPU (that one is converted by the first model test of every fresh machine). One conversion into
a temporary cache directory; everything else reuses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("filelock")

from tensorfabric.models import list_cache, prune_cache  # noqa: E402
from tensorfabric.models._diskcache import MANIFEST, entry_path  # noqa: E402

from conftest import subprocess_env  # noqa: E402
from helpers.tiny_gguf import write_tiny_gguf  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(900)]

_LOAD = """
import json, os, sys, time
import torch, transformers  # imported before the barrier, so both reach the cache together
from tensorfabric.models import load_model
barrier, me, gguf_path = sys.argv[2], sys.argv[3], sys.argv[4]
open(os.path.join(barrier, me), "w").close()
deadline = time.monotonic() + 600
while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
lines = []

def progress(text):
    lines.append(text)
    print(text, file=sys.stderr, flush=True)
    if text.startswith("converting "):  # said holding the lock: hold it 15 s longer
        time.sleep(15)

lm = load_model(gguf_path, cache_dir=sys.argv[1], progress=progress)
w = lm.model.model.layers[3].self_attn.q_proj.weight
print(json.dumps({"from_disk": lm.from_disk_cache, "lines": lines,
                  "fingerprint": float(w.double().sum()), "name": lm.name}), flush=True)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Two processes, each loading the model into one new cache directory that
    already holds an entry of an older tensorfabric and a stale one. They meet at a barrier
    (files in a folder) after importing torch, so both ask for the model at the same moment
    however busy the machine is: one converts while the other waits on the lock. The small
    model converts in a few seconds, so the converter holds the lock 15 s longer (its progress
    callback sleeps on the "converting" line): a process the machine delays that long after
    the barrier still finds the lock taken, not a finished entry."""
    cache = tmp_path_factory.mktemp("models")
    prefix = entry_path(source, "float32", cache).name.rsplit("-", 1)[0]
    legacy = cache / f"{source.stem}-float32-0123456789abcdef"  # no manifest: before format 3
    stale = cache / f"{prefix}-000000000000"  # same source, another digest (changed file)
    other = cache / "other-model-float32-00000000-000000000000"  # another source: kept
    for folder in (legacy, stale, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    barrier = tmp_path_factory.mktemp("barrier")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(cache), str(barrier), str(i), str(source)],
                              env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=800)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return cache, results


def test_two_processes_convert_once_and_share_the_result(converted, source) -> None:  # type: ignore[no-untyped-def]
    cache, results = converted
    converters = [r for r in results if not r["from_disk"]]
    waiters = [r for r in results if r["from_disk"]]
    assert len(converters) == 1 and len(waiters) == 1, results
    said = " | ".join(converters[0]["lines"])
    assert "has no converted copy" in converters[0]["lines"][0]  # said before importing torch
    assert f"converting {source.name}" in said and "converted in" in said
    waited = " | ".join(waiters[0]["lines"])
    assert "waiting for process" in waited and "reuses its result" in waited, waited
    assert converters[0]["fingerprint"] == waiters[0]["fingerprint"]
    entries = [p for p in cache.iterdir() if p.is_dir()]
    names = sorted(p.name for p in entries)
    ours = [n for n in names if n.startswith(source.stem)]
    assert len(ours) == 1, f"one entry for one model, older ones removed: {names}"
    assert "other-model-float32-00000000-000000000000" in names
    manifest = json.loads((cache / ours[0] / MANIFEST).read_text())
    assert manifest["source"] == str(source) and manifest["convert_seconds"] > 0
    assert not list(cache.glob("*.tmp-*"))


def test_models_command_lists_and_prunes(converted, source) -> None:  # type: ignore[no-untyped-def]
    cache, _ = converted

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tensorfabric", "models", *args,
                               "--cache-dir", str(cache)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    text = " ".join(listed.stdout.split())
    assert source.stem in text and str(source) in text
    assert "current" in text and "stale" in text and "KiB" in text  # sizes with units
    entries = {e.name: e for e in list_cache(cache)}
    assert [e.stale for n, e in entries.items() if n.startswith(source.stem)] == [False]
    assert entries["other-model-float32-00000000-000000000000"].stale  # no manifest
    grouped = subprocess.run([sys.executable, "-m", "tensorfabric", "models", "--cache-dir",
                              str(cache), "prune", "--dry-run"], env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    assert "other-model" in grouped.stdout, grouped.stdout  # the group's --cache-dir counts
    dry = cli("prune", "--dry-run")
    assert "would remove" in dry.stdout and "other-model" in dry.stdout
    assert source.stem not in dry.stdout
    assert (cache / "other-model-float32-00000000-000000000000").exists()
    pruned = cli("prune")
    assert pruned.returncode == 0 and "removed 1 entry" in pruned.stdout, pruned.stdout
    assert [e.name.startswith(source.stem) for e in list_cache(cache)] == [True]
    assert prune_cache(cache) == []  # nothing stale is left; the current entry stays

