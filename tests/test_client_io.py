"""The client's socket work: replies received straight into their destinations, and progress without a waiter."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest
import torch
import zmq

from zps.protocol.messages import KeyEntry, Kind, Message, ProtocolError, parse_frames
from zps.protocol.tensors import Decoders, FusedWriter
from zps.worker._engine import Engine, InPlace, Request
from zps.worker._replies import Replies
from zps.worker._shm import SharedAreas

from .helpers import local_cluster

pytestmark = pytest.mark.cluster

_ADDRESSES = itertools.count()


def _values_reply(request_id: int, key: int, numel: int, payload: bytes) -> list[bytes]:
    entry: KeyEntry = {"key": key, "codec": "none", "meta": {}, "bufs": [["float32", numel]], "nf": 1}
    return [
        bytes(f)
        for f in Message(Kind.VALUES, id=request_id, src="server:0", keys=[entry], frames=[payload]).to_frames()
    ]


class _Recording(Replies):
    """The real reply path, remembering the parts of the last reply it applied."""

    parts: list = []

    def apply(self, msg: Message, request: Request) -> None:
        self.parts = list(msg.frames)
        super().apply(msg, request)


def _pull_through_engine(
    dest: torch.Tensor, reply: Callable[[int], list[bytes]], stray: list[bytes] | None = None
) -> tuple[Future, list]:
    """The engine alone, against a fake server (a ROUTER on inproc, driven by this thread): a pull of key 7 into
    ``dest``, answered with ``reply(request id)``, after ``stray`` (a message answering nothing) when given."""
    ctx: zmq.Context = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    address = f"inproc://zps-test-engine-{next(_ADDRESSES)}"
    fake.bind(address)
    replies = _Recording(Decoders(), SharedAreas("worker:0"))
    engine = Engine("worker:0", ctx, [address], timeout=5.0, replies=replies, failure=lambda: None)
    try:
        future = engine.submit(
            [(0, Message(Kind.PULL, src="worker:0", keys=[{"key": 7, "step": 0, "nf": 0}]))],
            "pull of step 0",
            outs={7: dest.view(-1)},
        )
        assert fake.poll(5000)
        identity, *frames = fake.recv_multipart()
        request = parse_frames(frames)
        if stray is not None:
            fake.send_multipart([identity, *stray])
        fake.send_multipart([identity, *reply(request.id)])
        concurrent.futures.wait([future], timeout=10)  # the engine's pump takes the reply
        return future, replies.parts
    finally:
        engine.close()
        fake.close(linger=0)


def test_uncompressed_values_land_in_the_destination_without_a_frame() -> None:
    dest = torch.zeros(4)
    where = dest.data_ptr()
    values = torch.tensor([1.0, -2.0, 3.5, 4.0])
    future, parts = _pull_through_engine(dest, lambda rid: _values_reply(rid, 7, 4, values.numpy().tobytes()))
    future.result(timeout=0)
    assert isinstance(parts[0], InPlace)
    assert dest.data_ptr() == where
    torch.testing.assert_close(dest, values, atol=0, rtol=0)


def test_a_destination_of_another_dtype_goes_through_the_frame() -> None:
    dest = torch.zeros(4, dtype=torch.float64)
    values = torch.tensor([1.0, -2.0, 3.5, 4.0])
    future, parts = _pull_through_engine(dest, lambda rid: _values_reply(rid, 7, 4, values.numpy().tobytes()))
    future.result(timeout=0)
    assert not isinstance(parts[0], InPlace)
    torch.testing.assert_close(dest, values.double(), atol=0, rtol=0)


@pytest.mark.parametrize("nbytes", [8, 24])
def test_a_values_frame_of_the_wrong_size_is_refused(nbytes: int) -> None:
    future, _ = _pull_through_engine(torch.zeros(4), lambda rid: _values_reply(rid, 7, 4, bytes(nbytes)))
    with pytest.raises(ProtocolError, match=f"frame has {nbytes} bytes, expected 16"):
        future.result(timeout=0)


def test_a_reply_to_nothing_in_flight_is_dropped_and_the_request_still_answered() -> None:
    dest = torch.full((4,), 9.0)
    stray = _values_reply(99, 7, 4, torch.ones(4).numpy().tobytes())  # id 99 was never sent: nothing may change
    future, _ = _pull_through_engine(dest, lambda rid: _values_reply(rid, 7, 4, bytes(16)), stray=stray)
    future.result(timeout=0)
    assert torch.equal(dest, torch.zeros(4))


def test_requests_progress_for_callbacks_and_futures_wait_without_a_caller_driving() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients(shm=False)
        try:
            client.declare({"w": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
            called = threading.Event()
            push = client.push({"w": torch.ones(8)}, 0)
            push.add_done_callback(lambda f: called.set())
            done, _ = concurrent.futures.wait([push], timeout=30)  # never calls result(): the pump answers it
            assert push in done and called.wait(30)
            out = torch.zeros(8)
            pulls = [client.pull({"w": out}, 1) for _ in range(3)]
            done, _ = concurrent.futures.wait(pulls, timeout=30)
            assert len(done) == 3
            torch.testing.assert_close(out, torch.full((8,), -1.0), atol=0, rtol=0)
        finally:
            client.close()


def test_several_threads_waiting_at_once_all_get_their_replies() -> None:
    with local_cluster(2, 1, "asp") as cluster:
        (client,) = cluster.clients(chunk_bytes=64)
        try:
            client.declare({f"t{i}": torch.full((40,), float(i)) for i in range(6)}, ("SGD", [{"lr": 0.0}]))
            outs = {f"t{i}": torch.zeros(40) for i in range(6)}

            def pull(name: str) -> None:
                for step in range(20):
                    client.pull({name: outs[name]}, step).result(timeout=30)

            threads = [threading.Thread(target=pull, args=(name,)) for name in outs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            for i in range(6):
                torch.testing.assert_close(outs[f"t{i}"], torch.full((40,), float(i)), atol=0, rtol=0)
        finally:
            client.close()


def test_waiting_inside_a_callback_fails_loudly_instead_of_hanging() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        try:
            client.declare({"w": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
            seen: list[BaseException] = []

            def callback(_: Future) -> None:  # runs in the thread holding the sockets
                try:
                    client.pull({"w": torch.zeros(8)}, 0).result(timeout=30)
                except RuntimeError as exc:
                    seen.append(exc)

            with client._engine._lock:  # this thread holds the sockets, as it does while it resolves futures
                client._engine._io_busy, client._engine._io_owner = True, threading.get_ident()
            try:
                pending: Future = Future()
                pending.add_done_callback(callback)
                pending.set_result(None)  # the callback runs here, in the holder
            finally:
                client._engine._release_io()
            assert seen and "done-callback" in str(seen[0])
            client.pull({"w": torch.zeros(8)}, 0).result(timeout=30)  # and the client still works
        finally:
            client.close()


def test_a_fused_frame_is_a_copy_even_of_one_tensor() -> None:
    values = torch.arange(6, dtype=torch.float32)
    writer, msg = FusedWriter(), Message(Kind.VALUES)
    writer.add({"key": 0}, values)
    writer.attach(msg)
    values.add_(100)  # the parameter changes while the frame would still be on its way
    frame = msg.frames[-1]
    assert msg.fused == 6
    assert torch.equal(torch.frombuffer(bytearray(frame), dtype=torch.float32), torch.arange(6, dtype=torch.float32))


def test_requests_cannot_be_cancelled_and_a_failed_call_gives_back_its_shared_areas() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()  # same host: shared areas in use
        try:
            client.declare({"a": torch.zeros(8), "b": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
            assert client._areas.has(0), "this test needs the shared-memory path"
            future = client.push({"a": torch.ones(8), "b": torch.ones(8)}, 0)
            assert future.cancel() is False
            future.result(timeout=30)
            with pytest.raises(ValueError, match="'b' has 5 elements"):
                client.push({"a": torch.ones(8), "b": torch.ones(5)}, 1)  # "a" reserved its area before "b" failed
            assert client._areas._busy == set()
            client.push({"a": torch.ones(8), "b": torch.ones(8)}, 1).result(timeout=30)
            assert sum(s["shm_bytes_in"] for s in client.stats()) == 2 * 16 * 4  # both pushes went through it
        finally:
            client.close()


def test_close_from_the_thread_that_holds_the_sockets_returns() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        client.declare({"w": torch.zeros(4)}, ("SGD", [{"lr": 1.0}]))
        done = threading.Event()

        def close_as_holder() -> None:  # as a done-callback would: this thread holds the sockets
            with client._engine._lock:
                client._engine._io_busy, client._engine._io_owner = True, threading.get_ident()
            client.close()
            done.set()

        closer = threading.Thread(target=close_as_holder, daemon=True)
        closer.start()
        closer.join(30)
        assert done.is_set(), "close() waited for itself"
        with pytest.raises(RuntimeError, match="closed"):
            client.pull({"w": torch.zeros(4)}, 0)


def test_close_gives_up_on_a_thread_that_never_lets_go_of_the_sockets(monkeypatch, caplog) -> None:
    monkeypatch.setattr("zps.worker._engine.CLOSE_WAIT", 0.3)
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        client.declare({"w": torch.zeros(4)}, ("SGD", [{"lr": 1.0}]))
        with client._engine._lock:  # as a done-callback blocked forever in another thread would
            client._engine._io_busy, client._engine._io_owner = True, -1
        done = threading.Event()

        def close() -> None:
            client.close(failure="closed by the test")
            done.set()

        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        closer.join(30)
        assert done.is_set(), "close() waited without end"
        assert "held the sockets" in caplog.text
        for sock in client._engine._sockets:  # left open for the thread that still uses them; closed here for the test
            sock.close(linger=0)
