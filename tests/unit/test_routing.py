"""Routing policies, threshold calibration and the cloud circuit breaker."""

from __future__ import annotations

import threading
import time

import pytest

from tensorfabric.split import (
    CloudHealth,
    ConfidencePolicy,
    Decision,
    FixedPolicy,
    Probe,
    RouteRequest,
    RoutingPolicy,
    SplitConfigError,
    calibrate_threshold,
    make_policy,
)


def req(**kw):  # type: ignore[no-untyped-def]
    base = {"prompt_tokens": 40, "max_tokens": 64}
    base.update(kw)
    return RouteRequest(**base)


def test_user_choice_then_size_then_probe() -> None:
    p = ConfidencePolicy(threshold=-0.5, edge_max_prompt_tokens=100, edge_max_new_tokens=200)
    assert p.pre_route(req(explicit="cloud")) == Decision("cloud", "user_choice")
    assert p.pre_route(req(explicit="edge", prompt_tokens=10_000)) == Decision("edge", "user_choice")
    assert p.pre_route(req(prompt_tokens=101)) == Decision("cloud", "size")
    assert p.pre_route(req(max_tokens=201)) == Decision("cloud", "size")
    assert p.pre_route(req()) is None  # ask the edge model
    sure = Probe([1, 2, 3], [-0.1, -0.2, -0.3], finished=False)
    unsure = Probe([1, 2, 3], [-0.1, -2.5, -0.3], finished=False)
    assert p.after_probe(req(), sure).tier == "edge"
    d = p.after_probe(req(), unsure)
    assert (d.tier, d.reason) == ("cloud", "low_confidence")
    assert d.confidence == pytest.approx(-0.9667, abs=1e-3)
    pmin = ConfidencePolicy(threshold=-1.0, metric="min")
    assert pmin.after_probe(req(), unsure).tier == "cloud"
    assert ConfidencePolicy(allow_user_choice=False).pre_route(req(explicit="cloud")) is None


def test_fixed_policies_and_plugins() -> None:
    assert make_policy({"policy": "edge_only"}).pre_route(req()) == Decision("edge", "edge_only")
    assert make_policy({"policy": "cloud_only"}).pre_route(req(explicit="edge")).tier == "edge"
    assert FixedPolicy("cloud", allow_user_choice=False).pre_route(req(explicit="edge")).tier == "cloud"
    custom = make_policy({"policy": f"{__name__}:PiiToEdge"})
    assert custom.pre_route(req(pii_counts={"EMAIL": 1})) == Decision("edge", "has_pii")
    with pytest.raises(SplitConfigError, match="could not be imported"):
        make_policy({"policy": "nowhere.module:Nope"})
    with pytest.raises(SplitConfigError, match="not a RoutingPolicy"):
        make_policy({"policy": "collections:OrderedDict"})
    with pytest.raises(SplitConfigError, match="unknown routing.policy"):
        make_policy({"policy": "magic"})
    with pytest.raises(SplitConfigError, match="log-probability"):
        ConfidencePolicy(threshold=0.5)


class PiiToEdge(RoutingPolicy):
    """Example plug-in: anything with PII never leaves the edge, the rest goes to the cloud."""

    def pre_route(self, r: RouteRequest) -> Decision | None:
        return Decision("edge", "has_pii") if r.pii_counts else Decision("cloud", "no_pii")


def test_calibrate_threshold_hits_the_target_share() -> None:
    scores = [-0.05, -0.2, -0.4, -0.7, -1.0, -1.3, -2.0, -2.5, -3.0, -4.0]
    for share in (0.0, 0.3, 0.5, 0.8, 1.0):
        t = calibrate_threshold(scores, share)
        kept = sum(s >= t for s in scores) / len(scores)
        assert kept == pytest.approx(share), (share, t)
    with pytest.raises(SplitConfigError):
        calibrate_threshold(scores, 1.5)


def test_breaker_opens_probes_with_backoff_and_closes() -> None:
    up = threading.Event()
    probes: list[float] = []
    changes: list[bool] = []

    def probe() -> bool:
        probes.append(time.monotonic())
        return up.is_set()

    h = CloudHealth(probe, failures_to_open=2, backoff_initial=0.05, backoff_max=0.2,
                    on_change=changes.append)  # fmt: skip
    try:
        h.record_failure("timeout")
        assert h.available  # one failure is not enough
        h.record_failure("timeout")
        assert not h.available and changes == [False]
        time.sleep(0.6)
        assert len(probes) >= 3
        gaps = [b - a for a, b in zip(probes, probes[1:])]
        assert gaps[1] > gaps[0] * 1.5  # exponential backoff
        assert max(gaps) < 0.2 + 0.5  # capped at backoff_max (plus scheduling slack)
        up.set()
        assert h.wait_available(2.0) and changes == [False, True]
        h.record_failure("x")
        h.record_success()
        h.record_failure("y")
        assert h.available  # success resets the consecutive count
    finally:
        h.close()
