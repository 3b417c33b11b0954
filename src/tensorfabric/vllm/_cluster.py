"""N prefill and M decode vLLM instances on this machine, joined by the connector and a proxy."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from .._errors import ConfigError
from ._launch import VllmServer, stop_all
from ._layout import LayoutMismatchError
from ._proxy import DisaggProxy, check_key
from ._settings import kv_transfer_config


class DisaggCluster:
    """Start ``prefill`` + ``decode`` vLLM servers (each bound to its own CPU where there are
    enough, round robin otherwise) and a :class:`DisaggProxy` in front of them.

        with DisaggCluster(prefill=1, decode=1) as c:
            print(c.url)          # an OpenAI endpoint: /v1/completions, /v1/chat/completions

    ``model``: a tensorfabric model name or path (default: the default model), turned into
    the Hugging Face folder vLLM loads. ``secret``: the engines' cluster secret (random by
    default; passed in the environment, never on a command line). ``block_size`` or
    ``prefill_block_size``/``decode_block_size``: vLLM's ``--block-size``; different sizes
    are refused (the connector copies blocks byte for byte). ``connector``: more
    ``kv_connector_extra_config`` options (``timeout``, ``hold_s``, ``transports``, ...).
    ``ray_address``: start every instance as a Ray actor on the Ray cluster there (``"auto"``
    or the head's ``host:port``), ``ray_cpus`` CPUs each, spread over the nodes; each serves
    and runs its engine on its node's IP address, and the proxy stays here. ``proxy_mode``:
    ``"push"`` (layer-by-layer, the default) or ``"pull"`` (see :class:`DisaggProxy`).
    ``api_key`` (default ``$VLLM_API_KEY``): the key clients send as ``Authorization: Bearer
    KEY``, asked for by the proxy and by every instance.
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, prefill: int = 1,
                 decode: int = 1, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, kv_space_gib: int = 2,
                 block_size: int | None = None, prefill_block_size: int | None = None,
                 decode_block_size: int | None = None, max_model_len: int = 2048,
                 connector: Mapping[str, Any] | None = None, cpus: list[str] | None = None,
                 log_dir: str | os.PathLike[str] | None = None,
                 start_timeout: float = 600.0, ray_address: str | None = None,
                 ray_cpus: float = 1.0, proxy_mode: str = "push",
                 api_key: str | None = None) -> None:
        if prefill < 1 or decode < 1:
            raise ConfigError("need at least one prefill and one decode instance")
        pb = prefill_block_size or block_size
        db = decode_block_size or block_size
        if pb != db:
            raise LayoutMismatchError(
                f"prefill block size {pb} and decode block size {db} differ: the tensorfabric "
                "connector copies KV blocks byte for byte, so both sides need the same "
                "--block-size (and the same model, dtype and tensor-parallel size)")
        self.model, self.host, self.port = model, host, port
        self.secret = secret or secrets.token_hex(16)
        self.counts = (prefill, decode)
        self.kw = dict(kv_space_gib=kv_space_gib, max_model_len=max_model_len, block_size=pb)
        self.connector = dict(connector or {})
        avail = sorted(os.sched_getaffinity(0))
        self.cpus = cpus or [str(c) for c in avail]
        self.log_dir = Path(log_dir) if log_dir else None
        self.start_timeout = start_timeout
        self.ray_address, self.ray_cpus = ray_address, ray_cpus
        if proxy_mode not in ("push", "pull"):
            raise ConfigError(f"proxy_mode must be 'push' or 'pull', got {proxy_mode!r}")
        self.proxy_mode = proxy_mode
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY") or None
        check_key("api_key", self.api_key)   # before any instance starts
        self.env = {"TENSORFABRIC_SECRET": self.secret}
        if self.api_key is not None:   # every instance asks for it too (vLLM reads this)
            self.env["VLLM_API_KEY"] = self.api_key
        self.prefill: list[Any] = []   # VllmServer, or RayVllmServer with ray_address
        self.decode: list[Any] = []
        self.proxy: DisaggProxy | None = None

    @property
    def url(self) -> str:
        if self.proxy is None:
            raise ConfigError("the cluster is not started")
        return self.proxy.url

    def _server(self, role: str, i: int, n: int) -> Any:
        from ._model import hf_folder

        cfg = kv_transfer_config(role, secret=None, host=self.host, **self.connector)
        if self.ray_address is not None:
            from ._ray import RayVllmServer

            return RayVllmServer(None if self.model is None else str(self.model),
                                 num_cpus=self.ray_cpus,
                                 name=f"{role}-{i}-{secrets.token_hex(4)}", cpus=self.cpus[n % len(self.cpus)],
                                 kv_transfer_config=cfg,
                                 env=self.env, **self.kw)
        log = self.log_dir / f"{role}-{i}.log" if self.log_dir else None
        return VllmServer(hf_folder(None if self.model is None else str(self.model)), host=self.host, cpus=self.cpus[n % len(self.cpus)],
                          kv_transfer_config=cfg, log_path=log,
                          env=self.env, **self.kw)  # type: ignore[arg-type]

    def start(self) -> DisaggCluster:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        np_, nd = self.counts
        if self.ray_address is not None:
            from ._ray import connect

            connect(self.ray_address)
        try:
            self.prefill = [self._server("prefill", i, i) for i in range(np_)]
            self.decode = [self._server("decode", i, np_ + i) for i in range(nd)]
            for s in self.prefill + self.decode:
                s.start()
            for s in self.prefill + self.decode:
                s.wait_ready(self.start_timeout)
            self.proxy = DisaggProxy([s.url for s in self.prefill], [s.url for s in self.decode],
                                     host=self.host, port=self.port,
                                     mode=self.proxy_mode, api_key=self.api_key).start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        servers = self.prefill + self.decode
        # local servers at once (a loaded machine stops each one slowly); Ray-placed ones
        # (RayVllmServer) through their actors
        stop_all([s for s in servers if isinstance(s, VllmServer)])
        for s in servers:
            if not isinstance(s, VllmServer):
                s.stop()

    def __enter__(self) -> DisaggCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
