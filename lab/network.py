"""A network emulated on one host, without root: ``zps run --net "bw=100mbit,latency=2ms,jitter=0.5ms"``.

The star topology of a cluster network: every role has a link to one switch (:class:`~zps.protocol.simulation.Link`:
a rate each way, one-way latency, jitter), and a worker's bytes to a server cross the worker's link, then the
server's. The launcher relays each worker's connection to each server through a TCP relay of its own (the
coordinator hands every worker the relays' addresses instead of the servers'), which

- paces the bytes through the two links' **shared** queues: every connection of a worker shares its uplink, every
  worker's bytes to a server share that server's downlink (incast), so W workers pushing to one server get its
  rate among them, as on a real switch port;
- delivers each chunk one latency (the two links' sum, plus uniform jitter) after it left the last queue, in
  order (jitter never reorders a byte stream);
- reads from the sender only as fast as its uplink drains (the sender sees backpressure), and holds at most a
  bandwidth-delay product of a connection's bytes (:meth:`Path.window`): a receiver that stops reading stops the
  sender, never grows the launcher (issue 22: 600 pulls whose replies nobody read took it to 2.3 GB);
- takes at most :data:`MAX_CONNECTIONS` connections at a time per relay (a worker's socket to a server is one),
  closing any more at once.

Rates count the bytes of the TCP stream (zps's frames and ZeroMQ's framing; not IP/TCP headers, about 3% on a
real link). The coordinator's traffic (registration, heartbeats) is not shaped; under ``--net`` workers move every
byte over TCP (the same-host shared-memory path would bypass the links). ``benchmarks/network.py`` and
``tests/test_network.py`` check the emulation against its settings.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import random
import socket
import statistics
import threading
import time
from collections.abc import Sequence

from zps.protocol.simulation import Link, NetSpec

log = logging.getLogger("zps.network")

MAX_CHUNK = 64 << 10
MIN_CHUNK = 1500  # one Ethernet frame's payload: the finest grain the queues move bytes in
_SLACK = 0.05  # how far behind a busy relay may run (a late thread) and still send at the link's rate
_CHUNK_TIME = 0.0005
_PR_SET_TIMERSLACK = 29  # a chunk is at most this much of its link's time (store-and-forward adds no more per hop)
MIN_WINDOW = 1 << 20  # the bytes one direction of one connection may hold, at least (and with no rate or latency)
MAX_WINDOW = 64 << 20  # ... and at most, whatever the bandwidth-delay product
MAX_CONNECTIONS = 4  # live connections per relay: one worker's to one server, and room for its reconnects


class Queue:
    """One direction of one link: bytes leave it at ``rate`` in the order they were offered. Shared by every
    connection over the link (thread-safe). ``bytes``: every byte it has been given, in all (what its rate paced)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.bytes = 0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def reserve(self, size: int, ready: float) -> float:
        """``size`` bytes, ready to enter the queue at ``ready``: when they have left it."""
        with self._lock:
            self.bytes += size
            if self.rate is None:
                return ready
            start = max(ready, self._free_at)
            self._free_at = start + size / self.rate
            return self._free_at


class Path:
    """What bytes from one role to another cross: the sender's uplink, then the receiver's downlink."""

    def __init__(self, up: Queue, down: Queue, sender: Link, receiver: Link, seed: int) -> None:
        self.up, self.down = up, down
        self.latency = sender.latency + receiver.latency
        self.jitter = sender.jitter + receiver.jitter
        rates = [r for r in (sender.rate, receiver.rate) if r is not None]
        self.chunk = MAX_CHUNK if not rates else int(min(MAX_CHUNK, max(MIN_CHUNK, min(rates) * _CHUNK_TIME)))
        self._random = random.Random(seed)
        self.credit = 0.0  # seconds the relay takes to forward a chunk by itself (see forwarding_time)

    def window(self) -> int:
        """The bytes one direction of one connection may hold: twice the bandwidth-delay product of the path (what
        its links hold in flight at their rate), within [MIN_WINDOW, MAX_WINDOW]."""
        rate = min((q.rate for q in (self.up, self.down) if q.rate is not None), default=None)
        if rate is None:
            return MIN_WINDOW
        return int(min(MAX_WINDOW, max(MIN_WINDOW, 2 * rate * (self.latency + self.jitter) + 4 * self.chunk)))

    def delay(self) -> float:
        """How long after leaving the last queue a chunk arrives: the latency, jitter, less the relay's own
        forwarding time (it is part of the latency the relay adds)."""
        wanted = self.latency + (self._random.uniform(0.0, self.jitter) if self.jitter else 0.0)
        return max(0.0, wanted - self.credit) if wanted else 0.0


