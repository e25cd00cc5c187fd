"""Unit tests: the sharding plan, message parsing, configuration, optimizer specs, output forwarding."""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from zps.launcher.cli import build_parser
from zps.launcher.procs import LineForwarder
from zps.protocol import bodies
from zps.protocol.codecs import canonical_spec
from zps.protocol.config import Config, ConfigError, JobConfig, flag_of, option_default
from zps.protocol.messages import PROTOCOL_VERSION, ErrorCode, Kind, Message, ProtocolError, parse_frames
from zps.protocol.optim_spec import build_from_spec, describe_optimizer, parse_optimizer_spec
from zps.protocol.peers import parse_peer
from zps.protocol.plan import ParamSpec, make_plan
from zps.ps.optim import build_optimizer

pytestmark = pytest.mark.unit


# -- plan -------------------------------------------------------------------------------------------------
def specs():
    return [
        ParamSpec("emb", (1000, 64)),
        ParamSpec("w1", (64, 256)),
        ParamSpec("b1", (256,)),
        ParamSpec("w2", (256, 10)),
    ]


def test_plan_is_deterministic_and_covers_every_element() -> None:
    a = make_plan(specs(), 3, chunk_bytes=16 * 1024)
    b = make_plan(specs(), 3, chunk_bytes=16 * 1024)
    assert a == b
    for index, spec in enumerate(a.params):
        chunks = a.chunks_of(index)
        assert chunks[0].offset == 0
        assert all(x.offset + x.numel == y.offset for x, y in zip(chunks, chunks[1:], strict=False))
        assert chunks[-1].offset + chunks[-1].numel == spec.numel
        assert all(c.numel * 4 <= 16 * 1024 for c in chunks)
    assert [c.key for c in a.chunks] == list(range(len(a.chunks)))


def test_plan_balances_bytes_within_one_chunk() -> None:
    plan = make_plan(specs(), 3, chunk_bytes=16 * 1024)
    load = plan.bytes_per_server()
    assert max(load) - min(load) <= 16 * 1024
    assert sum(load) == sum(s.numel * 4 for s in specs())


def test_whole_parameters_are_never_cut() -> None:
    plan = make_plan(specs(), 2, chunk_bytes=1024, whole=["emb"])
    assert len(plan.chunks_of(0)) == 1 and plan.chunks_of(0)[0].numel == 64_000
    assert len(plan.chunks_of(1)) > 1


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        make_plan([ParamSpec("a", (2,)), ParamSpec("a", (3,))], 1)
    with pytest.raises(ValueError, match="num_servers"):
        make_plan(specs(), 0)


def test_more_servers_than_chunks_leaves_some_empty() -> None:
    plan = make_plan([ParamSpec("a", (4,))], 3)
    assert sorted(len(plan.chunks_on(s)) for s in range(3)) == [0, 0, 1]


# -- messages ---------------------------------------------------------------------------------------------
def test_message_round_trip() -> None:
    msg = Message(
        Kind.PUSH, id=5, src="worker:1", keys=[{"key": 3, "step": 2, "nf": 1}], body={"lr": [0.1]}, frames=[b"abcd"]
    )
    back = parse_frames(msg.to_frames())
    assert (back.kind, back.id, back.src, back.keys, back.body, back.frames) == (
        Kind.PUSH,
        5,
        "worker:1",
        msg.keys,
        msg.body,
        [b"abcd"],
    )
    assert "push" in msg.describe() and "keys=1" in msg.describe()


