"""Engine configuration files (TOML, JSON or YAML) for links, NICs, TLS and timeouts.

Example (``engine.toml``)::

    name = "trainer-0"
    listen = ["10.0.1.1:7000", "10.0.2.1:7000"]   # one listener per NIC
    links = ["10.0.1.1", "10.0.2.1"]              # one link per local NIC, to each peer
    transports = ["tcp"]
    timeout = 60
    secret_file = "/etc/tensorfabric/secret"        # never put the secret itself in here

    [tls]
    cert = "/etc/tensorfabric/node.pem"
    key = "/etc/tensorfabric/node.key"
    ca = "/etc/tensorfabric/ca.pem"
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

from ._errors import ConfigError

_ENGINE_KEYS = {
    "host", "port", "listen", "links", "transports", "timeout", "name", "chunk_bytes",
    "connect_timeout", "link_timeout", "reconnect_grace", "inbox_bytes", "inbox_peer_bytes",
    "nixl",
}
_ALL_KEYS = _ENGINE_KEYS | {"secret_file", "tls"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, JSON or YAML file into a dict (by extension)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML config files need pyyaml: pip install pyyaml") from None
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {p} must end in .toml, .json, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"config file {p} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/mapping at the top level")
    return data


def engine_kwargs(data: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """Turn a config mapping into ``Engine(**kwargs)``, with clear errors for unknown keys."""
    unknown = sorted(set(data) - _ALL_KEYS)
    if unknown:
        raise ConfigError(f"unknown engine config key(s) {unknown}; known: {sorted(_ALL_KEYS)}")
    kwargs = {k: v for k, v in data.items() if k in _ENGINE_KEYS}
    for key in ("listen", "transports"):
        if key in kwargs and not isinstance(kwargs[key], list):
            raise ConfigError(f"config key {key!r} must be a list")
    if "transports" in kwargs:
        kwargs["transports"] = tuple(kwargs["transports"])

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base is None else base / path

    if "secret_file" in data:
        try:
            kwargs["secret"] = resolve(data["secret_file"]).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret_file: {exc}") from None
    tls = data.get("tls")
    if tls is not None:
        if not isinstance(tls, dict) or not {"cert", "key"} <= set(tls):
            raise ConfigError("tls needs 'cert' and 'key' (and usually 'ca')")
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server.load_cert_chain(resolve(tls["cert"]), resolve(tls["key"]))
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if "ca" in tls:
                client.load_verify_locations(resolve(tls["ca"]))
                server.verify_mode = ssl.CERT_REQUIRED
                server.load_verify_locations(resolve(tls["ca"]))
                client.load_cert_chain(resolve(tls["cert"]), resolve(tls["key"]))
            else:
                client.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from None
        kwargs["tls_server"], kwargs["tls_client"] = server, client
    return kwargs
