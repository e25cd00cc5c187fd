"""Bad input gets an error reply naming the problem; the server keeps serving and its parameters are unchanged."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from zps.protocol.messages import PROTOCOL_VERSION, ErrorCode, Kind, Message, parse_frames
from zps.protocol.tensors import as_buffer

from .helpers import local_cluster

pytestmark = pytest.mark.cluster

NUMEL = 16


@pytest.fixture()
def served():
    """An ASP cluster of one server with two declared keys, a real client, and a raw DEALER to the server."""
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients(shm=False)  # frames only: the raw socket speaks as worker 0 too
        tensors = {"a": torch.arange(NUMEL, dtype=torch.float32), "b": torch.ones(NUMEL)}
        client.declare(tensors, ("SGD", [{"lr": 1.0}]))
        raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(client.topology.servers[0])
        try:
            yield client, raw, tensors
        finally:
            raw.close()
            client.close()


def key_of(client, name: str) -> int:
    return client.chunks(name)[0].key


def ask(raw: zmq.Socket, frames: list) -> Message:
    raw.send_multipart(frames)
    assert raw.poll(10_000), "the server did not answer"
    return parse_frames(raw.recv_multipart())


def header(**fields) -> bytes:
    head = {"v": PROTOCOL_VERSION, "kind": "push", "id": 7, "src": "worker:0"}
    head.update(fields)
    return msgpack.packb(head)


def push_entry(key: int, dtype: str = "float32", numel: int = NUMEL) -> dict:
    return {"key": key, "step": 0, "nf": 1, "codec": "none", "meta": {}, "bufs": [[dtype, numel]]}


def current(client, tensors) -> dict[str, torch.Tensor]:
    outs = {k: torch.empty_like(v) for k, v in tensors.items()}
    client.pull(outs, step=0).result(timeout=10)
    return outs


def good_push(key: int) -> list:
    return [header(keys=[push_entry(key)]), as_buffer(torch.ones(NUMEL)).tobytes()]


CASES = {
    "wrong shape": (
        lambda k: [header(keys=[push_entry(k, numel=NUMEL - 1)]), torch.ones(NUMEL - 1).numpy().tobytes()],
        ErrorCode.SHAPE_MISMATCH,
    ),
    "wrong dtype": (
        lambda k: [
            header(keys=[push_entry(k, dtype="float16")]),
            torch.ones(NUMEL, dtype=torch.float16).numpy().tobytes(),
        ],
        ErrorCode.DTYPE_MISMATCH,
    ),
    "bytes disagree with header": (
        lambda k: [header(keys=[push_entry(k)]), b"\0" * (NUMEL * 4 - 2)],
        ErrorCode.FRAME_SIZE,
    ),
    "unknown key": (
        lambda k: [header(keys=[push_entry(9999)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.UNKNOWN_KEY,
    ),
    "malformed msgpack": (
        lambda k: [b"\xc1\xff\x00garbage", torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_HEADER,
    ),
    "header not a map": (lambda k: [msgpack.packb([1, 2, 3])], ErrorCode.BAD_HEADER),
    "truncated frame list": (
        lambda k: [header(keys=[push_entry(k), push_entry(k + 1)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.FRAME_COUNT,
    ),
    "wrong protocol version": (
        lambda k: [header(v=PROTOCOL_VERSION + 1, keys=[push_entry(k)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_VERSION,
    ),
    "unknown kind": (lambda k: [header(kind="explode")], ErrorCode.BAD_KIND),
    "bad src": (
        lambda k: [header(src="worker:99", keys=[push_entry(k)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_HEADER,
    ),
    "negative step": (
        lambda k: [header(keys=[dict(push_entry(k), step=-1)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_HEADER,
    ),
    "unknown codec": (
        lambda k: [header(keys=[dict(push_entry(k), codec="nosuchcodec")]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_CODEC,
    ),
    "codec by import path": (
        lambda k: [header(keys=[dict(push_entry(k), codec="os.path:join")]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_CODEC,
    ),
    "push_pull with a bad pull codec": (
        lambda k: [
            header(kind="push_pull", keys=[dict(push_entry(k), pc="nosuchcodec")]),
            torch.ones(NUMEL).numpy().tobytes(),
        ],
        ErrorCode.BAD_CODEC,
    ),
    "push_pull into a shared area it has not got": (
        lambda k: [header(kind="push_pull", keys=[dict(push_entry(k), pshm=1)]), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_HEADER,
    ),
    "fused key outside the fused frame": (
        lambda k: [
            header(fz=NUMEL, keys=[{"key": k, "step": 0, "nf": 0, "fz": 4}]),
            torch.ones(NUMEL).numpy().tobytes(),
        ],
        ErrorCode.FRAME_SIZE,
    ),
    "fused frame of the wrong size": (
        lambda k: [header(fz=NUMEL, keys=[{"key": k, "step": 0, "nf": 0, "fz": 0}]), b"\0" * (NUMEL * 4 - 4)],
        ErrorCode.FRAME_SIZE,
    ),
    "fused key without a fused frame": (
        lambda k: [header(keys=[{"key": k, "step": 0, "nf": 0, "fz": 0}])],
        ErrorCode.BAD_HEADER,
    ),
    "fused frame missing": (
        lambda k: [header(fz=NUMEL, keys=[{"key": k, "step": 0, "nf": 0, "fz": 0}])],
        ErrorCode.FRAME_COUNT,
    ),
    "fused key also in shared memory": (
        lambda k: [
            header(fz=NUMEL, keys=[{"key": k, "step": 0, "nf": 0, "fz": 0, "shm": 1}]),
            torch.ones(NUMEL).numpy().tobytes(),
        ],
        ErrorCode.BAD_HEADER,
    ),
    "negative fused offset": (
        lambda k: [
            header(fz=NUMEL, keys=[{"key": k, "step": 0, "nf": 0, "fz": -1}]),
            torch.ones(NUMEL).numpy().tobytes(),
        ],
        ErrorCode.BAD_HEADER,
    ),
    "bad lr": (
        lambda k: [header(keys=[push_entry(k)], body={"hp": [{"lr": "fast"}]}), torch.ones(NUMEL).numpy().tobytes()],
        ErrorCode.BAD_HEADER,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_message_gets_a_named_error_and_changes_nothing(served, case: str) -> None:
    client, raw, tensors = served
    make, code = CASES[case]
    before = current(client, tensors)
    reply = ask(raw, make(key_of(client, "a")))
    assert reply.kind is Kind.ERROR
    assert reply.body["code"] == code.value, reply.body
    assert len(reply.body["reason"]) > 10
    after = current(client, tensors)
    for name in tensors:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0)
    # the server still serves: a good push is applied (ASP, SGD lr=1: a -= 1)
    reply = ask(raw, good_push(key_of(client, "a")))
    assert reply.kind is Kind.OK, reply.body
    torch.testing.assert_close(current(client, tensors)["a"], before["a"] - 1)


def test_one_bad_key_rejects_the_whole_message(served) -> None:
    client, raw, tensors = served
    before = current(client, tensors)
    good, bad = key_of(client, "a"), key_of(client, "b")
    frames = [
        header(keys=[push_entry(good), push_entry(bad, numel=NUMEL + 1)]),
        torch.ones(NUMEL).numpy().tobytes(),
        torch.ones(NUMEL + 1).numpy().tobytes(),
    ]
    reply = ask(raw, frames)
    assert reply.body["code"] == ErrorCode.SHAPE_MISMATCH.value
    assert f"key {bad}" in reply.body["reason"]
    after = current(client, tensors)
    torch.testing.assert_close(after["a"], before["a"], atol=0, rtol=0)


def test_a_fused_push_applies_each_key_from_its_slice(served) -> None:
    client, raw, tensors = served
    before = current(client, tensors)
    a, b = key_of(client, "a"), key_of(client, "b")
    fused = torch.cat([torch.full((NUMEL,), 2.0), torch.full((NUMEL,), 3.0)])
    entries = [{"key": b, "step": 0, "nf": 0, "fz": NUMEL}, {"key": a, "step": 0, "nf": 0, "fz": 0}]
    assert ask(raw, [header(fz=2 * NUMEL, keys=entries), fused.numpy().tobytes()]).kind is Kind.OK
    after = current(client, tensors)  # ASP, SGD lr=1
    torch.testing.assert_close(after["a"], before["a"] - 2, atol=0, rtol=0)
    torch.testing.assert_close(after["b"], before["b"] - 3, atol=0, rtol=0)


def test_retried_push_is_applied_once(served) -> None:
    client, raw, tensors = served
    before = current(client, tensors)
    frames = good_push(key_of(client, "b"))
    assert ask(raw, frames).kind is Kind.OK
    assert ask(raw, frames).kind is Kind.OK  # the same (worker, step, key) again
    torch.testing.assert_close(current(client, tensors)["b"], before["b"] - 1)
    stats = client.stats()[0]
    assert stats["duplicates"] == 1


def test_conflicting_declaration_is_refused(served) -> None:
    client, raw, tensors = served
    entry = {"key": key_of(client, "a"), "name": "a", "numel": NUMEL + 5, "nf": 0}
    reply = ask(
        raw, [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "init", "id": 1, "src": "worker:0", "keys": [entry]})]
    )
    assert reply.body["code"] == ErrorCode.CONFLICT.value
    assert "same model" in reply.body["reason"]


def test_unknown_server_optimizer_is_refused(served) -> None:
    client, raw, tensors = served
    entry = {"key": 77, "name": "z", "numel": 4, "nf": 1, "codec": "none", "meta": {}, "bufs": [["float32", 4]]}
    head = {
        "v": PROTOCOL_VERSION,
        "kind": "init",
        "id": 1,
        "src": "worker:0",
        "keys": [entry],
        "body": {"optimizer": "LBFGS", "groups": [{}]},
    }
    reply = ask(raw, [msgpack.packb(head), torch.zeros(4).numpy().tobytes()])
    assert reply.body["code"] == ErrorCode.BAD_OPTIMIZER.value
    assert "LBFGS" in reply.body["reason"]
    head["body"] = {"optimizer": "SGD", "groups": [{"lr": 0.1, "warp_speed": 9}]}
    reply = ask(raw, [msgpack.packb(head), torch.zeros(4).numpy().tobytes()])
    assert reply.body["code"] == ErrorCode.BAD_OPTIMIZER.value
    assert "warp_speed" in reply.body["reason"]
    # nothing was declared by the refused requests
    assert (
        ask(raw, [header(keys=[push_entry(77, numel=4)]), torch.ones(4).numpy().tobytes()]).body["code"]
        == ErrorCode.UNKNOWN_KEY.value
    )


def test_a_declaration_in_another_group_is_a_conflict(served) -> None:
    client, raw, tensors = served
    entry = {"key": key_of(client, "a"), "name": "a", "numel": NUMEL, "group": 3, "nf": 0}
    reply = ask(
        raw, [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "init", "id": 1, "src": "worker:0", "keys": [entry]})]
    )
    reason = reply.body["reason"]
    assert reply.body["code"] == ErrorCode.CONFLICT.value and "optimizer group" in reason
    assert "'a'" not in reason and str(NUMEL) not in reason  # the existing declaration is not told to the asker
    entry = {"key": 500, "name": "z", "numel": 4, "group": "first", "nf": 0}
    reply = ask(
        raw, [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "init", "id": 2, "src": "worker:0", "keys": [entry]})]
    )
    assert reply.body["code"] == ErrorCode.BAD_HEADER.value and "'group'" in reply.body["reason"]
