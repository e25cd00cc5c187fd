"""The client's engine: the sockets to the servers and the requests in flight (ps-lite's Van and Customer).

A request is one user call, spread over messages to several servers; its :class:`concurrent.futures.Future`
resolves when every server involved answered. ZeroMQ sockets are not thread-safe, so one thread at a time holds
them: the caller that sends, then the caller that waits on a future, which takes the replies itself (no hand-off
between threads on the way back: a small round trip costs what the two processes do, not thread wake-ups). With no
caller waiting, a pump thread keeps outstanding requests moving every few milliseconds (callbacks,
``concurrent.futures.wait``, fire-and-forget pushes).

What a reply means for the caller's tensors is the :class:`ReplyPath`'s business (``zps.worker._replies``); the
engine only moves messages, matches replies to requests, enforces deadlines and fails everything loudly when the
transport breaks. Its sockets can be anything ZeroMQ connects to: tests drive it against an ``inproc://`` ROUTER.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from zps.protocol import security, transport
from zps.protocol.messages import (
    ErrorCode,
    Kind,
    Message,
    ProtocolError,
    decode_header,
    parse_frames,
    raise_if_error,
)
from zps.protocol.security import Secrets

log = logging.getLogger("zps.worker")

# Without a waiting caller, outstanding requests still progress this often (callbacks, concurrent.futures.wait).
PUMP_TICK = 0.002
# close() waits this long for a thread holding the sockets (it lets go within one poll unless a callback blocks).
CLOSE_WAIT = 10.0
# A request's deadline is the job's timeout plus this margin: a server answers a stuck pull itself at the timeout.
DEADLINE_MARGIN = 15.0


@dataclass
class Request:
    """One user call, possibly spread over several servers."""

    future: Future
    what: str
    deadline: float
    remaining: int  # messages not answered yet
    outs: dict[int, torch.Tensor] = field(default_factory=dict)  # key -> flat destination view
    replies: dict[int, Any] | None = None  # home -> reply body (or the whole message), when the caller wants them
    whole: bool = False  # keep whole reply messages (their frames too), not only their bodies
    error: BaseException | None = None
    marks: set[tuple[int, int]] = field(default_factory=set)  # shared areas reserved until the reply


@dataclass
class Sent:
    """One message in flight: its request, the server it was sent to, the home it is for (``--replicas``: the
    server the plan gives its keys; another serves them once that one died), its keys, and the message itself (kept
    to be sent again to the new primary after a failover)."""

    request: Request
    server: int
    home: int
    keys: set[int]
    msg: Message
    at: float


@dataclass(frozen=True)
class InPlace:
    """A reply part received straight into its destination: how many bytes came, and how many were expected."""

    received: int
    expected: int


class ReplyPath(Protocol):
    """What replies mean for the caller's tensors (implemented by ``zps.worker._replies.Replies``)."""

    def targets(self, header: Any, request: Request) -> dict[int, memoryview]:
        """Data part index -> the destination bytes the part may be received into (``recv_into``)."""

    def apply(self, msg: Message, request: Request) -> None:
        """Copy a VALUES reply into ``request.outs`` (raises ProtocolError for a malformed one)."""

    def answered(self, request: Request, keys: set[int]) -> None:
        """The server answered for ``keys``: what the request reserved for them is free again."""


