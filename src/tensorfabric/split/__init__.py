"""Edge/cloud split inference: PII scrubbing, routing, tiers, layer-split mode.

    from tensorfabric.split import PiiScrubber
    text, mapping = PiiScrubber().scrub("mail me at jane@example.com")
    # text == "mail me at laura.keller@example.org" (a surrogate of the same kind);
    # mapping.restore(reply) puts the original back

torch/transformers load only when a tier or model is built (``pip install 'tensorfabric[llm]'``).
See docs/split.md.
"""

from __future__ import annotations

from ._config import DeployConfig, load_config, parse_config
from ._errors import (
    CloudFailed,
    CloudRequestError,
    CloudUnavailable,
    InvalidRequest,
    Overloaded,
    SplitConfigError,
    SplitError,
)
from ._health import CloudHealth
from ._pii import (
    Entity,
    GazetteerNameDetector,
    NameDetector,
    PiiMapping,
    PiiScrubber,
    Recognizer,
    StreamRestorer,
    iban_valid,
    luhn_valid,
)
from ._routing import (
    ConfidencePolicy,
    Decision,
    FixedPolicy,
    Probe,
    RouteRequest,
    RoutingPolicy,
    calibrate_threshold,
    make_policy,
)

__all__ = [
    # config
    "DeployConfig",
    "load_config",
    "parse_config",
    # PII
    "Entity",
    "GazetteerNameDetector",
    "NameDetector",
    "PiiMapping",
    "PiiScrubber",
    "Recognizer",
    "StreamRestorer",
    "iban_valid",
    "luhn_valid",
    # routing
    "ConfidencePolicy",
    "Decision",
    "FixedPolicy",
    "Probe",
    "RouteRequest",
    "RoutingPolicy",
    "calibrate_threshold",
    "make_policy",
    # health and errors
    "CloudHealth",
    "CloudFailed",
    "CloudRequestError",
    "CloudUnavailable",
    "InvalidRequest",
    "Overloaded",
    "SplitConfigError",
    "SplitError",
]
