"""Every ```python block in the engine docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

blocks = [(p.name, i, code) for p in DOCS if p.exists()
          for i, code in enumerate(BLOCK.findall(p.read_text()))]


@pytest.mark.parametrize("name,index,code", blocks, ids=[f"{n}-{i}" for n, i, _ in blocks])
def test_doc_block_runs(name: str, index: int, code: str) -> None:
    exec(compile(code, f"{name}[{index}]", "exec"), {"__name__": "__doc_example__"})
