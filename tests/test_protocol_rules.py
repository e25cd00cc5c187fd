"""Rules protocol/ defines once for every role: the names of the role variables, how a request's keys are cut into
messages, and when ``--kill`` fires."""

from __future__ import annotations

from dataclasses import fields

import pytest

from zps.protocol import variables
from zps.protocol.config import Config, JobConfig
from zps.protocol.plan import cut_messages
from zps.protocol.simulation import kill_due, kill_step

pytestmark = pytest.mark.unit


def test_every_role_variable_names_a_setting() -> None:
    names = {variables.env_name(f.name) for cls in (Config, JobConfig) for f in fields(cls)}
    declared = {value for name, value in vars(variables).items() if name.startswith("ZPS_")}
    assert len(declared) == 7 and declared <= names, declared - names


def test_join_host_port_brackets_ipv6_literals_once() -> None:
    assert variables.join_host_port("10.0.0.1", 29600) == "10.0.0.1:29600"
    assert variables.join_host_port("::1", 5) == "[::1]:5"
    assert variables.join_host_port("[::1]", 5) == "[::1]:5"


def test_cut_messages_starts_a_message_only_past_the_limit() -> None:
    sizes = [1, 1, 2, 1, 5, 1]  # elements; 4 bytes each, a limit of 16 bytes holds 4 elements
    cut = cut_messages(sizes, lambda n: n, limit=16)
    assert cut == [[1, 1, 2], [1], [5], [1]]  # 4 elements fill one exactly; 5 travel alone, over the limit
    assert cut_messages([], lambda n: n, limit=16) == []
    assert [len(m) for m in cut_messages([1] * 9, lambda n: n, limit=16)] == [4, 4, 1]


def test_kill_fires_once_when_the_count_crosses_its_step() -> None:
    at = kill_step("worker:1@3,server:0@2", "worker", 1)
    assert at == 3 and kill_step("worker:1@3", "worker", 0) is None and kill_step("", "worker", 1) is None
    # a worker looks after every step: it dies at exactly its step
    assert [now for now in range(1, 6) if kill_due(at, now - 1, now)] == [3]
    # a server looks as its loop turns: a jump across the step fires, a first look (resumed past it) never does
    assert kill_due(at, 1, 7) and not kill_due(at, 3, 7) and not kill_due(at, None, 3) and not kill_due(None, 1, 7)