@pytest.mark.parametrize(
    "head, frames, code",
    [
        ({"v": PROTOCOL_VERSION, "kind": "push", "id": -1}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "id": True}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "src": 7}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "body": []}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "keys": {}}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "keys": [{"key": "a"}]}, 0, ErrorCode.BAD_HEADER),
        ({"v": PROTOCOL_VERSION, "kind": "push", "keys": [{"key": 1, "nf": 2}]}, 1, ErrorCode.FRAME_COUNT),
        ({"v": PROTOCOL_VERSION, "kind": "push", "keys": [{"key": 1, "nf": 0}]}, 1, ErrorCode.FRAME_COUNT),
        ({"v": 0, "kind": "push"}, 0, ErrorCode.BAD_VERSION),
        ({"kind": "push"}, 0, ErrorCode.BAD_VERSION),
        ({"v": PROTOCOL_VERSION, "kind": "nope"}, 0, ErrorCode.BAD_KIND),
    ],
)
def test_parse_rejects(head, frames, code) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frames([msgpack.packb(head), *([b"x"] * frames)])
    assert info.value.code is code


def test_parse_rejects_non_msgpack_and_empty() -> None:
    for frames in ([], [b"\xc1"], [msgpack.packb("text")]):
        with pytest.raises(ProtocolError) as info:
            parse_frames(frames)
        assert info.value.code is ErrorCode.BAD_HEADER


def test_entries_give_each_key_its_own_frames_and_a_fused_key_none() -> None:
    msg = parse_frames(Message(Kind.PUSH, keys=[{"key": 1, "nf": 2}, {"key": 2, "nf": 0, "fz": 0}, {"key": 3, "nf": 1}],
                               frames=[b"a", b"b", b"c", b"fused"], fused=1).to_frames())
    assert [(e["key"], frames) for e, frames in msg.entries()] == [(1, [b"a", b"b"]), (2, []), (3, [b"c"])]


