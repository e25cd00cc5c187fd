"""Fixtures shared by the multi-process tests, and the test tiers (pyproject.toml lists the markers)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from .helpers import kill_tagged

TIERS = ("unit", "cluster", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one tier, so `make test-fast` (-m unit) runs a known set. A parameter marked
    slow moves that case of a cluster test to the slow tier (``-m "not slow"`` leaves it out)."""
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if tiers == {"cluster", "slow"}:
            continue
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {tiers or 'with no tier'}; mark it with one of {TIERS}")


@pytest.fixture()
def tag() -> Iterator[str]:
    """A marker (ZPS_TEST_TAG) in the environment of every process of a job, to find them in the process table;
    whatever still carries it when the test ends is killed, also when the test failed."""
    value = uuid.uuid4().hex
    yield value
    kill_tagged(value)
