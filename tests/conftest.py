"""Fixtures shared by the multi-process tests."""
from __future__ import annotations

import uuid

import pytest

from .helpers import kill_tagged


@pytest.fixture()
def tag():
    """A marker (ZPS_TEST_TAG) in the environment of every process of a job, to find them in the process table;
    whatever still carries it when the test ends is killed, also when the test failed."""
    value = uuid.uuid4().hex
    yield value
    kill_tagged(value)