# -- bodies: one checked reader each ----------------------------------------------------------------------
@pytest.mark.parametrize("body, code", [
    ({"hp": [{"lr": 0.1}, {"lr": float("nan")}]}, ErrorCode.BAD_HEADER),
    ({"hp": [{"lr": [True]}]}, ErrorCode.BAD_HEADER),
    ({"hp": []}, ErrorCode.BAD_HEADER),
    ({"hp": [{"lr": "fast"}]}, ErrorCode.BAD_HEADER),
    ({"hp": {"lr": 0.1}}, ErrorCode.BAD_HEADER),
])
def test_a_push_body_is_read_whole(body: dict, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        bodies.read_push(body)
    assert info.value.code is code
    assert bodies.read_push({"hp": [{"lr": 1, "betas": [0.9, 0.99]}], "hold": 1, "ckpt": 3}) == {
        "hp": [{"lr": 1, "betas": [0.9, 0.99]}], "hold": 1, "ckpt": 3}
    assert bodies.read_push({"ckpt": True}) == {} and bodies.read_push({"ckpt": 0}) == {}  # (ignored, as ever)


def test_the_other_request_bodies_are_read_whole() -> None:
    assert bodies.read_join({"step": 4}) == {"step": 4}
    for bad in ({}, {"step": -1}, {"step": 1.0}, {"step": False}):
        with pytest.raises(ProtocolError, match="'step'"):
            bodies.read_join(bad)
    assert bodies.read_init({"optimizer": "SGD", "groups": [{"lr": 1}], "shm": {"fd": 3}}) == {
        "optimizer": "SGD", "groups": [{"lr": 1}], "shm": {"fd": 3}}
    refused: list[tuple[dict[str, Any], ErrorCode]] = [({"optimizer": "SGD", "groups": []}, ErrorCode.BAD_OPTIMIZER),
                                                       ({"optimizer": 3, "groups": [{}]}, ErrorCode.BAD_OPTIMIZER),
                                                       ({"shm": [1]}, ErrorCode.BAD_HEADER)]
    for bad, code in refused:
        with pytest.raises(ProtocolError) as info:
            bodies.read_init(bad)
        assert info.value.code is code
    seed, topology = bodies.read_seed({"optimizer": "Adam", "groups": [{}], "failover": {"version": 2, "dead": [1]}}, 3)
    assert topology == (2, frozenset({1})) and seed["failover"] == {"version": 2, "dead": [1]}
    with pytest.raises(ProtocolError, match="failover"):
        bodies.read_seed({"optimizer": "Adam", "groups": [{}], "failover": {"version": 2, "dead": [3]}}, 3)


def test_a_register_body_is_read_whole_with_its_defaults() -> None:
    assert bodies.read_register({"role": "worker"}) == {"role": "worker", "rank": -1, "host": "?", "pid": 0,
                                                        "rejoin": False}
    server = {"role": "server", "rank": 1, "host": "h", "pid": 7, "address": "tcp://h:1"}
    assert bodies.read_register(server) == {**server, "rejoin": False}
    for bad in ({"role": "coordinator"}, {"role": "worker", "rank": -2}, {"role": "worker", "pid": "7"},
                {"role": "worker", "rejoin": 1}, {**server, "address": "h:1"}, {"role": "worker", "host": "x" * 256}):
        with pytest.raises(ProtocolError) as info:
            bodies.read_register(bad)
        assert info.value.code is ErrorCode.BAD_HEADER, bad


def test_heartbeat_and_notice_bodies_keep_what_is_well_formed() -> None:
    assert bodies.read_heartbeat({"stats": {"step": 3, "loss": "x"}, "suspect": [9, 1, "2", 0, 2], "replicated": -1},
                                 num_servers=4) == {"stats": {"step": 3}, "suspect": [1, 0]}  # (the first 4 only)
    assert bodies.read_heartbeat({"replicated": 4}, 2) == {"replicated": 4}
    notice = bodies.read_notice({"gone": 1, "replaced": "2", "why": 3, "workers": {"0": 11, "x": 1, "1": -5, "²": 1},
                                 "failover": {"version": 1, "dead": [0]}})
    assert notice == {"gone": 1, "workers": {"0": 11}, "failover": {"version": 1, "dead": [0]}}


# -- config -----------------------------------------------------------------------------------------------
BASE = {"ZPS_ROLE": "worker", "ZPS_COORDINATOR": "127.0.0.1:5000", "ZPS_NUM_SERVERS": "2", "ZPS_NUM_WORKERS": "3"}


def test_config_from_env_and_back() -> None:
    config = Config.from_env({**BASE, "ZPS_RANK": "1", "ZPS_CODEC": "topk:ratio=0.01", "ZPS_ERROR_FEEDBACK": "yes"})
    assert (config.role, config.rank, config.job.num_servers, config.job.num_workers) == ("worker", 1, 2, 3)
    assert config.job.codec == "topk:ratio=0.01" and config.job.error_feedback
    assert Config.from_env(config.to_env()) == config


def test_dmlc_aliases() -> None:
    env = {"DMLC_ROLE": "server", "ZPS_COORDINATOR": "h:1", "DMLC_NUM_SERVER": "4", "DMLC_NUM_WORKER": "8"}
    config = Config.from_env(env)
    assert (config.role, config.job.num_servers, config.job.num_workers) == ("server", 4, 8)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"ZPS_ROLE": None}, "ZPS_ROLE"),
        ({"ZPS_ROLE": "boss"}, "ZPS_ROLE"),
        ({"ZPS_COORDINATOR": "nohostport"}, "ZPS_COORDINATOR"),
        ({"ZPS_NUM_WORKERS": "two"}, "ZPS_NUM_WORKERS"),
        ({"ZPS_NUM_SERVERS": "0"}, "ZPS_NUM_SERVERS"),
        ({"ZPS_TIMEOUT": "-1"}, "ZPS_TIMEOUT"),
    ],
)
def test_config_errors_name_the_variable(change, needle) -> None:
    env = {**BASE, **{k: v for k, v in change.items() if v is not None}}
    for k, v in change.items():
        if v is None:
            env.pop(k)
    with pytest.raises(ConfigError, match=needle):
        Config.from_env(env)


