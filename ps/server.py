"""The parameter-server process: a ZeroMQ ROUTER loop over the shard store.

Every request is validated in full before any state changes: a message with one bad key changes nothing and
gets an ERROR reply naming the problem, and the loop keeps serving. Pulls that cannot be answered yet (BSP
versions, SSP clocks, keys not yet initialised) wait in a list with a deadline; when it passes, the worker gets
an ERROR naming exactly which workers or keys held it up.
"""
from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from zps.protocol import transport
from zps.protocol.codecs import Codec, make_codec
from zps.protocol.config import Config
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply, parse_frames
from zps.protocol.rendezvous import RendezvousClient, RendezvousError, Topology
from zps.protocol.shm import Segment, ShmUnavailable
from zps.protocol.tensors import DTYPES, Decoders, FusedReader, dtype_from_name, encode_entry, entry_encoded, fusable, fused_frame

from .consistency import Consistency, make_consistency
from .optim import build_optimizer, clean_hparams, optimizer_class
from .store import KeyState, Optimizers

log = logging.getLogger("zps.server")

_WORKER_SRC = re.compile(r"^worker:(\d+)$")
# Freed message buffers and optimizer temporaries go back to the OS when the server has been idle this long, or
# after this many bytes under continuous load (trimming more often makes the next messages fault pages in again).
_TRIM_WHEN_IDLE = 0.2
_TRIM_BACKSTOP = 1 << 30


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return lambda: None


# Message buffers are freed after each request, but glibc may keep the pages: give them back now and then, so the
# server's resident memory stays close to parameters + optimizer state (a few ms per call).
release_free_memory = _malloc_trim()


@dataclass
class _Pending:
    """A pull waiting for its keys to become ready."""

    identity: bytes
    request_id: int
    worker: int
    states: list[KeyState]
    step: int
    deadline: float
    pull_codecs: list[str | None]  # per key: send the change since this worker's last pull, encoded so
    pull_shm: list[bool]  # per key: answer through the worker's shared pull area