def _fine_timers() -> None:
    """Ask Linux to wake this thread's sleeps within 1 us of their deadline (the default slack is 50 us: on
    every chunk's delivery that would add up)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


class _Pump:
    """Moves one direction of one relayed connection: a reader paced by the sender's uplink, a writer that
    delivers each chunk when the path says it arrives."""

    def __init__(self, src: socket.socket, dst: socket.socket, path: Path, name: str) -> None:
        self.src, self.dst, self.path = src, dst, path
        self._chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.window = path.window()
        self.held = 0  # bytes read and not yet delivered (at most :attr:`window` + a chunk)
        self._ready = threading.Condition()
        self._closed = False  # the sender is done: what is held is still delivered
        self._dead = False  # the receiver is gone: nothing more is read
        self.threads = [threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
                        threading.Thread(target=self._write, name=f"{name}-write", daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        path, last, left_up = self.path, 0.0, 0.0
        _fine_timers()
        try:
            while True:
                try:  # bytes already waiting were ready when the link freed: a late wake-up is no idle link
                    data = self.src.recv(path.chunk, socket.MSG_DONTWAIT)
                    waited = False
                except BlockingIOError:  # bytes the recv waits for are ready when they come
                    data = self.src.recv(path.chunk)
                    waited = True
                if not data:
                    break
                got = time.monotonic()
                ready = got if waited or not left_up or path.up.rate is None else max(left_up, got - _SLACK)
                left_up = path.up.reserve(len(data), ready)
                arrives = max(last, path.down.reserve(len(data), left_up) + path.delay())
                last = arrives
                with self._ready:
                    self._chunks.append((arrives, data))
                    self.held += len(data)
                    self._ready.notify_all()
                    while self.held > self.window and not self._dead:  # the receiver is not reading: nor do we
                        self._ready.wait()
                    if self._dead:
                        break
                _sleep_until(left_up)  # the sender's link is busy until then: read no more before
        except OSError:
            pass
        finally:
            with self._ready:
                self._closed = True
                self._ready.notify()

    def _write(self) -> None:
        _fine_timers()
        try:
            while True:
                with self._ready:
                    while not self._chunks and not self._closed:
                        self._ready.wait()
                    if not self._chunks:
                        break
                    arrives, data = self._chunks[0]
                _sleep_until(arrives)
                self.dst.sendall(data)
                with self._ready:
                    self._chunks.popleft()
                    self.held -= len(data)
                    self._ready.notify_all()
        except OSError:
            pass
        finally:
            with self._ready:  # the reader stops waiting for room, and reading
                self._dead = True
                self._chunks.clear()
                self.held = 0
                self._ready.notify_all()
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                self.src.shutdown(socket.SHUT_RD)


class Relay:
    """A listening socket whose connections are relayed to ``target`` (host, port) over ``forward`` (bytes to
    the target) and ``backward`` (bytes from it)."""

    def __init__(self, target: tuple[str, int], forward: Path, backward: Path, name: str) -> None:
        self.target, self.forward, self.backward, self.name = target, forward, backward, name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._pumps: list[_Pump] = []  # of the connections relayed, two each
        self._lock = threading.Lock()
        self._closed = False
        self._refused = 0  # connections closed at once: MAX_CONNECTIONS were live
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    def live(self) -> int:
        """The connections being relayed now."""
        with self._lock:
            return len(self._pumps) // 2

    def _room(self) -> bool:
        """Forget the connections that ended; whether another may be taken (the caller holds the lock)."""
        ended = {id(p.src) for p in self._pumps if not any(t.is_alive() for t in p.threads)}
        if ended:
            self._pumps = [p for p in self._pumps if id(p.src) not in ended and id(p.dst) not in ended]
            kept = {id(p.src) for p in self._pumps}
            for s in [s for s in self._sockets if id(s) not in kept]:
                s.close()
            self._sockets = [s for s in self._sockets if id(s) in kept]
        return len(self._pumps) // 2 < MAX_CONNECTIONS

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                room = self._room()
                if not room:
                    self._refused += 1
            if not room:
                if self._refused == 1:
                    log.warning("%s: %d connections are being relayed already; closing any more (%s is reached by "
                                "one worker)", self.name, MAX_CONNECTIONS, self.address)
                near.close()
                continue
            try:
                far = socket.create_connection(self.target, timeout=10)
                far.settimeout(None)
            except OSError as exc:
                log.warning("%s: cannot reach %s:%d: %s", self.name, *self.target, exc)
                near.close()
                continue
            for s in (near, far):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    near.close()
                    far.close()
                    return
                self._sockets += [near, far]
                self._pumps += [_Pump(near, far, self.forward, f"{self.name}-fwd"),
                                _Pump(far, near, self.backward, f"{self.name}-back")]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _ping(address: tuple[str, int], count: int) -> float:
    """Median round trip of one byte to an echo at ``address``."""
    with socket.create_connection(address, timeout=5) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            began = time.perf_counter()
            c.sendall(b"x")
            c.recv(1)
            times.append(time.perf_counter() - began)
    return statistics.median(times[count // 4:])


def _echo(listener: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(64):
                    conn.sendall(data)


@functools.cache
def forwarding_time() -> float:
    """The time a relay of this process takes to forward a chunk one way (thread wake-ups), measured once: half
    the extra round trip of a relay without delays over a direct loopback one. A link's latency is delivered
    that much sooner, so that the relay's own time is part of it, not added to it."""
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo, args=(listener,), name="zps-net-echo", daemon=True).start()
    target = listener.getsockname()[:2]
    free = Link()
    relay = Relay(target, Path(Queue(None), Queue(None), free, free, 0), Path(Queue(None), Queue(None), free, free,
                                                                              0), "zps-net-calibrate")
    try:
        direct = _ping(target, 40)
        relayed = _ping(_host_port(relay.address), 40)
    except OSError:
        return 0.0
    finally:
        relay.close()
        listener.close()
    return min(max(0.0, (relayed - direct) / 2), 0.5e-3)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


