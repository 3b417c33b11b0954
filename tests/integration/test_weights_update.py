"""Weight updates to real replica processes serving the default model.

One publisher per replica dtype lives in the test process; replicas are
``python -m tensorfabric.weights.replica`` processes with the model bound to their slots.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import subprocess_env

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tensorfabric as tf  # noqa: E402
from tensorfabric.weights import (  # noqa: E402
    Faults,
    Publisher,
    WeightPlan,
    model_tensors,
    same_layout,
    specs_of,
)

pytestmark = [pytest.mark.model, pytest.mark.slow]
SECRET = "weights-test-secret"
PROMPT = [1, 504, 3458, 314, 253, 3575, 30]  # fixed token ids


class Replica:
    """A replica process driven over JSON lines."""

    def __init__(self, name: str, publisher: Publisher, tmp: Path, *, model_dir: Path | None,
                 dtype: str = "float32") -> None:
        layout = tmp / f"{name}.layout.json"
        layout.write_text(json.dumps(publisher.plan.layout.to_json()))
        cmd = [sys.executable, "-m", "tensorfabric.weights.replica", "--name", name,
               "--publisher", publisher.engine.address.hex(), "--layout", str(layout),
               "--timeout", "20"]
        if model_dir is not None:
            cmd += ["--model-config", str(model_dir), "--dtype", dtype]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=subprocess_env(TENSORFABRIC_SECRET=SECRET, OMP_NUM_THREADS="1"))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def read(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = json.loads(self.lines.get(timeout=0.5))
                break
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no reply (rc={self.proc.poll()})") from None
        assert "error" not in reply, reply
        return reply

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def logits(self, tmp: Path) -> tuple[int, np.ndarray]:
        out = tmp / f"{self.name}-{time.monotonic_ns()}.npy"
        reply = self.call(cmd="logits", ids=PROMPT, out=str(out))
        return reply["version"], np.load(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def _ref_logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits.float().numpy()


def _ref_generation(model: Any, steps: int) -> np.ndarray:
    ids, out = torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids).logits[0, -1].float()
            out.append(logits.numpy())
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return np.stack(out)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tensorfabric.models import load_model

    torch.set_num_threads(1)  # same reduction order as the single-threaded replicas
    tmp = tmp_path_factory.mktemp("weights")
    lm = load_model(cache=False)  # a private copy: this test rewrites its weights
    model_dir = tmp / "config"
    lm.config.save_pretrained(model_dir)
    v1 = {n: t.clone() for n, t in model_tensors(lm.model).items()}  # not views: kept as v1
    src = specs_of(v1)
    engines = [tf.Engine(secret=SECRET, host="127.0.0.1", port=0, name=f"pub{i}") for i in range(2)]
    pub32 = Publisher(engines[0], WeightPlan(src, same_layout(src), chunk_bytes=16 << 20),
                      fanout="chain", timeout=20)
    pub16 = Publisher(engines[1], WeightPlan(src, same_layout(src, dtype="bfloat16"), chunk_bytes=16 << 20),
                      timeout=20)
    reps = [Replica("b0", pub32, tmp, model_dir=None),  # bytes only: starts fast, heads the chain
            Replica("r0", pub32, tmp, model_dir=model_dir),
            Replica("h0", pub16, tmp, model_dir=model_dir, dtype="bfloat16")]
    for r in reps:
        assert r.read()["ready"]
    pub32.wait_replicas(2)
    pub16.wait_replicas(1)
    state = {"lm": lm, "v1": v1, "tmp": tmp, "pub32": pub32, "pub16": pub16, "reps": reps,
             "model_dir": model_dir}
    yield state
    for r in reps + state.get("extra", []):
        r.kill()
    for p in (pub32, pub16):
        p.close()
    for e in engines:
        e.close()


def test_update_gives_every_replica_the_publishers_logits_and_readers_one_version(fleet: Any) -> None:
    lm, v1, tmp, pub = fleet["lm"], fleet["v1"], fleet["tmp"], fleet["pub32"]
    b0, r0, h0 = fleet["reps"]
    res = pub.publish(v1)
    assert res.ok and sorted(res.updated) == ["b0", "r0"], res
    assert fleet["pub16"].publish(v1).ok
    ref1 = _ref_logits(lm.model)
    version, logits = r0.logits(tmp)
    assert version == 1
    np.testing.assert_array_equal(logits, ref1)  # same dtype: bit-exact
    expect = np.zeros(pub.plan.nbytes, np.uint8)  # the replica layout, built here from v1
    sources = pub.plan.check_sources(v1)
    for c in pub.plan.chunks:
        pub.plan.prepare(c.index, sources, expect)
    assert any(c.source for c in pub.plan.chunks)  # most chunks went straight from v1's memory
    assert b0.call(cmd="digest") == {"version": 1, "crc": zlib.crc32(expect)}
    version, logits16 = h0.logits(tmp)  # converted fp32 -> bf16 on the sending side
    err = np.abs(logits16 - ref1)
    assert version == 1 and err.mean() < 0.5 and err.max() < 3.0, (err.mean(), err.max())
    assert (logits16.argmax(-1) == ref1.argmax(-1)).mean() >= 0.8

    # version 2: every matrix changes; a generation loop runs on r1 throughout the update
    v2 = {n: (t * 1.02 if t.ndim == 2 else t) for n, t in v1.items()}
    gen1 = _ref_generation(lm.model, 3)
    lm.model.load_state_dict(v2, strict=False)
    gen2, ref2 = _ref_generation(lm.model, 3), _ref_logits(lm.model)
    lm.model.load_state_dict(v1, strict=False)
    assert not np.array_equal(gen1, gen2)
    r0.call(cmd="loop", ids=PROMPT, steps=3, out=str(tmp))
    time.sleep(0.5)
    res = pub.publish(v2)
    assert res.ok, res
    runs = r0.call(cmd="stop", until_version=2)["runs"]
    versions = [v for v, _ in runs]
    assert 1 in versions and 2 in versions, versions
    for v, path in runs:  # each whole generation used one version: all-old or all-new
        np.testing.assert_array_equal(np.load(path), gen1 if v == 1 else gen2)
    version, logits = r0.logits(tmp)
    assert version == 2
    np.testing.assert_array_equal(logits, ref2)
    fleet["ref"] = {1: ref1, 2: ref2}
    fleet["v2"] = v2


def test_corrupt_or_incomplete_update_is_rejected_and_old_version_serves(fleet: Any) -> None:
    pub, (b0, r0, _), tmp = fleet["pub32"], fleet["reps"], fleet["tmp"]
    served = pub.version
    ref = fleet["ref"][served]
    pub.faults = Faults(corrupt={3})
    res = pub.publish(fleet["v1"])
    assert set(res.failed) == {"b0", "r0"} and all(w.startswith("corrupt") for w in res.failed.values()), res
    pub.faults = Faults(drop={1})
    t0 = time.monotonic()
    res = pub.publish(fleet["v1"], timeout=3)
    assert set(res.failed) == {"b0", "r0"}, res
    assert all("incomplete" in w for w in res.failed.values()), res
    assert time.monotonic() - t0 < 15
    pub.faults = Faults()
    version, logits = r0.logits(tmp)
    assert version == served
    np.testing.assert_array_equal(logits, ref)
    assert b0.call(cmd="digest")["version"] == served
    assert [r.split(":")[0] for _, r in r0.call(cmd="version")["rejected"]][:2] == ["corrupt", "incomplete"]


def test_killed_replica_does_not_stall_others_and_late_joiner_catches_up(fleet: Any) -> None:
    pub, (b0, r0, _), tmp = fleet["pub32"], fleet["reps"], fleet["tmp"]
    b0.kill()
    t0 = time.monotonic()
    res = pub.publish(fleet["v2"])
    assert time.monotonic() - t0 < 30
    assert res.updated == ["r0"] and res.failed["b0"].startswith("dead"), res
    assert pub.replicas == ["r0"]
    version, logits = r0.logits(tmp)
    assert version == pub.version
    np.testing.assert_array_equal(logits, fleet["ref"][2])
    late = Replica("late", pub, tmp, model_dir=None)  # joins after the fact, bytes only
    fleet["extra"] = [late]
    assert late.read()["ready"]
    assert late.call(cmd="wait", version=pub.version, timeout=20)["version"] == pub.version
    assert late.call(cmd="digest")["crc"] == zlib.crc32(pub.staging.array[: pub.plan.nbytes])
