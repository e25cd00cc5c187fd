"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import ROOT, finish, start, wait_for_no_tagged

pytestmark = pytest.mark.cluster


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"the README has {len(found)} python blocks starting with {first_line!r}"
    return found[0]


def test_the_low_level_example_runs_as_written(tag: str, tmp_path: Path) -> None:
    script = tmp_path / "lowlevel.py"
    script.write_text(readme_block("# lowlevel.py"))
    code, text = finish(start(tag, ["run", "--servers", "2", "--workers", "2", str(script)]), timeout=180)
    assert code == 0, text
    assert text.count("[-1.0, -1.0, -1.0]") == 2, text  # both workers: 10 BSP steps of lr 0.1 x gradient 1
    assert wait_for_no_tagged(tag, within=5) == []


def test_the_training_loop_example_runs_as_written(tag: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(readme_block("# train.py"))
    code, text = finish(start(tag, ["run", "--servers", "2", "--workers", "2", str(script)]), timeout=180)
    assert code == 0, text
    assert text.count("trained") == 2, text
    assert wait_for_no_tagged(tag, within=5) == []
