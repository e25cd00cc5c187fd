"""The low-level worker client: declare tensors, then push / pull / push_pull them by name, non-blocking.

Calls encode their tensors, send the messages and return a :class:`concurrent.futures.Future` at once. ZeroMQ
sockets are not thread-safe, so one thread at a time holds them: the caller that sends, then the caller that waits
on a future, which takes the replies itself (no hand-off between threads on the way back; a small round trip
costs what the two processes do, not thread wake-ups). With no caller waiting, a pump thread keeps outstanding
requests moving every few milliseconds (callbacks, ``concurrent.futures.wait``). A tensor is cut into
chunks by the sharding plan; each server gets its chunks in messages of about one chunk's bytes, so several are
in flight and small tensors share a message.

Delivery: a future resolves when every server involved answered. The server de-duplicates pushes on (worker,
step, key), so a push that reaches it twice is applied once. Every request has a deadline; a server that stays silent, a
reply naming an error, or a peer lost by the coordinator fails the future with a message saying which.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import zmq

from zps.protocol import transport
from zps.protocol.codecs import Codec, ErrorFeedback, codec_factory, make_codec
from zps.protocol.config import Config
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, decode_header, parse_frames, raise_if_error
from zps.protocol.plan import DEFAULT_CHUNK_BYTES, Chunk, ParamSpec, Plan, make_plan
from zps.protocol.rendezvous import RendezvousClient, Topology, check_failure
from zps.protocol.shm import Segment, ShmUnavailable
from zps.protocol.shm import layout as shm_layout
from zps.protocol.tensors import Decoders, FusedReader, encode_entry, fusable, fused_frame

log = logging.getLogger("zps.worker")

Tensors = Mapping[str, torch.Tensor]


@dataclass
class _Request:
    """One user call, possibly spread over several servers."""

    future: Future
    what: str
    deadline: float
    remaining: int  # messages not answered yet
    outs: dict[int, torch.Tensor] = field(default_factory=dict)  # key -> flat destination view
    replies: dict[int, dict[str, Any]] | None = None  # server -> reply body, when the caller wants them
    error: BaseException | None = None
    shm_marks: set[tuple[int, str]] = field(default_factory=set)  # (key, area) shared areas in use


def _copy_all(dests: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``dest.copy_(value)`` for each pair: one dispatch for many small tensors where torch can (foreach kernels
    want one device per list), else one copy each (copies are idempotent, so a refused batch is simply redone)."""
    if len(dests) > 1 and hasattr(torch, "_foreach_copy_"):
        try:
            torch._foreach_copy_(dests, values)
            return
        except RuntimeError:
            pass
    for dest, value in zip(dests, values):
        dest.copy_(value)


@dataclass(frozen=True)
class _InPlace:
    """A reply part received straight into its destination: how many bytes came, and how many were expected."""

    received: int
    expected: int


