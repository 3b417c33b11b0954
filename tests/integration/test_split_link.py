"""What crosses the edge <-> cloud link, seen by a real TCP relay between the tiers.

The cloud tier runs as its own process, the edge as ``tensorfabric serve --role edge`` with
``cloud.address`` pointing at the relay, once with a plain link and once with TLS. Every prompt
of the labelled PII corpus goes to the cloud; none of its values, in any case form, may appear
in what the relay saw or in what the cloud received. With TLS the relay sees no plaintext at
all, and a relay that rewrites "France" into "Norway" changes nothing the model sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _tier_relay import Relay
from conftest import subprocess_env

pytestmark = [pytest.mark.model, pytest.mark.slow]

DATA = Path(__file__).resolve().parent.parent / "data"
SECRET = "link-test-secret"


def _forms(value: str) -> set[str]:
    flat = re.sub(r"[\s.\-/()]", "", value)
    return {f for v in (value, flat) for f in (v, v.lower(), v.upper(), v.title()) if len(f) >= 4}


@pytest.fixture(scope="module", params=["plain", "tls"])
def link(request, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tensorfabric.serve import ServerProcess

    tls = request.param == "tls"
    d = tmp_path_factory.mktemp(f"link-{request.param}")
    record = d / "cloud-received.log"
    tls_cfg = {"enabled": tls, "dir": str(d / "tls")}
    cloud_cfg = {"secret": SECRET, "cloud": {"engine": "transformers", "record_received": str(record),
                                            "tls": tls_cfg}}
    (d / "cloud.json").write_text(json.dumps(cloud_cfg))
    env = subprocess_env()
    cloud = start_cloud(cloud_cfg, env)
    try:
        address = b""
        deadline = time.monotonic() + 400
        assert cloud.stdout is not None
        while not address and time.monotonic() < deadline:
            line = cloud.stdout.readline()
            if not line:
                break
            if line.startswith("TENSORFABRIC_CLOUD_ADDRESS "):
                address = bytes.fromhex(line.split()[1])
        assert address, "the cloud tier did not start"
        from tensorfabric._address import EngineAddress

        ep = EngineAddress.from_bytes(address).endpoints[0]
        with Relay(ep, "record") as relay:
            edge_cfg = d / "edge.yaml"
            edge_cfg.write_text(json.dumps({
                "secret": SECRET, "server": {"port": 0, "request_timeout": 300},
                "edge": {"address_file": str(d / "edge.addr")},
                "cloud": {"launch": "remote", "address": relay.address_via(address).hex(),
                          "tls": tls_cfg},
            }))  # fmt: skip
            with ServerProcess(edge_cfg, env=env, timeout=400, extra_args=["--role", "edge"]) as s:
                s.relay, s.record, s.tls = relay, record, tls  # type: ignore[attr-defined]
                s.cloud, s.cloud_cfg, s.edge_addr = cloud, cloud_cfg, d / "edge.addr"  # type: ignore[attr-defined]
                yield s
    finally:
        cloud.terminate()
        cloud.wait(15)


def start_cloud(cfg: dict, env: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tensorfabric.split", "cloud", "--config-json", json.dumps(cfg)],
        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip


def _health(link) -> dict:  # type: ignore[no-untyped-def]
    try:
        return httpx.get(link.url.removesuffix("/v1") + "/health", timeout=30).json()
    except httpx.HTTPError as exc:
        raise AssertionError(f"edge server unreachable ({exc}):\n" + "".join(link.output[-30:])) from exc


def _wait_cloud(link) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _health(link)["cloud"]["available"]:
        time.sleep(0.5)
    assert _health(link)["cloud"]["available"]


def test_no_labelled_pii_crosses_the_link_in_any_case_form(link) -> None:  # type: ignore[no-untyped-def]
    _wait_cloud(link)
    rows = [json.loads(line) for line in (DATA / "pii_corpus.jsonl").read_text().splitlines()]
    if link.tls:
        # Scrubbing happens before the link and is the same on both: the plain link, whose
        # relay reads plaintext, takes the whole corpus; TLS is shown to carry ciphertext only
        # (and no value) with one request of it, covering every label kind.
        rows = _covering(rows, 30)
    # several prompts per request (one message each) keeps this to a handful of cloud calls
    for i in range(0, len(rows), 30):
        msgs = [{"role": "user", "content": r["text"]} for r in rows[i:i + 30]]
        r = httpx.post(f"{link.url}/chat/completions", timeout=300, json={
            "model": "tensorfabric-cloud", "messages": msgs, "max_tokens": 1})  # fmt: skip
        assert r.status_code == 200, r.text
        info = r.json()["tensorfabric"]
        assert (info["tier"], info["degraded"]) == ("cloud", False), info
    wire = link.relay.seen().decode("latin-1")
    received = link.record.read_bytes().decode()
    assert '"op":"chat"' in received  # the requests did reach the cloud
    for row in rows:
        for lab in row["pii"]:
            for form in _forms(lab["value"]):
                assert form not in received, (lab, form)
                assert form not in wire, (lab, form)
    if link.tls:
        assert '"op"' not in wire and "messages" not in wire  # ciphertext only
        assert _health(link)["cloud"]["tls"] is True
    else:
        assert '"op":"chat"' in wire  # the recording relay does see the plain link


def _covering(rows: list[dict], n: int) -> list[dict]:
    """At most ``n`` rows, first one per PII kind, then in corpus order."""
    picked, kinds = [], set()
    for r in rows:
        new = {lab["kind"] for lab in r["pii"]} - kinds
        if new:
            picked.append(r)
            kinds |= new
    rest = [r for r in rows if r not in picked]
    return (picked + rest)[:n]


def test_streamed_reply_restores_values_the_model_copied(link) -> None:  # type: ignore[no-untyped-def]
    email = "siobhan.featherstone@gmail.com"
    body = {"model": "tensorfabric-cloud", "stream": True, "max_tokens": 40, "messages": [
        {"role": "user", "content": f"Repeat exactly, nothing else: {email}"}]}  # fmt: skip
    with httpx.Client(timeout=300) as c:
        r = c.post(f"{link.url}/chat/completions", json=body)
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert "x-tensorfabric-tier" not in r.headers  # who answered is said at the end only
    assert events[-1]["tensorfabric"]["tier"] == "cloud"
    assert events[-1]["tensorfabric"]["pii_replaced"] == {"EMAIL": 1}
    sent = [json.loads(x) for x in link.record.read_text().splitlines() if '"op":"chat"' in x][-1]
    fake = re.search(r"[\w.]+@example\.org", sent["messages"][0]["content"]).group()
    print(f"\n  cloud saw {fake!r}, the user got {text!r}")
    # Whatever the small model copied of the surrogate (all of it, or the name part), the user
    # gets the original back; no piece of the surrogate reaches the user.
    assert fake.lower() not in text.lower() and fake.split("@")[0].lower() not in text.lower()
    if fake.split("@")[0].split(".")[0].lower() in sent_reply(link).lower():
        assert "siobhan" in text.lower()
    assert email not in link.relay.seen().decode("latin-1")


def sent_reply(link) -> str:  # type: ignore[no-untyped-def]
    """What the cloud streamed back, as the relay saw it on the plain link ("" under TLS)."""
    wire = link.relay.seen().decode("utf-8", "replace")
    return "" if link.tls else "".join(re.findall(r'"event":"delta","text":"([^"]*)"', wire))


def test_a_restarted_cloud_rejoins_the_running_edge(link) -> None:  # type: ignore[no-untyped-def]
    """``serve --role cloud`` started again (new process, new engine address) with
    ``cloud.join`` naming the edge's address file: the running edge takes it back."""
    if link.tls:
        pytest.skip("rejoining is the same on both links; the plain one covers it")
    link.cloud.kill()
    link.cloud.wait(15)
    deadline = time.monotonic() + 10
    while _health(link)["cloud"]["available"]:
        assert time.monotonic() < deadline, "the edge did not notice the cloud was gone"
        time.sleep(0.2)
    cfg = {**link.cloud_cfg, "cloud": {**link.cloud_cfg["cloud"], "join": str(link.edge_addr)}}
    fresh = start_cloud(cfg, subprocess_env())
    try:
        deadline = time.monotonic() + 300
        while not _health(link)["cloud"]["available"]:
            assert fresh.poll() is None, "the new cloud tier exited"
            assert time.monotonic() < deadline, "the restarted cloud did not rejoin"
            time.sleep(0.5)
        r = httpx.post(f"{link.url}/chat/completions", timeout=300, json={
            "model": "tensorfabric-cloud", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})  # fmt: skip
        info = r.json()["tensorfabric"]
        assert (info["tier"], info["degraded"]) == ("cloud", False), info
    finally:
        fresh.terminate()
        fresh.wait(15)
