"""The client's socket work: replies received straight into their destinations, and progress without a waiter."""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
from concurrent.futures import Future

import pytest
import torch
import zmq

from zps.protocol import transport
from zps.protocol.messages import Kind, Message, ProtocolError, parse_frames
from zps.protocol.tensors import Decoders, fused_frame
from zps.worker.client import Client, _InPlace, _Request

from .cluster import local_cluster


_ADDRESSES = itertools.count()


def _values_reply(request_id: int, key: int, numel: int, payload: bytes) -> list[bytes]:
    entry = {"key": key, "codec": "none", "meta": {}, "bufs": [["float32", numel]], "nf": 1}
    return [bytes(f) for f in Message(Kind.VALUES, id=request_id, src="server:0", keys=[entry], frames=[payload]).to_frames()]


def _receive(dest: torch.Tensor, frames: list[bytes]):
    """Feed one reply through a real socket pair into a bare client that waits for key 7 into ``dest``."""
    client = Client.__new__(Client)  # only the receive path: no cluster needed
    client._decoders = Decoders()
    request = _Request(Future(), "pull of step 0", 0.0, 1, outs={7: dest.view(-1)})
    client._inflight = {5: (request, 0, {7})}
    ctx = zmq.Context.instance()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        address = f"inproc://zps-test-receive-{next(_ADDRESSES)}"
        rx.bind(address)
        tx.connect(address)
        tx.send_multipart(frames)
        assert rx.poll(5000)
        parts, head = client._receive(rx)
    finally:
        rx.close(linger=0)
        tx.close(linger=0)
    return client, request, parts, parse_frames(parts, head)


def test_uncompressed_values_land_in_the_destination_without_a_frame() -> None:
    dest = torch.zeros(4)
    where = dest.data_ptr()
    values = torch.tensor([1.0, -2.0, 3.5, 4.0])
    client, request, parts, msg = _receive(dest, _values_reply(5, 7, 4, values.numpy().tobytes()))
    assert isinstance(parts[1], _InPlace)
    client._copy_values(msg, request)
    assert dest.data_ptr() == where
    torch.testing.assert_close(dest, values, atol=0, rtol=0)


def test_a_destination_of_another_dtype_goes_through_the_frame() -> None:
    dest = torch.zeros(4, dtype=torch.float64)
    values = torch.tensor([1.0, -2.0, 3.5, 4.0])
    client, request, parts, msg = _receive(dest, _values_reply(5, 7, 4, values.numpy().tobytes()))
    assert not isinstance(parts[1], _InPlace)
    client._copy_values(msg, request)
    torch.testing.assert_close(dest, values.double(), atol=0, rtol=0)


@pytest.mark.parametrize("nbytes", [8, 24])
def test_a_values_frame_of_the_wrong_size_is_refused(nbytes: int) -> None:
    client, request, parts, msg = _receive(torch.zeros(4), _values_reply(5, 7, 4, bytes(nbytes)))
    with pytest.raises(ProtocolError, match=f"frame has {nbytes} bytes, expected 16"):
        client._copy_values(msg, request)


def test_a_reply_to_nothing_in_flight_is_taken_as_frames() -> None:
    dest = torch.zeros(4)
    _, _, parts, msg = _receive(dest, _values_reply(99, 7, 4, bytes(16)))
    assert not isinstance(parts[1], _InPlace) and msg.id == 99 and transport.frame_bytes(parts[1]) == bytes(16)


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

            with client._lock:  # this thread holds the sockets, as it does while it resolves futures
                client._io_busy, client._io_owner = True, threading.get_ident()
            try:
                pending: Future = Future()
                pending.add_done_callback(callback)
                pending.set_result(None)  # the callback runs here, in the holder
            finally:
                client._release_io()
            assert seen and "done-callback" in str(seen[0])
            client.pull({"w": torch.zeros(8)}, 0).result(timeout=30)  # and the client still works
        finally:
            client.close()


def test_a_fused_frame_is_a_copy_even_of_one_tensor() -> None:
    values = torch.arange(6, dtype=torch.float32)
    frame = fused_frame([values])
    values.add_(100)  # the parameter changes while the frame would still be on its way
    assert torch.equal(torch.frombuffer(bytearray(frame), dtype=torch.float32), torch.arange(6, dtype=torch.float32))


def test_requests_cannot_be_cancelled_and_a_failed_call_gives_back_its_shared_areas() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()  # same host: shared areas in use
        try:
            client.declare({"a": torch.zeros(8), "b": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
            assert client._segments, "this test needs the shared-memory path"
            future = client.push({"a": torch.ones(8), "b": torch.ones(8)}, 0)
            assert future.cancel() is False
            future.result(timeout=30)
            with pytest.raises(ValueError, match="'b' has 5 elements"):
                client.push({"a": torch.ones(8), "b": torch.ones(5)}, 1)  # "a" reserved its area before "b" failed
            assert client._shm_busy == set()
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
            with client._lock:
                client._io_busy, client._io_owner = True, threading.get_ident()
            client.close()
            done.set()

        closer = threading.Thread(target=close_as_holder, daemon=True)
        closer.start()
        closer.join(30)
        assert done.is_set(), "close() waited for itself"
        with pytest.raises(RuntimeError, match="closed"):
            client.pull({"w": torch.zeros(4)}, 0)


def test_close_gives_up_on_a_thread_that_never_lets_go_of_the_sockets(monkeypatch, caplog) -> None:
    monkeypatch.setattr("zps.worker.client._CLOSE_WAIT", 0.3)
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        client.declare({"w": torch.zeros(4)}, ("SGD", [{"lr": 1.0}]))
        with client._lock:  # as a done-callback blocked forever in another thread would
            client._io_busy, client._io_owner = True, -1
        done = threading.Event()
        closer = threading.Thread(target=lambda: (client.close(leave=False), done.set()), daemon=True)
        closer.start()
        closer.join(30)
        assert done.is_set(), "close() waited without end"
        assert "held the sockets" in caplog.text
        for sock in client._sockets:  # left open for the thread that still uses them; closed here for the test
            sock.close(linger=0)
