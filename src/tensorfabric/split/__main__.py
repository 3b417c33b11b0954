"""``python -m tensorfabric.split cloud --config FILE | --config-json JSON``: run a cloud tier.

Prints ``TENSORFABRIC_CLOUD_ADDRESS <hex>`` once ready (the edge needs it: pass it as
``cloud.address`` or let it read ``cloud.address_file``). The secret comes from the config or
``$TENSORFABRIC_SECRET``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tensorfabric.split")
    ap.add_argument("role", choices=["cloud"])
    ap.add_argument("--config", help="YAML deployment config")
    ap.add_argument("--config-json", help="the config as JSON (used by tensorfabric serve)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s cloud %(levelname)s %(message)s")
    from ._cloud import run_cloud
    from ._config import load_config, parse_config
    from ._signals import sigterm_interrupts_once

    cfg = parse_config(json.loads(args.config_json)) if args.config_json else load_config(args.config)
    # SIGTERM (tensorfabric serve stopping, or its death) closes the tier like Ctrl-C: the vLLM
    # servers of a disaggregated cloud run in sessions of their own and would outlive us.
    sigterm_interrupts_once()
    run_cloud(cfg, announce=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