class _Future(Future):
    """A request's future. Waiting on it (``result``/``exception``) does the socket work in the waiting thread."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    def result(self, timeout: float | None = None) -> Any:
        self._engine.wait(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._engine.wait(self, timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        """A request already handed to the servers cannot be taken back (its reply still lands): never cancels."""
        return False


class Engine:
    """The sockets to ``addresses`` (server rank = index) and every request in flight.

    ``failure()`` returns why the job failed (a peer lost, the coordinator gone), or None; a request then fails
    with that reason. ``timeout`` is the job's: a server that stays silent past it (plus a margin) fails the request
    naming that server. With ``secrets`` (``--secure``) every socket speaks CURVE with this worker's key.
    """

    def __init__(self, name: str, context: zmq.Context, addresses: Sequence[str], timeout: float,
                 replies: ReplyPath, failure: Callable[[], str | None], secrets: Secrets | None = None,
                 reroute: Callable[[], list[int] | None] | None = None,
                 lost: Callable[[int], None] | None = None) -> None:
        self.name = name
        # --replicas: home -> the server that serves its keys now; ``reroute()`` returns new routes after a failover
        self.routes = list(range(len(addresses)))
        self.reroute = reroute
        self.lost = lost  # --replicas: told the rank of a server whose connection dropped (it may have died)
        self._monitors: dict[zmq.Socket, int] = {}
        self._resent: set[int] = set()  # ids of messages sent again after the newest failover
        self._moved_from: set[int] = set()  # servers that answered MOVED since the newest failover (logged once)
        self._failover_at = 0.0
        self.addresses = list(addresses)
        self.timeout = timeout
        self.replies = replies
        self.failure = failure
        self._ids = itertools.count(1)
        self.sent_bytes = self.recv_bytes = 0  # what crossed the sockets (headers and frames)
        self._inflight: dict[int, Sent] = {}  # message id -> what was sent
        self._queue: collections.deque[tuple[int, Message, Request]] = collections.deque()
        # The sockets belong to whichever thread holds them (_io_busy): a caller waiting on a future, a caller
        # sending, or the pump. _lock guards that flag and the queue.
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # threads waiting for the sockets, or for a future another drives
        self._io_busy = False
        self._io_owner: int | None = None  # the thread holding the sockets
        self._waiters = 0
        self._broken: BaseException | None = None
        self._next_check = 0.0
        self._sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        wake_addr = f"inproc://zps-wake-{id(self)}"
        self._wake_rx = context.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = context.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._poller.register(self._wake_rx, zmq.POLLIN)
        for server, address in enumerate(self.addresses):
            sock = security.dealer(context, secrets)
            transport.connect(sock, address)
            self._sockets.append(sock)
            self._poller.register(sock, zmq.POLLIN)
            if lost is not None:  # a server that dies drops its connections at once; heartbeats take longer
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                self._monitors[monitor] = server
                self._poller.register(monitor, zmq.POLLIN)
        self._stop = threading.Event()
        self._work = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name=f"zps-pump-{name}", daemon=True)
        self._pump_thread.start()

    # -- submitting ------------------------------------------------------------------------------------
    def submit(self, parts: list[tuple[int, Message]], what: str, outs: dict[int, torch.Tensor] | None = None,
               keep_replies: bool = False, marks: set[tuple[int, int]] | None = None,
               keep_messages: bool = False) -> Future:
        """Send ``parts`` ((server, message) pairs; with ``--replicas`` the server is the keys' home, and the
        message goes to whichever server serves that home now) as one request; its future resolves when all are
        answered, to ``{server: reply body}`` when ``keep_replies`` (``{server: reply}`` when ``keep_messages``)."""
        failure = self.failure()
        if failure is not None:
            raise ProtocolError(ErrorCode.DEAD, failure)
        future = _Future(self)
        request = Request(future, what, time.monotonic() + self.timeout + DEADLINE_MARGIN, len(parts),
                          outs=outs or {}, replies={} if keep_replies or keep_messages else None, marks=marks or set(),
                          whole=keep_messages)
        with self._lock:
            if self._broken is not None:
                raise RuntimeError(f"{self._broken}; no new requests")
            if not parts:
                future.set_result({})
                return future
            self._queue.extend((server, part, request) for server, part in parts)
            mine = not self._io_busy
            if mine:
                self._io_busy, self._io_owner = True, threading.get_ident()
            else:  # another thread holds the sockets: it sends these at once
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # wake-ups already pending
                    pass
            self._work.set()
        if mine:
            try:
                self._send_queued()
            except Exception as exc:
                self._break(exc)
            finally:
                self._release_io()
        return future

    def _send_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                home, msg, request = self._queue.popleft()
            self._send(Sent(request, self.routes[home], home, {e["key"] for e in msg.keys}, msg, time.monotonic()))

    def _send(self, sent: Sent) -> None:
        sent.msg.id = next(self._ids)
        self._inflight[sent.msg.id] = sent
        if sent.server < 0:  # every copy of its keys is lost: the coordinator fails the job
            self._fail_one(sent.msg.id, ProtocolError(ErrorCode.DEAD, f"every copy of the keys of server {sent.home} "
                                                                      "is lost"))
        else:
            self.sent_bytes += transport.send(self._sockets[sent.server], sent.msg)

    def _failover(self, routes: list[int]) -> None:
        """Servers died: send every message in flight to a dead one again, to the new primary of its home (the
        servers apply each push once, whichever copy it reaches; a copy that applied it already just answers)."""
        now = time.monotonic()
        moved = [s for s in self._inflight.values() if routes[s.home] != s.server]
        log.warning("FAILOVER: %s: servers now serving homes %s: %s; sending %d requests again (the oldest waited "
                    "%.2fs)", self.name, list(range(len(routes))), routes, len(moved),
                    max((now - s.at for s in moved), default=0.0))
        self.routes = routes
        self._resent.clear()
        self._moved_from.clear()
        self._failover_at = now
        for sent in moved:
            del self._inflight[sent.msg.id]
            sent.server = routes[sent.home]
            self._send(sent)
            self._resent.add(sent.msg.id)

    # -- waiting ---------------------------------------------------------------------------------------
    def wait(self, future: Future, timeout: float | None) -> None:
        """Block until ``future`` resolves or ``timeout`` passes, doing the socket work in this thread when no other
        thread is: no hand-off between threads on the way to the caller."""
        end = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            with self._lock:
                if future.done():
                    return
                if self._io_busy and self._io_owner == threading.get_ident():
                    raise RuntimeError(
                        f"{self.name}: waiting on a zps future inside a done-callback would wait forever (the callback "
                        "runs in the thread that takes the replies); chain the work outside the callback"
                    )
                if self._io_busy or self._stop.is_set():  # another thread drives (or close() is failing everything);
                    # it wakes us when it resolves a future or lets go
                    self._waiters += 1
                    try:
                        self._turn.wait(0.05 if left is None else min(left, 0.05))
                    finally:
                        self._waiters -= 1
                    continue
                self._io_busy, self._io_owner = True, threading.get_ident()
            try:
                self._drive(future, end)
            except Exception as exc:
                self._break(exc)
            finally:
                self._release_io()

    def _drive(self, future: Future, end: float | None) -> None:
        while not future.done() and not self._stop.is_set():
            wait_ms = 50
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return
                wait_ms = max(0, min(wait_ms, int(left * 1000) + 1))
            self._step_io(wait_ms)

    def _step_io(self, wait_ms: int) -> None:
        """One round of socket work (the caller holds the sockets): send what is queued, take what arrived."""
        if self.reroute is not None:
            routes = self.reroute()
            if routes is not None:
                self._failover(routes)
        self._send_queued()
        events = dict(self._poller.poll(wait_ms))
        if self._wake_rx in events:
            while transport.readable(self._wake_rx):
                self._wake_rx.recv(zmq.NOBLOCK)
            self._send_queued()
        for server, sock in enumerate(self._sockets):
            if sock in events:
                while transport.readable(sock):
                    self._on_reply(server, *self._receive(sock))
        for monitor, server in self._monitors.items():
            if monitor in events:
                while transport.readable(monitor):
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                    if event["event"] == zmq.EVENT_DISCONNECTED and self.lost is not None:
                        log.warning("%s: the connection to server %d (%s) dropped", self.name, server,
                                    self.addresses[server])
                        self.lost(server)
        now = time.monotonic()
        if now >= self._next_check:  # deadlines and lost peers: a few times a second is plenty
            self._check_deadlines()
            self._next_check = now + 0.05

    def _release_io(self) -> None:
        with self._lock:
            self._io_busy, self._io_owner = False, None
            if self._waiters:
                self._turn.notify_all()
            if self._queue:  # queued while we were leaving: the pump sends it
                self._work.set()

    def _pump(self) -> None:
        """Progress when no caller waits: every few ms, if requests are outstanding and the sockets are free, send
        and take what is ready without blocking."""
        while not self._stop.is_set():
            if not (self._inflight or self._queue):
                self._work.clear()
                if not (self._inflight or self._queue):
                    self._work.wait(0.1)
                continue
            self._stop.wait(PUMP_TICK)
            with self._lock:
                if self._io_busy or self._broken is not None:
                    continue
                self._io_busy, self._io_owner = True, threading.get_ident()
            try:
                self._step_io(0)
            except Exception as exc:
                self._break(exc)
            finally:
                self._release_io()

    # -- replies ---------------------------------------------------------------------------------------
    def _receive(self, sock: zmq.Socket) -> tuple[list[Any], Any]:
        """Take one reply off ``sock``. Parts the reply path names are received straight into their destinations
        (``recv_into``: one copy, no intermediate frame), recorded as :class:`InPlace`; every other part comes as a
        zero-copy frame. Returns the parts and the unpacked header (None when it does not unpack; ``parse_frames``
        then says why)."""
        first = sock.recv(zmq.NOBLOCK, copy=False)
        frames: list[Any] = [first]
        try:
            head = decode_header(first)
        except ProtocolError:
            head = None
        if not sock.getsockopt(zmq.RCVMORE):
            return frames, head
        found = self._inflight.get(head["id"]) if isinstance(head, dict) and type(head.get("id")) is int else None
        targets = self.replies.targets(head, found.request) if found is not None else {}
        try:
            while True:
                target = targets.get(len(frames) - 1)
                if target is None:
                    frames.append(sock.recv(zmq.NOBLOCK, copy=False))
                else:
                    frames.append(InPlace(sock.recv_into(target, flags=zmq.NOBLOCK), target.nbytes))
                if not sock.getsockopt(zmq.RCVMORE):
                    return frames, head
        except BaseException:  # interrupted mid-message (Ctrl-C): drop its other parts, or they would be read as
            while sock.getsockopt(zmq.RCVMORE):  # the start of the next message
                sock.recv(zmq.NOBLOCK)
            raise

    def _on_reply(self, server: int, frames: list[Any], head: Any = None) -> None:
        self.recv_bytes += sum(f.received if isinstance(f, InPlace) else len(f) for f in frames)
        try:
            msg = parse_frames(frames, head)
        except ProtocolError as exc:
            log.error("%s: unreadable reply from server %d: %s", self.name, server, exc)
            return
        if (msg.kind is Kind.ERROR and msg.body.get("code") == ErrorCode.MOVED.value and self.reroute is not None
                and msg.id in self._inflight):
            # --replicas: the server was failed over while this waited there; it stays in flight and goes to the
            # new primary when this worker's own failover notice comes (or fails at its deadline)
            if server not in self._moved_from:
                self._moved_from.add(server)
                log.warning("%s: server %d was failed over with requests of this worker waiting there; they go to the "
                            "new primary once the failover notice comes", self.name, server)
            return
        found = self._inflight.pop(msg.id, None)
        if found is None:
            return  # a late reply to a request that already failed
        request, keys = found.request, found.keys
        if msg.id in self._resent:
            self._resent.discard(msg.id)
            if not self._resent:
                log.warning("FAILOVER: %s: every request sent again was answered %.2fs after the failover notice",
                            self.name, time.monotonic() - self._failover_at)
        try:
            raise_if_error(msg)
            self.replies.apply(msg, request)
            if request.replies is not None:
                request.replies[found.home] = msg if request.whole else msg.body
        except Exception as exc:  # the first error fails the whole call
            if request.error is None:
                request.error = exc
        self.replies.answered(request, keys)
        self._count_down(request)

    def _count_down(self, request: Request) -> None:
        request.remaining -= 1
        if request.remaining:
            return
        if not request.future.done():
            if request.error is not None:
                err = request.error
                if isinstance(err, ProtocolError):
                    err = ProtocolError(err.code, f"{self.name} {request.what}: {err.reason}")
                request.future.set_exception(err)
            else:
                request.future.set_result(request.replies if request.replies is not None else {})
        if self._waiters:  # a thread waiting for a future this thread resolved
            with self._lock:
                self._turn.notify_all()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        failure = self.failure()
        for msg_id, sent in list(self._inflight.items()):
            if failure is not None:  # _count_down puts "worker:N <what>:" in front
                reason = ProtocolError(ErrorCode.DEAD, failure)
            elif now > sent.request.deadline:
                reason = ProtocolError(ErrorCode.TIMEOUT, f"no reply from server {sent.server} "
                                                          f"({self.addresses[sent.server]}) within "
                                                          f"{self.timeout + DEADLINE_MARGIN:.0f}s")
            else:
                continue
            self._fail_one(msg_id, reason)

    def _fail_one(self, msg_id: int, reason: BaseException) -> None:
        request = self._inflight.pop(msg_id).request
        if request.error is None:
            request.error = reason
        self._count_down(request)

    # -- failure and shutdown --------------------------------------------------------------------------
    def _break(self, exc: Exception) -> None:
        """A transport failure (or a bug) in socket work: fail every request and refuse new ones, loudly."""
        log.error("%s: the client's transport failed: %r", self.name, exc)
        with self._lock:
            if self._broken is None:
                self._broken = RuntimeError(f"{self.name}: the client's transport failed: {exc!r}")
        self._fail_all(self._broken)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every request in flight or still queued (the caller holds the sockets)."""
        with self._lock:
            queued = [request for _, _, request in self._queue]
            self._queue.clear()
        for request in [s.request for s in self._inflight.values()] + queued:
            if not request.future.done():
                request.future.set_exception(exc)
        self._inflight.clear()
        with self._lock:
            self._turn.notify_all()

    def close(self) -> None:
        """Fail what is outstanding and close the sockets (they are taken from whoever holds them first)."""
        self._stop.set()
        self._work.set()
        me = threading.get_ident()
        if threading.current_thread() is not self._pump_thread:
            self._pump_thread.join(timeout=5)
        give_up = time.monotonic() + CLOSE_WAIT
        with self._lock:  # take the sockets for good: whoever holds them lets go within one poll
            while self._io_busy and self._io_owner != me and time.monotonic() < give_up:
                self._turn.wait(0.1)  # (a callback closing the client holds them itself)
            stuck = self._io_busy and self._io_owner != me
            self._io_busy, self._io_owner = True, me
            if self._broken is None:
                self._broken = RuntimeError(f"{self.name}: the client was closed")
        self._fail_all(RuntimeError(f"{self.name}: the client was closed with this request outstanding"))
        if stuck:  # a thread still inside a done-callback uses them: closing under it would crash the process
            log.warning("%s: another thread held the sockets for %.0fs (a blocking done-callback?); leaving them open",
                        self.name, CLOSE_WAIT)
        else:
            for sock in self._sockets:
                if self._monitors:
                    sock.disable_monitor()
            for sock in [*self._monitors, *self._sockets, self._wake_tx, self._wake_rx]:
                sock.close(linger=0)