class Server:
    """One shard server. ``run()`` registers with the coordinator and serves until told to shut down."""

    def __init__(self, config: Config, context: zmq.Context | None = None, stop: threading.Event | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.stop = stop or threading.Event()
        self.keys: dict[int, KeyState] = {}
        self.optimizers = Optimizers()
        self.pending: list[_Pending] = []
        self.consistency: Consistency | None = None
        self.topology: Topology | None = None
        self.name = "server:?"
        self._decoders = Decoders((config.codec, config.pull_codec))
        self._none = make_codec("none")
        # compressed pull: what each worker holds of each key, and the encoder that sends it deltas
        self._views: dict[tuple[int, int], tuple[torch.Tensor, Codec]] = {}
        # same-host fast path: each worker's shared segment and, per (worker, key), its (push, pull) offsets
        self._segments: dict[int, Segment] = {}
        self._shm_areas: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (worker, key) -> (push, pull)
        self._workers: dict[str, int] = {}  # src -> worker rank, once checked
        self._since_trim = 0  # bytes received since freed memory was last given back
        self._last_request = time.monotonic()
        self.counters = {"requests": 0, "errors": 0, "pushes_applied": 0, "duplicates": 0, "bytes_in": 0, "bytes_out": 0,
                         "shm_bytes_in": 0, "shm_bytes_out": 0}

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> int:
        sock = transport.configure(self.context.socket(zmq.ROUTER))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        address = transport.bind_free(sock, self.config.host)
        rendezvous = RendezvousClient(self.config, self.context)
        try:
            try:
                self.topology = rendezvous.register(address)
            except RendezvousError as exc:
                log.error("%s could not join the cluster: %s", self.name, exc.reason)
                return 1
            self.name = f"server:{self.topology.rank}"
            self.consistency = make_consistency(self.topology.mode, self.topology.num_workers, self.topology.staleness)
            log.info("%s serving at %s (%s)", self.name, address, self.topology.mode)
            self._serve(sock, rendezvous)
            if rendezvous.failure:
                log.error("%s: %s", self.name, rendezvous.failure)
                return 1
            return 0
        finally:
            rendezvous.done()
            rendezvous.close()
            sock.close(linger=0)

    def _trim(self) -> None:
        self._since_trim = 0
        release_free_memory()

    def _serve(self, sock: zmq.Socket, rendezvous: RendezvousClient) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self.stop.is_set() and not rendezvous.shutdown_requested.is_set():
            wait_ms = 100
            if self.pending:
                soonest = min(p.deadline for p in self.pending)
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            if poller.poll(wait_ms):
                # drain what is queued before checking deadlines again
                for _ in range(256):
                    if not transport.readable(sock):
                        break
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    received = sum(len(f) for f in frames[2:])
                    self.counters["bytes_in"] += received
                    self._handle(sock, frames)
                    self._since_trim += 1 + received
                    del frames  # the message's buffers are free from here on
                    self._last_request = time.monotonic()
                    if self._since_trim >= _TRIM_BACKSTOP:
                        self._trim()
            elif self._since_trim and time.monotonic() - self._last_request >= _TRIM_WHEN_IDLE:
                self._trim()
            if self.pending:
                self._expire(sock)
        reason = rendezvous.failure or "the job is shutting down"
        for p in self.pending:
            self._send(sock, p.identity, error_reply(p.request_id, self.name, ErrorCode.DEAD, f"{self.name}: {reason}"))
        self.pending.clear()

    # -- dispatch --------------------------------------------------------------------------------------
    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message) -> None:
        self.counters["bytes_out"] += sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in msg.frames)
        transport.send(sock, msg, identity=identity)

    def _handle(self, sock: zmq.Socket, frames: list[Any]) -> None:
        self.counters["requests"] += 1
        identity = transport.frame_bytes(frames[0])
        request_id = 0
        try:
            msg = parse_frames(frames[1:])
            request_id = msg.id
            reply = self.handle(identity, msg)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            log.warning("%s rejected a request: %s", self.name, exc)
            reply = error_reply(request_id, self.name, exc.code, f"{self.name}: {exc.reason}")
        except Exception as exc:  # a bug must not take the server down; the worker hears about it
            self.counters["errors"] += 1
            log.exception("%s: internal error", self.name)
            reply = error_reply(request_id, self.name, ErrorCode.INTERNAL, f"{self.name}: {type(exc).__name__}: {exc}")
        if reply is not None:
            self._send(sock, identity, reply)
        self._flush_ready(sock)

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        """Serve one parsed request; return the reply, or None when it waits in ``pending``."""
        if msg.kind is Kind.INIT:
            return self._init(msg)
        if msg.kind in (Kind.PUSH, Kind.PUSH_PULL):
            worker = self._worker(msg)
            if msg.kind is Kind.PUSH:
                self._push(msg, worker)
                return Message(Kind.OK, id=msg.id, src=self.name)
            pending = self._pull_request(identity, msg, worker, [e.get("step", 0) + 1 for e in msg.keys])
            self._push(msg, worker)  # the pull half was checked first: a refused message changes nothing
            return self._pull(pending)
        if msg.kind is Kind.PULL:
            worker = self._worker(msg)
            return self._pull(self._pull_request(identity, msg, worker, [e.get("step", 0) for e in msg.keys]))
        if msg.kind is Kind.LEAVE:
            worker = self._worker(msg)
            assert self.consistency is not None
            updates = self.consistency.leave(worker, self.keys.values())
            self.optimizers.apply(updates)
            self.counters["pushes_applied"] += len(updates)
            for key in [k for k in self._views if k[0] == worker]:
                del self._views[key]
            for key in [k for k in self._shm_areas if k[0] == worker]:
                del self._shm_areas[key]
            segment = self._segments.pop(worker, None)
            if segment is not None:
                segment.close()
            return Message(Kind.OK, id=msg.id, src=self.name)
        if msg.kind is Kind.STATS:
            return Message(Kind.OK, id=msg.id, src=self.name, body=self.stats())
        raise ProtocolError(ErrorCode.BAD_KIND, f"a server does not serve {msg.kind.value!r} requests")

    def _worker(self, msg: Message) -> int:
        worker = self._workers.get(msg.src)
        if worker is not None:
            return worker
        match = _WORKER_SRC.match(msg.src)
        assert self.topology is not None
        if not match or int(match.group(1)) >= self.topology.num_workers:
            raise ProtocolError(
                ErrorCode.BAD_HEADER,
                f"'src' must be worker:N with N < {self.topology.num_workers}, got {msg.src!r}",
            )
        worker = self._workers[msg.src] = int(match.group(1))
        return worker

    def _state(self, entry: dict[str, Any], initialized: bool = True) -> KeyState:
        key = entry["key"]
        state = self.keys.get(key)
        if state is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"key {key} was never declared (INIT it first)")
        if initialized and not state.initialized:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, f"{state.label()} has no values yet: rank 0 must INIT it")
        return state

    # -- INIT ------------------------------------------------------------------------------------------
    def _init(self, msg: Message) -> Message:
        """Declare keys (every worker) and set their values and optimizer (rank 0). All-or-nothing."""
        worker = self._worker(msg)
        body = msg.body
        opt_name = body.get("optimizer")
        groups = body.get("groups", [])
        if opt_name is not None:
            optimizer_class(opt_name)
            if not isinstance(groups, list) or not groups:
                raise ProtocolError(ErrorCode.BAD_OPTIMIZER, "'groups' must be a non-empty list of hyper-parameter maps")
        declared: list[tuple[dict[str, Any], KeyState | None]] = []
        values: list[torch.Tensor | None] = []
        offset = 0
        seen: set[int] = set()
        for entry in msg.keys:
            key, numel, name = entry["key"], entry.get("numel"), entry.get("name", "")
            if key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key} appears twice in one INIT")
            seen.add(key)
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'numel' must be a non-negative integer")
            if entry.get("dtype", "float32") not in DTYPES or not isinstance(name, str):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: bad 'dtype' or 'name'")
            group = entry.get("group", 0)
            if not isinstance(group, int) or isinstance(group, bool) or group < 0:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' must be a non-negative integer, got {group!r}")
            existing = self.keys.get(key)
            if existing is not None and (existing.numel, existing.name, existing.group) != (numel, name, group):
                raise ProtocolError(
                    ErrorCode.CONFLICT,
                    f"worker {worker} declares key {key} as {name!r} with {numel} elements in group {group}, but it was "
                    f"declared as {existing.name!r} with {existing.numel} in group {existing.group}: do all workers "
                    "build the same model and optimizer?",
                )
            nf = entry.get("nf", 0)
            frames = msg.frames[offset : offset + nf]
            offset += nf
            tensor = None
            if nf:
                if opt_name is None:
                    raise ProtocolError(ErrorCode.BAD_OPTIMIZER, "INIT with values must name the server 'optimizer'")
                if group >= len(groups):
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' {group!r} is not one of the {len(groups)} groups")
                decoded = self._decoders.decode(entry, frames, numel, dtype_from_name(entry.get("dtype", "float32")), f"INIT of key {key}")
                tensor = decoded.to(torch.float32, copy=True)
                if group in self.optimizers.by_group:  # joins that optimizer: its hyper-parameters must still be sane
                    clean_hparams(optimizer_class(opt_name), groups[group])
                else:  # refuse now what torch would refuse when building it
                    build_optimizer(opt_name, groups[group], torch.zeros(1, requires_grad=True))
            declared.append((entry, existing))
            values.append(tensor)
        segment, shm_reply = self._attach(worker, body.get("shm"), msg.keys)
        # every check passed: now change state
        if segment is not None:
            old = self._segments.pop(worker, None)
            if old is not None:
                old.close()
            self._segments[worker] = segment
            for entry in msg.keys:
                push, pull = entry["shm"]
                self._shm_areas[(worker, entry["key"])] = (segment.view(push, entry["numel"]), segment.view(pull, entry["numel"]))
        for (entry, existing), tensor in zip(declared, values):
            state = existing or KeyState(
                key=entry["key"],
                numel=entry["numel"],
                name=entry.get("name", ""),
                offset=entry.get("offset", 0),
                group=entry.get("group", 0),
            )
            self.keys[state.key] = state
            if tensor is not None and not state.initialized:
                hparams = groups[state.group]
                self.optimizers.add(state, tensor, lambda p, h=hparams: build_optimizer(opt_name, h, p))
        return Message(Kind.OK, id=msg.id, src=self.name, body=shm_reply)

    def _attach(self, worker: int, description: Any, entries: list[dict[str, Any]]) -> tuple[Segment | None, dict[str, Any]]:
        """Map the worker's shared segment if it is on this host and every key's areas fit in it."""
        if description is None:
            return None, {}
        if not isinstance(description, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, "'shm' must be a map")
        try:
            segment = Segment.attach(description.get("path"), description.get("size"), description.get("token"))
        except ShmUnavailable as exc:
            return None, {"shm": False, "why": str(exc)}
        segment.unlink()  # both sides hold a mapping: a crash from here on leaves nothing in /dev/shm
        try:
            for entry in entries:
                offsets = entry.get("shm")
                if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                    raise ValueError(f"key {entry['key']}: 'shm' must be [push offset, pull offset]")
                for offset in offsets:
                    segment.view(offset, entry["numel"])
        except ValueError as exc:
            segment.close()
            raise ProtocolError(ErrorCode.BAD_HEADER, f"shared segment layout: {exc}") from None
        return segment, {"shm": True}

    def _shm_view(self, worker: int, state: KeyState, area: int, what: str) -> torch.Tensor:
        """The worker's shared push (``area`` 0) or pull (1) area of a key."""
        areas = self._shm_areas.get((worker, state.key))
        if areas is None:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} {state.label()}: worker {worker} has no shared segment for it")
        return areas[area]

    # -- PUSH ------------------------------------------------------------------------------------------
    def _push(self, msg: Message, worker: int) -> None:
        """Validate and decode every key first; then apply. A message with one bad key changes nothing."""
        assert self.consistency is not None
        lrs = msg.body.get("lr")
        if lrs is not None and not (
            isinstance(lrs, list) and lrs and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in lrs)
        ):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"'lr' must be a list of non-negative numbers (one per group), got {lrs!r}")
        accepted: list[tuple[KeyState, int, torch.Tensor]] = []
        offset = 0
        seen: set[int] = set()
        fused = FusedReader(msg.frames, msg.fused, "push") if msg.fused else None
        for entry in msg.keys:
            nf = entry.get("nf", 0)
            frames = msg.frames[offset : offset + nf] if nf else []
            offset += nf
            state = self._state(entry)
            if state.key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{state.label()} appears twice in one push")
            seen.add(state.key)
            step = entry.get("step", 0)
            if fused is not None and "fz" in entry:
                if entry.get("shm") or entry.get("codec", "none") != "none":
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a fused key is uncompressed float32 and not in shared memory")
                grad = fused.get(entry, state.numel, "push")
            elif entry.get("shm"):
                if nf or entry.get("codec", "none") != "none" or entry.get("bufs") != [["float32", state.numel]]:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a shared-memory push is uncompressed float32, without frames")
                grad = self._shm_view(worker, state, 0, "push of")
                self.counters["shm_bytes_in"] += state.numel * 4
            else:
                grad = self._decoders.decode(entry, frames, state.numel, torch.float32, f"push of {state.label()}")
            if self.consistency.check_push(state, worker, step):
                accepted.append((state, step, grad))
            else:
                self.counters["duplicates"] += 1
        updates = []
        for state, step, grad in accepted:
            if lrs is not None:
                state.lr = float(lrs[state.group] if state.group < len(lrs) else lrs[0])
            ready = self.consistency.push(state, worker, step, grad)
            if ready is not None:
                updates.append((state, ready))
        self.optimizers.apply(updates)
        self.counters["pushes_applied"] += len(updates)

    # -- PULL ------------------------------------------------------------------------------------------
    def _pull_request(self, identity: bytes, msg: Message, worker: int, steps: list[int]) -> _Pending:
        """Check a pull (known keys, usable pull codec, shared areas) without changing anything."""
        states = [self._state(e, initialized=False) for e in msg.keys]
        pull_codecs = [e.get("pc") for e in msg.keys]
        pull_shm = [bool(e.get("pshm")) for e in msg.keys]
        for spec, shared, state in zip(pull_codecs, pull_shm, states):
            if spec is not None:
                self._decoders.get(spec, f"pull codec of {state.label()}")
            if shared:
                self._shm_view(worker, state, 1, "pull of")
        step = max(steps, default=0)
        return _Pending(identity, msg.id, worker, states, step, time.monotonic() + self.config.timeout, pull_codecs, pull_shm)

    def _pull(self, pending: _Pending) -> Message | None:
        """Answer now if the consistency mode allows, else wait in ``pending`` (with a deadline)."""
        assert self.consistency is not None
        self.consistency.note_clock(pending.worker, pending.step)
        if self._ready(pending):
            return self._values(pending)
        self.pending.append(pending)
        return None

    def _ready(self, p: _Pending) -> bool:
        assert self.consistency is not None
        return all(self.consistency.pull_ready(s, p.worker, p.step) for s in p.states)

    def _values(self, p: _Pending) -> Message:
        assert self.consistency is not None and self.topology is not None
        self.consistency.served(p.worker, p.step)
        # BSP never changes a value before every live worker received it, so it may send the store zero-copy;
        # ASP/SSP may update a key while ZeroMQ still sends it, so they send a snapshot.
        snapshot = self.topology.mode != "bsp"
        keys, frames = [], []
        small: list[torch.Tensor] = []  # values for the fused frame, when two small keys or more can share it
        fused = 0
        to_fuse = [not shared and spec is None and fusable(s.numel) for s, spec, shared in zip(p.states, p.pull_codecs, p.pull_shm)]
        if sum(to_fuse) < 2:
            to_fuse = [False] * len(to_fuse)
        for s, spec, shared, fuse in zip(p.states, p.pull_codecs, p.pull_shm, to_fuse):
            assert s.param is not None
            if shared:
                self._shm_view(p.worker, s, 1, "pull of").copy_(s.param)
                self.counters["shm_bytes_out"] += s.numel * 4
                entry, bufs = {"codec": "none", "meta": {}, "bufs": [["float32", s.numel]], "nf": 0, "pshm": 1}, []
            elif fuse:
                entry, bufs = {"nf": 0, "fz": fused}, []
                small.append(s.param)
                fused += s.numel
            elif spec is None:
                entry, bufs = encode_entry(self._none, s.param.clone() if snapshot else s.param)
            else:
                entry, bufs = self._delta(p.worker, s, spec)
            entry.update(key=s.key, version=s.version)
            keys.append(entry)
            frames.extend(bufs)
        if small:  # torch.cat of two keys or more: a copy, so a snapshot in every mode
            frames.append(fused_frame(small))
        return Message(Kind.VALUES, id=p.request_id, src=self.name, keys=keys, frames=frames, fused=fused)

    def _delta(self, worker: int, s: KeyState, spec: str) -> tuple[dict[str, Any], list[memoryview]]:
        """Compressed pull: the first time the full values; then the change since this worker's last pull,
        encoded with ``spec``. What the codec loses stays in (param - view) and is sent later: the server's own
        error feedback. The view is advanced by exactly what the worker decodes, so both stay identical."""
        assert s.param is not None
        found = self._views.get((worker, s.key))
        if found is None or found[1].spec() != spec:
            view = s.param.clone()
            self._views[(worker, s.key)] = (view, make_codec(spec, allow_import=True))  # spec validated in _pull
            entry, bufs = encode_entry(self._none, view)
            entry["delta"] = False
            return entry, bufs
        view, codec = found
        entry, bufs = encode_entry(codec, s.param - view)
        encoded = entry_encoded(entry, bufs, f"pull of {s.label()}")
        view.add_(codec.decode(encoded, s.numel, torch.float32, "cpu"))
        entry["delta"] = True
        return entry, bufs

    def _flush_ready(self, sock: zmq.Socket) -> None:
        if not self.pending:
            return
        still = []
        for p in self.pending:
            if self._ready(p):
                self._send(sock, p.identity, self._values(p))
            else:
                still.append(p)
        self.pending = still

    def _expire(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if not any(p.deadline <= now for p in self.pending):
            return
        assert self.consistency is not None
        still = []
        for p in self.pending:
            if p.deadline > now:
                still.append(p)
                continue
            blocked = next((s for s in p.states if not self.consistency.pull_ready(s, p.worker, p.step)), None)
            if blocked is None:  # ready after all: answer it
                self._send(sock, p.identity, self._values(p))
                continue
            reason = self.consistency.pull_waiting_for(blocked, p.worker, p.step)
            self._send(
                sock,
                p.identity,
                error_reply(p.request_id, self.name, ErrorCode.TIMEOUT, f"{self.name}: pull gave up after {self.config.timeout:.0f}s: {reason}"),
            )
        self.pending = still

    def stats(self) -> dict[str, Any]:
        assert self.consistency is not None
        return {
            "mode": self.consistency.name,
            "keys": len(self.keys),
            "versions": {str(k): s.version for k, s in sorted(self.keys.items())},
            "live_workers": sorted(self.consistency.live),
            "clocks": {str(w): c for w, c in sorted(self.consistency.clock.items())},
            "max_served_gap": self.consistency.max_served_gap,
            "staleness": self.consistency.staleness,
            **self.counters,
        }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return Server(Config.from_env()).run()
