"""Conformance with DDP: each idiom of a real training loop, run under DDP/gloo and under ``zps run`` in the same
test, gives rank 0 the same parameters and buffers; and killed after a checkpoint and resumed, the same bits as its
straight run. docs/fidelity.md has the table of idioms; each row names its test here."""
from __future__ import annotations

from pathlib import Path

import pytest

from .harness import assert_same, run_ddp, run_zps

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("name", ["plain", "scheduler"])
def test_two_workers_match_ddp_exactly(name: str, tag: str, tmp_path: Path) -> None:
    expected = run_ddp(tag, name, 2, tmp_path / "ddp.st")
    got, _ = run_zps(tag, name, 2, 2, tmp_path / "zps.st")
    assert_same(expected, got, what=name)