class _Future(Future):
    """A request's future. Waiting on it (``result``/``exception``) does the socket work in the waiting thread."""

    def __init__(self, client: "Client") -> None:
        super().__init__()
        self._client = client

    def result(self, timeout: float | None = None) -> Any:
        self._client._wait(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._client._wait(self, timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        """A request already handed to the servers cannot be taken back (its reply still lands): never cancels."""
        return False


# Without a waiting caller, outstanding requests still progress this often (callbacks, concurrent.futures.wait).
_PUMP_TICK = 0.002
# close() waits this long for a thread holding the sockets (it lets go within one poll unless a callback blocks).
_CLOSE_WAIT = 10.0


class Client:
    """A worker's connection to the parameter servers.

    Build with :meth:`from_env` inside a process started by ``zps`` (or pass a :class:`Config`), then
    :meth:`declare` the tensors once. Names are the keys of the mappings given to push/pull.
    """

    def __init__(
        self,
        config: Config,
        context: zmq.Context | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        codec: str | None = None,
        pull_codec: str | None = None,
        error_feedback: bool | None = None,
        compress_min: int | None = None,
        shm: bool | None = None,
    ) -> None:
        """``codec``/``pull_codec``/``error_feedback``/``compress_min`` default to the job's ``ZPS_*`` settings."""
        self.config = config
        codec = config.codec if codec is None else codec
        self.pull_codec = (config.pull_codec if pull_codec is None else pull_codec) or None
        error_feedback = config.error_feedback if error_feedback is None else error_feedback
        self.compress_min = config.compress_min if compress_min is None else compress_min
        self.use_shm = config.shm if shm is None else shm
        self._segments: dict[int, Segment] = {}  # server -> segment it mapped
        self._shm_areas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (push area, pull area)
        self._shm_busy: set[tuple[int, str]] = set()  # (key, "push" | "pull") areas with a request in flight
        self._none_codec = make_codec("none")
        self._push_factory = codec_factory(codec, error_feedback=error_feedback) if codec and codec != "none" else None
        self._decoders = Decoders((codec or "", self.pull_codec or ""))
        if self.pull_codec:
            self._decoders.get(self.pull_codec, "pull codec")  # a bad spec fails here, not at the first pull
        self.context = context or zmq.Context.instance()
        self.chunk_bytes = chunk_bytes
        self.rendezvous = RendezvousClient(config, self.context)
        try:
            self.topology: Topology = self.rendezvous.register()
        except BaseException:
            self.rendezvous.close()
            raise
        self.rank = self.topology.rank
        self.num_workers = self.topology.num_workers
        self.name = f"worker:{self.rank}"
        self.plan: Plan | None = None
        self._by_name: dict[str, list[Chunk]] = {}
        self._views_of: dict[str, tuple[torch.Tensor, int, dict[int, torch.Tensor], int]] = {}  # see _destinations
        self._codecs: dict[int, Codec] = {}
        self._ids = itertools.count(1)
        self._inflight: dict[int, tuple[_Request, int, set[int]]] = {}  # message id -> (request, server, keys)
        self._queue: collections.deque[tuple[int, Message, _Request]] = collections.deque()
        # The sockets belong to whichever thread holds them (_io_busy): a caller waiting on a future, a caller
        # sending, or the pump. _lock guards that flag, the queue and the shared-area marks.
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # threads waiting for the sockets, or for a future another drives
        self._io_busy = False
        self._io_owner: int | None = None  # the thread holding the sockets
        self._waiters = 0
        self._broken: BaseException | None = None
        self._closed = False
        self._next_check = 0.0
        self._sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        wake_addr = f"inproc://zps-wake-{id(self)}"
        self._wake_rx = self.context.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self.context.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._poller.register(self._wake_rx, zmq.POLLIN)
        for address in self.topology.servers:
            sock = transport.configure(self.context.socket(zmq.DEALER))
            transport.connect(sock, address)
            self._sockets.append(sock)
            self._poller.register(sock, zmq.POLLIN)
        self._stop = threading.Event()
        self._work = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name=f"zps-pump-{self.rank}", daemon=True)
        self._pump_thread.start()

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Client":
        return cls(Config.from_env(), **kwargs)

    # -- declaration -----------------------------------------------------------------------------------
    def declare(
        self,
        tensors: Tensors,
        optimizer: tuple[str, list[dict[str, Any]]] | None = None,
        groups: Mapping[str, int] | None = None,
    ) -> None:
        """Declare every tensor once, in the same order on every worker; rank 0's values initialise the servers.

        ``optimizer`` is (torch.optim class name, hyper-parameters per group) for the servers to build; ``groups``
        maps a name to its group index (default 0). Blocks until every server acknowledged.
        """
        if self.plan is not None:
            raise RuntimeError(f"{self.name}: declare() was already called; declare every tensor in one call")
        specs = [ParamSpec(name, tuple(t.shape), 4) for name, t in tensors.items()]
        self.plan = make_plan(specs, self.topology.num_servers, self.chunk_bytes)
        for index, spec in enumerate(self.plan.params):
            self._by_name[spec.name] = self.plan.chunks_of(index)
        self._group_of_param = [(groups or {}).get(spec.name, 0) for spec in self.plan.params]
        with_values = self.rank == 0
        if with_values and optimizer is None:
            raise ValueError("rank 0 must pass the server optimizer to declare()")
        messages: dict[int, Message] = {}
        created: dict[int, Segment] = {}
        layouts: dict[int, list[tuple[int, int]]] = {}  # server -> (push, pull) offsets of its chunks
        for server in range(self.topology.num_servers):
            keys, frames = [], []
            chunks = self.plan.chunks_on(server)
            if self.use_shm and chunks:
                layouts[server], data_bytes = shm_layout([c.numel for c in chunks])
                try:
                    created[server] = Segment.create(data_bytes)
                except ShmUnavailable as exc:
                    log.info("%s: no shared memory (%s); using TCP frames", self.name, exc)
            for i, chunk in enumerate(chunks):
                entry: dict[str, Any] = {
                    "key": chunk.key,
                    "name": chunk.name,
                    "offset": chunk.offset,
                    "numel": chunk.numel,
                    "dtype": "float32",
                    "group": (groups or {}).get(chunk.name, 0),
                    "nf": 0,
                }
                if server in created:
                    entry["shm"] = list(layouts[server][i])
                if with_values:
                    flat = self._flat(tensors[chunk.name])
                    enc, bufs = encode_entry(self._none_codec, flat[chunk.offset : chunk.offset + chunk.numel])
                    entry.update(enc)
                    frames.extend(bufs)
                keys.append(entry)
            body: dict[str, Any] = {}
            if with_values and optimizer is not None:
                body = {"optimizer": optimizer[0], "groups": optimizer[1]}
            if server in created:
                body["shm"] = created[server].describe()
            messages[server] = Message(Kind.INIT, src=self.name, keys=keys, body=body, frames=frames)
        try:
            replies = self._submit(messages, "declare", {}, keep_replies=True).result()
        finally:
            for segment in created.values():
                segment.unlink()  # mapped by both sides now (or not wanted): the name is no longer needed
        for server, segment in created.items():
            if replies.get(server, {}).get("shm"):
                self._segments[server] = segment
                for chunk, (push, pull) in zip(self.plan.chunks_on(server), layouts[server]):
                    self._shm_areas[chunk.key] = (segment.view(push, chunk.numel), segment.view(pull, chunk.numel))
            else:
                log.info("%s: server %d cannot map shared memory (%s); using TCP frames", self.name, server,
                         replies.get(server, {}).get("why", "another host"))
                segment.close()

    # -- data calls ------------------------------------------------------------------------------------
    def push(self, grads: Tensors, step: int, lr: float | list[float] | None = None) -> Future:
        """Push gradients of ``step``; resolves when every server acknowledged."""
        marks: set[tuple[int, str]] = set()
        with self._unmark_on_error(marks):
            messages = self._push_messages(Kind.PUSH, grads, step, lr, marks)
            return self._submit(messages, f"push of step {step}", {}, marks=marks)

    def pull(self, outs: Tensors, step: int) -> Future:
        """Pull values into ``outs`` (written in place, any device) as of ``step`` (BSP: after ``step`` updates)."""
        messages: dict[int, Message] = {}
        marks: set[tuple[int, str]] = set()
        with self._unmark_on_error(marks):
            for name in outs:
                for chunk in self._chunks(name):
                    msg = messages.setdefault(chunk.server, Message(Kind.PULL, src=self.name))
                    entry = {"key": chunk.key, "step": step, "nf": 0}
                    self._pull_options(chunk, entry, marks)
                    msg.keys.append(entry)
            return self._submit(messages, f"pull of step {step}", self._destinations(outs), marks=marks)

    def push_pull(self, grads: Tensors, outs: Tensors, step: int, lr: float | list[float] | None = None) -> Future:
        """Push the gradients of ``step``, then pull the values of step ``step + 1`` into ``outs``; one round trip."""
        if set(grads) != set(outs):
            raise ValueError("push_pull needs the same names in grads and outs")
        marks: set[tuple[int, str]] = set()
        with self._unmark_on_error(marks):
            messages = self._push_messages(Kind.PUSH_PULL, grads, step, lr, marks)
            return self._submit(messages, f"push_pull of step {step}", self._destinations(outs), marks=marks)

    def stats(self) -> list[dict[str, Any]]:
        """Each server's counters and consistency record, by server rank."""
        messages = {s: Message(Kind.STATS, src=self.name) for s in range(self.topology.num_servers)}
        request = self._submit(messages, "stats", {}, keep_replies=True)
        replies = request.result()
        return [replies[s] for s in range(self.topology.num_servers)]

    def leave(self, timeout: float | None = None) -> None:
        """Tell every server this worker is done, so BSP and SSP stop waiting for it."""
        messages = {s: Message(Kind.LEAVE, src=self.name) for s in range(self.topology.num_servers)}
        self._submit(messages, "leave", {}).result(timeout=timeout)

    # -- helpers ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _unmark_on_error(self, marks: set[tuple[int, str]]) -> Iterator[None]:
        """A call that fails before its request is queued gives back the shared areas it reserved."""
        try:
            yield
        except BaseException:
            with self._lock:
                self._shm_busy -= marks
            raise

    @staticmethod
    def _flat(tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach() if tensor.requires_grad else tensor
        if t.dtype != torch.float32:
            t = t.float()
        return t if t.dim() == 1 else t.reshape(-1)

    def _chunks(self, name: str) -> list[Chunk]:
        try:
            return self._by_name[name]
        except KeyError:
            if self.plan is None:
                raise RuntimeError(f"{self.name}: call declare() before pushing or pulling") from None
            raise KeyError(f"{name!r} was not declared; declared: {', '.join(self._by_name)}") from None

    def _declared(self, name: str) -> tuple[list[Chunk], int]:
        """The chunks of ``name`` and its declared number of elements."""
        chunks = self._chunks(name)
        return chunks, self.plan.params[chunks[0].param].numel  # type: ignore[union-attr]

    def _compressed(self, chunk: Chunk) -> bool:
        """Small tensors (biases, norms) go uncompressed: their bytes are few and their precision matters."""
        return self.plan.params[chunk.param].numel >= self.compress_min  # type: ignore[union-attr]

    def _codec(self, chunk: Chunk) -> Codec:
        """The push codec of a chunk: one instance per key, since codecs and error feedback keep state."""
        codec = self._codecs.get(chunk.key)
        if codec is None:
            use = self._push_factory is not None and self._compressed(chunk)
            codec = self._codecs[chunk.key] = self._push_factory() if use else self._none_codec  # type: ignore[misc]
        return codec

    def _shm_area(self, chunk: Chunk, area: str, marks: set[tuple[int, str]]) -> torch.Tensor | None:
        """The shared area of ``chunk`` for ``area`` ("push" or "pull"), reserved until the reply, or None when
        this server has no segment or a request using that area is still in flight (then frames are used)."""
        if chunk.server not in self._segments:
            return None
        mark = (chunk.key, area)
        with self._lock:
            if mark in self._shm_busy:
                return None
            self._shm_busy.add(mark)
        marks.add(mark)
        return self._shm_areas[chunk.key][0 if area == "push" else 1]

    def _pull_options(self, chunk: Chunk, entry: dict[str, Any], marks: set[tuple[int, str]]) -> None:
        """How the values of ``chunk`` should come back: a compressed delta, the shared pull area, or a frame."""
        if self.pull_codec and self._compressed(chunk):
            entry["pc"] = self.pull_codec
        elif self._shm_area(chunk, "pull", marks) is not None:
            entry["pshm"] = 1

    def _push_messages(
        self, kind: Kind, grads: Tensors, step: int, lr: float | list[float] | None, marks: set[tuple[int, str]]
    ) -> dict[int, Message]:
        """``lr``: the learning rate (one, or one per optimizer group) the servers apply this step with."""
        body = {} if lr is None else {"lr": [float(x) for x in lr] if isinstance(lr, (list, tuple)) else [float(lr)]}
        messages: dict[int, Message] = {}
        for name, grad in grads.items():
            flat = self._flat(grad)
            chunks, declared = self._declared(name)
            if flat.numel() != declared:
                raise ValueError(f"{name!r} has {flat.numel()} elements but was declared with {declared}")
            whole = len(chunks) == 1
            for chunk in chunks:
                msg = messages.get(chunk.server)
                if msg is None:
                    msg = messages[chunk.server] = Message(kind, src=self.name, body=body)
                codec = self._codec(chunk)
                if isinstance(codec, ErrorFeedback) and body:
                    lrs = body["lr"]
                    group_lr = lrs[min(self._group_of_param[chunk.param], len(lrs) - 1)]
                    if group_lr > 0:
                        codec.set_lr(group_lr)
                part = flat if whole else flat[chunk.offset : chunk.offset + chunk.numel]
                shared = codec is self._none_codec and chunk.server in self._segments
                area = self._shm_area(chunk, "push", marks) if shared else None
                if area is not None:
                    area.copy_(part)  # the only copy: the server reads it in place
                    entry, frames = {"codec": "none", "meta": {}, "bufs": [["float32", chunk.numel]], "nf": 0, "shm": 1}, []
                elif codec is self._none_codec and fusable(chunk.numel):
                    entry, frames = {"nf": 0, "_fz": part}, []  # into the message's fused frame (_fuse)
                else:
                    entry, frames = encode_entry(codec, part)
                entry["key"], entry["step"] = chunk.key, step
                if kind is Kind.PUSH_PULL and (self.pull_codec or chunk.server in self._segments):
                    self._pull_options(chunk, entry, marks)  # else: values come back as frames
                msg.keys.append(entry)
                msg.frames.extend(frames)
        return messages

    def _destinations(self, outs: Tensors) -> dict[int, torch.Tensor]:
        """Key -> the flat view of ``outs`` it is written into. A model pulls into the same tensors every step, so
        the views are kept per (name, tensor, storage address) and built again only when one of those changes."""
        dest: dict[int, torch.Tensor] = {}
        for name, out in outs.items():
            cached = self._views_of.get(name)
            if (cached is not None and cached[0] is out and cached[1] == out.data_ptr() and out.numel() == cached[3]
                    and out.is_contiguous()):
                dest.update(cached[2])
                continue
            chunks, declared = self._declared(name)
            if out.numel() != declared:
                raise ValueError(f"pull destination {name!r} has {out.numel()} elements but was declared with {declared}")
            if not out.is_contiguous():
                raise ValueError(f"pull destination {name!r} must be contiguous")
            flat = out.detach().view(-1)
            views = {chunk.key: flat[chunk.offset : chunk.offset + chunk.numel] for chunk in chunks}
            self._views_of[name] = (out, out.data_ptr(), views, declared)
            dest.update(views)
        return dest

    # -- the sockets: driven by whichever thread waits ---------------------------------------------------
    def _submit(
        self,
        messages: dict[int, Message],
        what: str,
        outs: dict[int, torch.Tensor],
        keep_replies: bool = False,
        marks: set[tuple[int, str]] | None = None,
    ) -> Future:
        check_failure(self.rendezvous)
        future = _Future(self)
        parts = [(server, self._fuse(part)) for server, msg in messages.items() for part in self._split(msg)]
        request = _Request(future, what, time.monotonic() + self.config.timeout + 15, len(parts), outs=outs)
        request.replies = {} if keep_replies else None
        request.shm_marks = marks or set()
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

    def _wait(self, future: Future, timeout: float | None) -> None:
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
        """Progress when no caller waits (callbacks, ``concurrent.futures.wait``, fire-and-forget pushes): every few
        ms, if requests are outstanding and the sockets are free, send and take what is ready without blocking."""
        while not self._stop.is_set():
            if not (self._inflight or self._queue):
                self._work.clear()
                if not (self._inflight or self._queue):
                    self._work.wait(0.1)
                continue
            self._stop.wait(_PUMP_TICK)
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

    def _break(self, exc: Exception) -> None:
        """A transport failure (or a bug) in socket work: fail every request and refuse new ones, loudly."""
        log.error("%s: the client's transport failed: %r", self.name, exc)
        with self._lock:
            if self._broken is None:
                self._broken = RuntimeError(f"{self.name}: the client's transport failed: {exc!r}")
        self._fail_all(self._broken)

    def _send_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                server, msg, request = self._queue.popleft()
            msg.id = next(self._ids)
            self._inflight[msg.id] = (request, server, {e["key"] for e in msg.keys})
            transport.send(self._sockets[server], msg)

    def _fuse(self, msg: Message) -> Message:
        """Put the message's small uncompressed keys into one frame, the last, each at its element offset; a lone
        small key keeps a frame of its own (nothing to save)."""
        small = [entry for entry in msg.keys if "_fz" in entry]
        if len(small) == 1:
            entry = small[0]
            fields, frames = encode_entry(self._none_codec, entry.pop("_fz"))
            entry.update(fields)
            index = msg.keys.index(entry)
            at = sum(e.get("nf", 0) for e in msg.keys[:index])
            msg.frames[at:at] = frames
        elif small:
            offset = 0
            tensors = []
            for entry in small:
                tensor = entry.pop("_fz")
                entry["fz"] = offset
                offset += tensor.numel()
                tensors.append(tensor)
            msg.fused = offset
            msg.frames.append(fused_frame(tensors))
        return msg

    def _split(self, msg: Message) -> list[Message]:
        """Cut a data message into parts of about one chunk's bytes: several are then in flight per server, so
        the server applies one while the next still arrives, and many small keys still share one message."""
        if msg.kind not in (Kind.PUSH, Kind.PULL, Kind.PUSH_PULL) or len(msg.keys) < 2:
            return [msg]
        parts: list[Message] = []
        current = Message(msg.kind, src=msg.src, body=msg.body)
        size, offset = 0, 0
        for entry in msg.keys:
            nf = entry.get("nf", 0)
            numel = self.plan.chunks[entry["key"]].numel  # type: ignore[union-attr]
            if current.keys and size + numel * 4 > self.chunk_bytes:
                parts.append(current)
                current, size = Message(msg.kind, src=msg.src, body=msg.body), 0
            current.keys.append(entry)
            current.frames.extend(msg.frames[offset : offset + nf])
            offset += nf
            size += numel * 4
        parts.append(current)
        return parts

    def _receive(self, sock: zmq.Socket) -> tuple[list[Any], Any]:
        """Take one reply off ``sock``. Uncompressed values for a CPU float32 destination are received straight into
        it (``recv_into``: one copy, no intermediate frame); every other part comes as a zero-copy frame. A part
        received in place is an :class:`_InPlace` record, checked with the rest of the message in ``_copy_values``.
        Returns the parts and the unpacked header (None when it does not unpack; ``parse_frames`` then says why)."""
        first = sock.recv(zmq.NOBLOCK, copy=False)
        frames: list[Any] = [first]
        try:
            head = decode_header(first)
        except ProtocolError:
            head = None
        if not sock.getsockopt(zmq.RCVMORE):
            return frames, head
        targets = self._targets(head)
        try:
            while True:
                target = targets.get(len(frames) - 1)
                if target is None:
                    frames.append(sock.recv(zmq.NOBLOCK, copy=False))
                else:
                    frames.append(_InPlace(sock.recv_into(target, flags=zmq.NOBLOCK), target.nbytes))
                if not sock.getsockopt(zmq.RCVMORE):
                    return frames, head
        except BaseException:  # interrupted mid-message (Ctrl-C): drop its other parts, or they would be read as
            while sock.getsockopt(zmq.RCVMORE):  # the start of the next message
                sock.recv(zmq.NOBLOCK)
            raise

    def _targets(self, header: Any) -> dict[int, memoryview]:
        """Data part index -> the destination's bytes, for the parts of a VALUES reply that can be received in place.
        A malformed header gets no targets (``parse_frames`` then says what is wrong with it)."""
        try:
            found = self._inflight.get(header.get("id")) if header.get("kind") == Kind.VALUES.value else None
            if found is None:
                return {}
            outs = found[0].outs
            targets: dict[int, memoryview] = {}
            index = 0
            for entry in header.get("keys", []):
                nf = entry.get("nf", 0)
                dest = outs.get(entry.get("key"))
                if (
                    nf == 1 and not entry.get("delta") and entry.get("codec", "none") == "none" and dest is not None
                    and dest.device.type == "cpu" and dest.dtype == torch.float32 and dest.is_contiguous()
                    and entry.get("bufs") == [["float32", dest.numel()]]
                ):
                    targets[index] = memoryview(dest.numpy()).cast("B")
                index += nf if type(nf) is int and nf > 0 else 0
            return targets
        except Exception:  # noqa: BLE001  anything malformed is parse_frames' to report
            return {}

    def _on_reply(self, server: int, frames: list[Any], head: Any = None) -> None:
        try:
            msg = parse_frames(frames, head)
        except ProtocolError as exc:
            log.error("%s: unreadable reply from server %d: %s", self.name, server, exc)
            return
        found = self._inflight.pop(msg.id, None)
        if found is None:
            return  # a late reply to a request that already failed
        request, _, keys = found
        try:
            raise_if_error(msg)
            if msg.kind is Kind.VALUES:
                self._copy_values(msg, request)
            if request.replies is not None:
                request.replies[server] = msg.body
        except Exception as exc:  # the first error fails the whole call
            if request.error is None:
                request.error = exc
        self._release(request, keys)
        request.remaining -= 1
        if not request.remaining:
            self._finish(request)

    def _release(self, request: _Request, keys: set[int]) -> None:
        """The server answered for ``keys``: their shared areas may be written again."""
        if request.shm_marks:
            done = {m for m in request.shm_marks if m[0] in keys}
            request.shm_marks -= done
            with self._lock:
                self._shm_busy -= done

    def _copy_values(self, msg: Message, request: _Request) -> None:
        offset = 0
        fused = FusedReader(msg.frames, msg.fused, "values") if msg.fused else None
        fused_dests: list[torch.Tensor] = []  # copied in one call at the end (many small keys)
        fused_values: list[torch.Tensor] = []
        for entry in msg.keys:
            nf = entry.get("nf", 0)
            frames = msg.frames[offset : offset + nf]
            offset += nf
            dest = request.outs.get(entry["key"])
            if dest is None:
                raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"server sent key {entry['key']} that was not asked for")
            if fused is not None and "fz" in entry:
                fused_values.append(fused.get(entry, dest.numel(), "values"))
                fused_dests.append(dest)
                continue
            what = f"values of key {entry['key']}"
            if frames and isinstance(frames[0], _InPlace):  # already in ``dest``; only its size is left to check
                if frames[0].received != frames[0].expected:
                    raise ProtocolError(ErrorCode.FRAME_SIZE, f"{what}: frame has {frames[0].received} bytes, expected {frames[0].expected}")
                continue
            if entry.get("pshm"):
                areas = self._shm_areas.get(entry["key"])
                if areas is None:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: shared-memory reply without a segment")
                values = areas[1]
            else:
                values = self._decoders.decode(entry, frames, dest.numel(), torch.float32, what)
            if entry.get("delta"):
                dest.add_(values.to(dest.device))
            else:
                dest.copy_(values)
        if fused_dests:
            _copy_all(fused_dests, fused_values)

    def _finish(self, request: _Request) -> None:
        if request.future.done():
            return
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
        failure = self.rendezvous.failure
        for msg_id, (request, server, _) in list(self._inflight.items()):
            if failure is not None:  # _finish puts "worker:N <what>:" in front
                reason = ProtocolError(ErrorCode.DEAD, failure)
            elif now > request.deadline:
                reason = ProtocolError(
                    ErrorCode.TIMEOUT,
                    f"no reply from server {server} ({self.topology.servers[server]}) within {self.config.timeout + 15:.0f}s",
                )
            else:
                continue
            del self._inflight[msg_id]
            if request.error is None:
                request.error = reason
            request.remaining -= 1
            if not request.remaining:
                self._finish(request)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every request in flight or still queued (the caller holds the sockets)."""
        with self._lock:
            queued = [request for _, _, request in self._queue]
            self._queue.clear()
        for request in [r for r, _, _ in self._inflight.values()] + queued:
            if not request.future.done():
                request.future.set_exception(exc)
        self._inflight.clear()
        with self._lock:
            self._turn.notify_all()

    # -- shutdown --------------------------------------------------------------------------------------
    def close(self, leave: bool = True) -> None:
        """Leave the servers (so nobody waits for this worker), tell the coordinator, close the sockets."""
        if self._closed:
            return
        try:
            if leave and self.plan is not None and self.rendezvous.failure is None:
                try:
                    self.leave(timeout=5.0)  # best effort: a server that is gone cannot be waited for
                except Exception as exc:  # the servers may be gone already at the end of a failed job
                    log.warning("%s: leave failed: %s", self.name, exc)
        finally:
            self._closed = True
            self._stop.set()
            self._work.set()
            me = threading.get_ident()
            if threading.current_thread() is not self._pump_thread:
                self._pump_thread.join(timeout=5)
            give_up = time.monotonic() + _CLOSE_WAIT
            with self._lock:  # take the sockets for good: whoever holds them lets go within one poll
                while self._io_busy and self._io_owner != me and time.monotonic() < give_up:
                    self._turn.wait(0.1)  # (a callback closing the client holds them itself)
                stuck = self._io_busy and self._io_owner != me
                self._io_busy, self._io_owner = True, me
                if self._broken is None:
                    self._broken = RuntimeError(f"{self.name}: the client was closed")
            self._fail_all(RuntimeError(f"{self.name}: the client was closed with this request outstanding"))
            if stuck:  # a thread still inside a done-callback uses them: closing under it would crash the process
                log.warning("%s: another thread held the sockets for %.0fs (a blocking done-callback?); "
                            "leaving them open", self.name, _CLOSE_WAIT)
            else:
                for sock in [*self._sockets, self._wake_tx, self._wake_rx]:
                    sock.close(linger=0)
            self._shm_areas.clear()  # the views first, so the mappings can close
            for segment in self._segments.values():
                segment.close()
            self._segments.clear()
            self.rendezvous.done()
            self.rendezvous.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