def test_every_job_setting_is_a_command_line_option_with_its_default_and_help() -> None:
    """One source: the zps command's job options are JobConfig's fields (flag, default, help), nothing else."""
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    options = {a.dest: a for a in run._actions if a.option_strings}
    for f in fields(JobConfig):
        action = options.pop(f.name)
        assert action.default == option_default(f, os.environ) and action.help, f.name  # (ZPS_PRELOAD may set one)
        assert flag_of(f) in action.option_strings, f.name
    assert set(options) == {"help"}, f"options that are not JobConfig fields: {sorted(options)}"
    args = parser.parse_args(["run", "--workers", "3", "--mode", "ssp", "--staleness", "2", "--no-shm", "x.py"])
    job = JobConfig(**{f.name: getattr(args, f.name) for f in fields(JobConfig)})
    assert (job.num_workers, job.mode, job.staleness, job.shm) == (3, "ssp", 2, False)
    assert JobConfig.from_env(job.to_env()) == job


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"staleness": 2}, "ZPS_STALENESS (--staleness)=2 only applies to mode ssp"),
        ({"mode": "fast"}, "ZPS_MODE (--mode)='fast' is not one of bsp, asp, ssp"),
        ({"heartbeat_timeout": 0.0}, "ZPS_HEARTBEAT_TIMEOUT (--heartbeat-timeout)=0.0 must be > 0"),
        ({"num_workers": 0}, "ZPS_NUM_WORKERS (--workers)=0 must be >= 1"),
        ({"log_level": "LOUD"}, "ZPS_LOG_LEVEL (--log-level)='LOUD' is not one of"),
    ],
)
def test_job_settings_check_themselves_naming_variable_and_flag(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        JobConfig(**settings)
    assert words in str(info.value)


def test_specs_are_checked_before_anything_starts_and_only_then_import_torch() -> None:
    JobConfig().check_specs()  # nothing set: nothing to build
    JobConfig(codec="topk:ratio=0.1", pull_codec="int8", optimizer="adam:lr=1e-3").check_specs()
    with pytest.raises(ConfigError, match=re.escape("ZPS_CODEC (--codec)='topk:ratio=x'")):
        JobConfig(codec="topk:ratio=x").check_specs()
    with pytest.raises(ConfigError, match="torch.optim has no optimizer 'nosuch'"):
        JobConfig(optimizer="nosuch:lr=1").check_specs()
    for spec in ("dgc:ratio=0.05,momentum=0", "topk_adam"):  # they diverge on the servers' deltas
        with pytest.raises(ConfigError, match=r"ZPS_PULL_CODEC \(--pull-codec\)=.*accumulates and transforms"):
            JobConfig(pull_codec=spec).check_specs()
    JobConfig(codec="topk_adam", pull_codec="int8").check_specs()  # as a push codec it is what it is for
    # error feedback around a codec that may lose more than it sends can diverge (QSGD 4-bit pulls of the LM did)
    with pytest.raises(ConfigError, match=r"ZPS_PULL_CODEC \(--pull-codec\)='qsgd:levels=7'.*buckets smaller than"):
        JobConfig(pull_codec="qsgd:levels=7").check_specs()
    with pytest.raises(ConfigError, match=r"ZPS_CODEC \(--codec\)=.*--error-feedback"):
        JobConfig(codec="qsgd:levels=7", error_feedback=True).check_specs()
    JobConfig(codec="qsgd:levels=7").check_specs()  # unbiased, without feedback: fine
    with pytest.raises(ConfigError, match=r"ZPS_PULL_CODEC \(--pull-codec\)='randomk'.*scale=false"):
        JobConfig(pull_codec="randomk").check_specs()
    JobConfig(codec="qsgd:levels=7,bucket=32", error_feedback=True, pull_codec="qsgd:levels=7,bucket=32").check_specs()


def test_canonical_codec_specs() -> None:
    assert canonical_spec("int8") == "int8:chunk=4096" == canonical_spec("int8:chunk=4096")
    assert canonical_spec(" topk:ratio=0.01 ") == "topk:ratio=0.01"


@pytest.mark.parametrize(
    "src, expected",
    [("worker:3", ("worker", 3)), ("server:0", ("server", 0)), ("worker:\u00b2", None), ("worker:" + "9" * 4300, None),
     ("worker:-1", None), ("boss:1", None), ("worker:", None), (["worker", 1], None), ("worker:1:2", None)],
)
def test_peer_names_are_read_strictly(src: object, expected: tuple[str, int] | None) -> None:
    assert parse_peer(src) == expected


# -- optimizer specs --------------------------------------------------------------------------------------
def test_optimizer_spec_parsing() -> None:
    assert parse_optimizer_spec("adam:lr=1e-3,betas=(0.8,0.9)") == ("Adam", {"lr": 1e-3, "betas": (0.8, 0.9)})
    assert parse_optimizer_spec("SGD") == ("SGD", {})
    opt = build_from_spec("sgd:lr=0.5,momentum=0.9,nesterov=True", [torch.zeros(2, requires_grad=True)])
    assert describe_optimizer(opt)[0] == "SGD" and describe_optimizer(opt)[1][0]["momentum"] == 0.9
    for bad in ("nosuch:lr=1", "sgd:lr", "sgd:lr=os.system"):
        with pytest.raises(ValueError):
            parse_optimizer_spec(bad)


def test_server_optimizer_matches_described_worker_optimizer() -> None:
    """What a worker describes, the server rebuilds with the same hyper-parameters."""
    local = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    name, groups = describe_optimizer(local)
    server = build_optimizer(name, groups[0], torch.zeros(3, requires_grad=True))
    assert isinstance(server, torch.optim.AdamW)
    assert server.param_groups[0]["betas"] == (0.8, 0.95) and server.param_groups[0]["weight_decay"] == 0.1


# -- output forwarding ------------------------------------------------------------------------------------
def forward(chunks: list[bytes]) -> str:
    out = io.StringIO()
    fw = LineForwarder("[w 0] ", out, threading.Lock())
    for c in chunks:
        fw.feed(c)
    fw.feed(b"", final=True)
    return out.getvalue()


def test_forwarder_survives_split_utf8_and_invalid_bytes() -> None:
    text = "température ✓\n".encode()
    split = text.index("✓".encode()) + 1
    assert forward([text[:split], text[split:]]) == "[w 0] température ✓\n"
    assert forward([b"bad \xff byte\n"]) == "[w 0] bad \ufffd byte\n"


def test_forwarder_keeps_the_last_line_and_splits_carriage_returns() -> None:
    assert forward([b"10%\r50%\r100%\ndone"]) == "[w 0] 10%\n[w 0] 50%\n[w 0] 100%\n[w 0] done\n"
    assert forward([b"a\r\nb\n"]) == "[w 0] a\n[w 0] b\n"


def test_no_module_imports_a_zps_package_by_its_bare_name() -> None:
    """`import worker` or `from ps import ...` would pick up a user's worker.py or ps.py: only zps.* names."""
    root = Path(__file__).resolve().parents[1]
    bare = {"protocol", "ps", "worker", "launcher"}
    found = []
    for folder in ("protocol", "ps", "worker", "launcher", "tests", "examples", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] in bare]
    assert found == [], found


def test_preload_takes_its_default_from_the_launchers_environment_only() -> None:
    """ZPS_PRELOAD=0 in the launcher's environment turns the zygote off for `zps run` (the flag still wins); no
    other job option reads the launcher's environment."""
    by_name = {f.name: f for f in fields(JobConfig)}
    assert option_default(by_name["preload"], {}) is True
    assert option_default(by_name["preload"], {"ZPS_PRELOAD": "0"}) is False
    assert option_default(by_name["num_workers"], {"ZPS_NUM_WORKERS": "5"}) == 1
    with pytest.raises(ConfigError, match="ZPS_PRELOAD='maybe' is not a boolean"):
        option_default(by_name["preload"], {"ZPS_PRELOAD": "maybe"})
