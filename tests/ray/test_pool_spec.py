"""Specs and their compilation to Ray label selectors, without a cluster (fast)."""

from __future__ import annotations

import pytest

from tensorfabric.pool import (
    DeploymentSpec,
    NodeClaims,
    NodeView,
    PlacementError,
    SpecError,
    compile_spec,
    match,
)


def node(nid: str, claims: NodeClaims, gpus: float = 1, verified: bool = True) -> NodeView:
    return NodeView(nid * 56, True, {**claims.to_labels(), "ray.io/node-id": nid * 56},
                    total_gpus=gpus, available_gpus=gpus, verified=verified, score=10.0)  # fmt: skip


NODES = [
    node("a", NodeClaims("eu-west", "eu-west-a", "DE", "datacenter", "H100", 80, "ultra")),
    node("b", NodeClaims("eu-north", "eu-north-a", "SE", "miner", "A100", 40, "high")),
    node("c", NodeClaims("us-east", "us-east-a", "US", "consumer", "RTX4090", 24, "medium")),
    node("d", NodeClaims("eu-west", "eu-west-b", "DE", "miner", "A100", 80, "low"), verified=False),
]


def spec(**kw) -> DeploymentSpec:
    return DeploymentSpec.from_dict({"name": "t", "run": {"actor": "m:C"}, **kw})


def test_wildcards_minimums_and_preference_compile_to_valid_ray_selectors():
    ray_labels = pytest.importorskip("ray._private.label_utils")
    p = compile_spec(spec(regions=["eu-*"], gpus=["B200", "A100", "H100"], min_gpu_memory_gb=40,
                          min_link_tier="high", verified_only=True), NODES)  # fmt: skip
    assert p.descriptions == ["gpu=A100", "gpu=H100"]  # B200 is nowhere; order kept
    first = p.candidates[0]
    assert first["tensorfabric.io/region"] == "in(eu-north,eu-west)"
    assert first["tensorfabric.io/link-tier"] == "in(high,ultra)"
    assert first["ray.io/node-id"] == "in(" + ",".join(sorted(["a" * 56, "b" * 56])) + ")"
    for sel in p.candidates:
        assert ray_labels.validate_label_selector(sel) is None, sel
    assert [n.node_id[0] for n in NODES if match(n.labels, first)] == ["b"]
    assert [n.node_id[0] for n in NODES if match(n.labels, p.candidates[1])] == ["a"]
    opts = p.ray_options()
    assert opts["fallback_strategy"] == [{"label_selector": p.candidates[1]}]


def test_zone_preference_puts_other_zones_first():
    p = compile_spec(spec(gpus=["A100"], allow_simulated=True), NODES)
    order = p.preferring_other_zones({"eu-north-a"})
    assert order[0]["tensorfabric.io/zone"] == "!eu-north-a" and order[-1] == p.candidates[0]


@pytest.mark.parametrize(
    "fields, requirement",
    [({"regions": ["ap-*"]}, "regions"), ({"gpus": ["B200"]}, "gpus"),
     ({"countries": ["JP"]}, "countries"), ({"providers": ["datacenter"], "gpus": ["A100"]}, "gpus"),
     ({"min_gpu_memory_gb": 81}, "min_gpu_memory_gb"),
     ({"gpus": ["A100"], "min_link_tier": "ultra"}, "min_link_tier"),
     ({"regions": ["eu-west"], "gpus": ["A100"], "verified_only": True}, "verified_only"),
     ({"gpus": ["A100"], "replicas": 3}, "replicas")],
)  # fmt: skip
def test_unmet_requirement_is_named(fields, requirement):
    with pytest.raises(PlacementError) as info:
        compile_spec(spec(**fields), NODES)
    assert info.value.requirement == requirement, str(info.value)


@pytest.mark.parametrize(
    "data, words",
    [({"name": "t"}, "missing required field 'run'"),
     ({"name": "T!", "run": {"actor": "m:C"}}, "name="),
     ({"name": "t", "run": {"actor": "m.C"}}, "package.module:Name"),
     ({"name": "t", "run": {"actor": "m:C"}, "replicas": 0}, "replicas=0"),
     ({"name": "t", "run": {"actor": "m:C"}, "min_link_tier": "fast"}, "min_link_tier"),
     ({"name": "t", "run": {"actor": "m:C"}, "gpu": ["A100"]}, "unknown field(s) gpu"),
     ({"name": "t", "run": {"serve": "edge"}}, "edges run on the edge devices"),
     ({"name": "t", "run": {"actor": "m:C"}, "start_timeout_s": 0}, "start_timeout_s=0.0"),
     ({"name": "t", "run": {"actor": "m:C"}, "start_timeout_s": "soon"}, "start_timeout_s='soon'")],
)  # fmt: skip
def test_bad_specs_name_the_field(data, words):
    with pytest.raises(SpecError, match=None) as info:
        DeploymentSpec.from_dict(data)
    assert words in str(info.value)


def test_examples_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "examples" / "pool").glob("*.yaml")):
        assert DeploymentSpec.from_yaml(path).name


def test_serve_cloud_is_the_tier_replica():
    s = DeploymentSpec.from_dict({"name": "t", "run": {"serve": "cloud",
                                                       "config": {"cloud": {"model": "x"}}}})
    assert s.run.target == "tensorfabric.pool._tiers:CloudTierReplica"
    assert s.run.kwargs == {"config": {"cloud": {"model": "x"}}}
