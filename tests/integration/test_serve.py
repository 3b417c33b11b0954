"""The OpenAI-compatible server end to end: real edge + cloud processes, the official client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import httpx
import pytest

from conftest import subprocess_env

pytestmark = [pytest.mark.model, pytest.mark.slow]

PII = {
    "email": "jane.doe@example.com",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "ssn": "123-45-6789",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tensorfabric.serve import ServerProcess

    d = tmp_path_factory.mktemp("serve")
    cfg = d / "serve.yaml"
    record = d / "cloud-received.log"
    cfg.write_text(
        f"server: {{port: 0, max_queue: 16, request_timeout: 120}}\n"
        f"cloud: {{timeout: 60, record_received: {record}}}\n"
        "routing: {policy: confidence, threshold: -0.5, probe_tokens: 4}\n"
    )
    with ServerProcess(cfg, env=subprocess_env(), timeout=400) as s:
        s.record = record  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def client(server):  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=120, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_plain_and_streaming_chat_with_the_openai_client(client) -> None:  # type: ignore[no-untyped-def]
    msgs = ask("What is the capital of France?")
    for tier in ("edge", "cloud"):
        r = client.chat.completions.create(model=f"tensorfabric-{tier}", messages=msgs, max_tokens=12)
        text = r.choices[0].message.content
        assert text and r.usage.completion_tokens > 0
        info = r.model_extra["tensorfabric"]
        assert (info["tier"], info["reason"], info["degraded"]) == (tier, "user_choice", False)
        stream = client.chat.completions.create(
            model=f"tensorfabric-{tier}", messages=msgs, max_tokens=12, stream=True
        )
        pieces, last = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            last = chunk
        assert len(pieces) > 1  # really streamed, token by token
        assert "".join(pieces) == text  # greedy: the stream carries the same answer
        assert last.choices[0].finish_reason in ("stop", "length")
        assert last.model_extra["tensorfabric"]["tier"] == tier


def test_automatic_routing_is_visible(server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{server.url}/chat/completions", timeout=120, json={
        "model": "tensorfabric", "messages": ask("Say hello."), "max_tokens": 6})  # fmt: skip
    assert r.status_code == 200
    info = r.json()["tensorfabric"]
    assert info["reason"] in ("confident", "low_confidence")
    assert info["confidence"] is not None and info["confidence"] <= 0
    assert r.headers["x-tensorfabric-tier"] == info["tier"]
    assert r.headers["x-tensorfabric-route-reason"] == info["reason"]


def test_cloud_process_never_receives_pii(server, client) -> None:  # type: ignore[no-untyped-def]
    text = ("Please repeat my details exactly: email {email}, phone {phone}, card {card}, "
            "IBAN {iban}, SSN {ssn}.").format(**PII)  # fmt: skip
    r = client.chat.completions.create(model="tensorfabric-cloud", messages=ask(text), max_tokens=40)
    info = r.model_extra["tensorfabric"]
    assert info["tier"] == "cloud"
    assert info["pii_replaced"] == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IBAN": 1, "SSN": 1}
    # No placeholder the edge issued may reach the user: they are restored.
    assert not re.search(r"<(EMAIL|PHONE|CARD|IBAN|SSN)_1>", r.choices[0].message.content)
    received = server.record.read_bytes().decode()
    assert "<EMAIL_1>" in received and "<IBAN_1>" in received  # the request did arrive
    for value in PII.values():
        assert value not in received
        assert value.replace(" ", "") not in received.replace(" ", "")


def test_models_health_metrics_and_bad_requests(server) -> None:  # type: ignore[no-untyped-def]
    ids = {m["id"] for m in httpx.get(f"{server.url}/models").json()["data"]}
    assert ids == {"tensorfabric", "tensorfabric-edge", "tensorfabric-cloud"}
    base = server.url.removesuffix("/v1")
    h = httpx.get(f"{base}/health").json()
    assert h["status"] == "ok" and h["cloud"]["available"] is True
    metrics = httpx.get(f"{base}/metrics").text
    assert re.search(r'tensorfabric_requests_total\{degraded="false",reason="user_choice",tier="cloud"\} [1-9]', metrics)
    assert re.search(r'tensorfabric_pii_entities_total\{kind="IBAN"\} [1-9]', metrics)
    assert "tensorfabric_cloud_up 1.0" in metrics
    for body, needle in [
        ({"model": "gpt-9", "messages": ask("x")}, "unknown model"),
        ({"messages": []}, "non-empty list"),
        ({"messages": ask("x"), "max_tokens": 0}, "max_tokens"),
        ({"messages": ask("x"), "n": 2}, "n=1"),
    ]:
        r = httpx.post(f"{server.url}/chat/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/chat/completions", json={"messages": ask("x")},
                   headers={"x-tensorfabric-route": "moon"})  # fmt: skip
    assert r.status_code == 400


def test_50_concurrent_clients_each_answered_or_refused(server) -> None:  # type: ignore[no-untyped-def]
    def one(i: int) -> tuple[int, dict]:
        model = ["tensorfabric-edge", "tensorfabric-cloud", "tensorfabric"][i % 3]
        body = {"model": model, "messages": ask(f"Count to {i % 5 + 2}."), "max_tokens": 3,
                "stream": i % 4 == 0}  # fmt: skip
        with httpx.Client(timeout=180) as c:
            r = c.post(f"{server.url}/chat/completions", json=body)
            if body["stream"] and r.status_code == 200:
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                return 200, json.loads(events[-2])
            return r.status_code, r.json()

    with cf.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    codes = [c for c, _ in results]
    assert len(results) == 50 and set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 16  # max_queue admitted at once, later ones too
    for code, body in results:
        if code == 200:
            assert body["tensorfabric"]["tier"] in ("edge", "cloud")
        else:
            assert body["error"]["code"] == "overloaded" and "retry" in body["error"]["message"]
    h = httpx.get(f"{server.url.removesuffix('/v1')}/health").json()
    assert h["in_flight"] == 0  # nothing left hanging


def test_client_disconnect_mid_stream_frees_the_model(server) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "tensorfabric-edge", "messages": ask("Tell me a long story about dragons."),
            "max_tokens": 200, "stream": True}  # fmt: skip
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server.url}/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # got real text: hang up mid-answer
    r2 = httpx.post(f"{server.url}/chat/completions", timeout=60, json={
        "model": "tensorfabric-edge", "messages": ask("Hi"), "max_tokens": 3})  # fmt: skip
    assert r2.status_code == 200
    h = httpx.get(f"{server.url.removesuffix('/v1')}/health").json()
    assert h["in_flight"] == 0