class Emulator:
    """The links of one job (:class:`NetSpec`) and the relays between them; :meth:`route` is the coordinator's
    hook that gives a worker the relays' addresses in place of the servers'."""

    def __init__(self, spec: NetSpec | str, seed: int = 0) -> None:
        self.spec = NetSpec.parse(spec) if isinstance(spec, str) else spec
        self.seed = seed
        self._queues: dict[tuple[str, int, str], Queue] = {}  # (role, rank, "up"/"down")
        self._relays: dict[tuple[int, int], Relay] = {}  # (worker, server)
        self._lock = threading.Lock()

    def queue(self, role: str, rank: int, direction: str) -> Queue:
        with self._lock:
            found = self._queues.get((role, rank, direction))
            if found is None:
                found = self._queues[(role, rank, direction)] = Queue(self.spec.link(role, rank).rate)
            return found

    def moved(self, role: str, rank: int, direction: str) -> int:
        """The bytes that have entered the ``direction`` (``"up"``: sent, ``"down"``: received) queue of ``role``
        ``rank``'s link so far: every byte the relays paced through it (TCP stream bytes: zps's frames and ZeroMQ's
        framing)."""
        return self.queue(role, rank, direction).bytes

    def path(self, sender: tuple[str, int], receiver: tuple[str, int]) -> Path:
        """What bytes from ``sender`` to ``receiver`` (each ``(role, rank)``) cross."""
        seed = hash((self.seed, sender, receiver)) & 0xFFFFFFFF
        made = Path(self.queue(*sender, "up"), self.queue(*receiver, "down"), self.spec.link(*sender),
                    self.spec.link(*receiver), seed)
        if made.latency or made.jitter:
            made.credit = forwarding_time()
        return made

    def relay(self, worker: int, server: int, address: str) -> str:
        """The address worker ``worker`` reaches server ``server`` (which serves at ``address``) through."""
        with self._lock:
            found = self._relays.get((worker, server))
            if found is not None and found.target == _host_port(address):
                return found.address
        w, s = ("worker", worker), ("server", server)
        made = Relay(_host_port(address), self.path(w, s), self.path(s, w), f"zps-net-w{worker}-s{server}")
        with self._lock:
            old = self._relays.pop((worker, server), None)
            self._relays[(worker, server)] = made
        if old is not None:
            old.close()
        return made.address

    def route(self, role: str, rank: int, servers: Sequence[str]) -> tuple[str, ...]:
        """The servers' addresses as ``role`` ``rank`` is to see them (a worker: through its relays)."""
        if role != "worker":
            return tuple(servers)
        return tuple(self.relay(rank, s, address) for s, address in enumerate(servers))

    def close(self) -> None:
        with self._lock:
            relays, self._relays = list(self._relays.values()), {}
        for r in relays:
            r.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
