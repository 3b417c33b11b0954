"""Entry point of a worker process: ``python -m tensorfabric.kv._worker {decode|prefill}``.

The parent writes one JSON line on stdin (``{"config": {...}, "decode_address": hex}``); the
worker loads its model, joins, and prints one JSON line on stdout (``{"ok": true, "address":
hex, "name": ..., "pid": ...}`` or ``{"ok": false, "error": ...}``). It then serves until a
``stop`` line on stdin, stdin closing (the parent died), or a ``shutdown`` message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    role = args[0] if args else ""
    if role not in ("decode", "prefill"):
        print("usage: python -m tensorfabric.kv._worker {decode|prefill}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format=f"[{role} %(process)d] %(message)s")
    setup = json.loads(sys.stdin.readline())
    from ._config import WorkerConfig

    cfg = WorkerConfig.from_dict(setup["config"])
    try:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        worker: Any
        if role == "decode":
            from ._decode import DecodeWorker

            worker = DecodeWorker(cfg)
        else:
            from ._prefill import PrefillWorker

            worker = PrefillWorker(cfg, bytes.fromhex(setup["decode_address"]))
            worker.join()
    except Exception as exc:
        _say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _say({"ok": True, "address": worker.engine.address.hex(), "name": worker.name,
          "pid": os.getpid(), "load_seconds": worker.lm.load_seconds,
          "layout": worker.layout.to_bytes().decode()})

    def watch_parent() -> None:
        for line in sys.stdin:  # EOF: the parent is gone
            if line.strip() == "stop":
                break
        worker.stop()

    threading.Thread(target=watch_parent, name="kv-parent-watch", daemon=True).start()
    try:
        worker.serve()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
