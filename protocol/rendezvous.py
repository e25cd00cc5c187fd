"""The client side of the coordinator, shared by servers and workers: register, barrier, heartbeat, done.

Every call has a deadline and names what it waited for when it gives up. A background heartbeat thread keeps
the coordinator informed and listens for its notices: ``shutdown`` (the job is over) and ``dead`` (a peer was
lost); :attr:`RendezvousClient.failure` then holds the reason, for the process to act on.

The coordinator may die and be restarted on the same address: the data path never waits for it. Heartbeats go on
unanswered for up to ``--heartbeat-timeout``; a coordinator that answers "unknown member"
(:attr:`ErrorCode.UNKNOWN_MEMBER`: it restarted with fresh state) is joined again with ``rejoin``
(:class:`zps.protocol.bodies.RegisterBody`), and a barrier, DONE or SAVED request it lost is sent again. A
coordinator silent for longer is declared gone (:attr:`RendezvousClient.coordinator_lost`): the job fails naming it.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from . import checkpoint as ckpt
from . import security, transport
from .bodies import HeartbeatBody, RegisterBody
from .config import Config, ConfigError
from .messages import ErrorCode, Kind, Message, ProtocolError
from .peers import peer_name
from .variables import ZPS_COORDINATOR

log = logging.getLogger("zps.rendezvous")


@dataclass(frozen=True)
class Topology:
    """What the coordinator hands a process once the cluster is complete (the TOPOLOGY body; this class is its
    one writer, :meth:`to_body`, and its one reader, :meth:`from_body`)."""

    role: str  # the process's role, and its rank within it
    rank: int
    num_servers: int
    num_workers: int
    servers: tuple[str, ...]  # server addresses (tcp://host:port) by rank
    mode: str  # bsp | asp | ssp: the coordinator's, which every process follows
    staleness: int

    def to_body(self) -> dict[str, Any]:
        return {"role": self.role, "rank": self.rank, "num_servers": self.num_servers,
                "num_workers": self.num_workers, "servers": list(self.servers), "mode": self.mode,
                "staleness": self.staleness}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Topology:
        try:
            topology = cls(role=str(body["role"]), rank=int(body["rank"]), num_servers=int(body["num_servers"]),
                           num_workers=int(body["num_workers"]), servers=tuple(str(s) for s in body["servers"]),
                           mode=str(body["mode"]), staleness=int(body["staleness"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"malformed topology from the coordinator: {exc!r}") from None
        return topology


class RendezvousError(ProtocolError):
    """The coordinator refused, timed out or is unreachable; the message names what is missing."""


def _error(reply: Message) -> tuple[ErrorCode, str]:
    """The code and reason of the coordinator's ERROR reply."""
    try:
        code = ErrorCode(reply.body.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    return code, str(reply.body.get("reason", "the coordinator reported a failure"))


class RendezvousClient:
    """Talks to the coordinator at ``config.coordinator``. Use as a context manager or call :meth:`close`."""

    def __init__(self, config: Config, context: zmq.Context | None = None) -> None:
        if config.job.secure and config.secrets is None:  # never quietly in the clear
            raise ConfigError(f"ZPS_SECURE (--secure) is set but this {config.role} was given no keys")
        self.config = config
        self.context = context or zmq.Context.instance()
        self.address = "tcp://" + config.coordinator
        self.name = peer_name(config.role, config.rank)
        self._sock = security.dealer(self.context, self.config.secrets)
        transport.connect(self._sock, self.address)
        self._ids = itertools.count(1)
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self.shutdown_requested = threading.Event()
        self.failure: str | None = None
        self.coordinator_lost = False  # its heartbeats went unanswered past the heartbeat timeout
        self.topology: Topology | None = None
        self._address: str | None = None  # a server's, as it registered
        self._last_answer = time.monotonic()  # when the coordinator last answered a heartbeat
        # rejoining a restarted coordinator: one thread at a time; requests with an id below the mark were sent
        # before the newest rejoin (the coordinator they reached may not know them)
        self._rejoin_lock = threading.Lock()
        self._rejoined_mark = 0
        self.notices: collections.deque[dict[str, Any]] = collections.deque()  # membership news, for the server
        # what each heartbeat reports (zps.protocol.progress): the process sets it once it has something to say
        self.reporter: Callable[[], dict[str, Any]] | None = None
        self._suspects: set[int] = set()  # --replicas, a worker: servers it lost its connection to (the next heartbeat
        self._suspects_lock = threading.Lock()  # says so, once)
        self._replicated: int | None = None  # --replicas, a server: what its heartbeats say (HeartbeatBody)
        self._beat_now = threading.Event()  # news the coordinator should have before the next interval

    # -- request / reply -------------------------------------------------------------------------------
    def _request(self, kind: Kind, body: dict[str, Any], what: str, timeout: float | None = None,
                 sock: zmq.Socket | None = None, resend: bool = False, give_up: bool = False) -> Message:
        """One request and its reply, on the main socket (the owning thread's) or on ``sock``.

        ``resend``: the request survives a coordinator restart: refused as an unknown member's, this member
        rejoins and sends it again; sent before a rejoin (the new coordinator may never have had it), it is sent
        again too. ``give_up``: it fails at once when the job is known to have failed (a peer lost, the
        coordinator gone), naming why.
        """
        sock = sock or self._sock
        timeout = self.config.job.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            request_id = next(self._ids)
            transport.send(sock, Message(kind, id=request_id, src=self.name, body=body))
            reply = self._await(sock, request_id, deadline, f"{what} within {timeout:.0f}s", resend, give_up)
            if reply is None:  # this member rejoined a restarted coordinator since: ask it
                continue
            if reply.kind is not Kind.ERROR:
                return reply
            code, reason = _error(reply)
            if resend and code is ErrorCode.UNKNOWN_MEMBER:
                self._rejoin(request_id, sock)
                continue
            raise RendezvousError(code, reason)

    def _await(self, sock: zmq.Socket, request_id: int, deadline: float, what: str, resend: bool,
               give_up: bool) -> Message | None:
        """The reply to ``request_id``; None when it should be sent again (``resend``: the member rejoined)."""
        while True:
            if give_up and self.failure is not None:
                raise RendezvousError(ErrorCode.DEAD, self.failure)
            if resend and self._rejoined_mark > request_id:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RendezvousError(
                    ErrorCode.TIMEOUT,
                    f"{self.name}: no answer from the coordinator at {self.config.coordinator} to {what} "
                    f"(is it running, and is {ZPS_COORDINATOR} right?)",
                )
            # in slices, when a failure or a rejoin elsewhere may end the wait
            if sock.poll(int(min(remaining, 0.1 if resend or give_up else remaining) * 1000) + 1):
                reply = transport.recv(sock)
                if reply.id == request_id:
                    return reply

    def _register_body(self, rejoin: bool) -> RegisterBody:
        body: RegisterBody = {"role": self.config.role, "rank": self.config.rank, "host": socket.gethostname(),
                              "pid": os.getpid()}
        if self._address is not None:
            body["address"] = self._address
        if rejoin:
            assert self.topology is not None
            body["rank"] = self.topology.rank
            body["rejoin"] = True
        return body

    def _rejoin(self, sent: int, sock: zmq.Socket) -> None:
        """The coordinator does not know this member: it restarted. Register again as the member this process is
        (unless another thread did since request ``sent`` went out); a refusal raises :class:`RendezvousError`."""
        with self._rejoin_lock:
            if self._rejoined_mark > sent:
                return
            self._request(Kind.REGISTER, dict(self._register_body(rejoin=True)), "re-registration",
                          timeout=self.config.job.heartbeat_timeout, sock=sock)
            self._rejoined_mark = next(self._ids)
        log.warning("%s: the coordinator at %s restarted; rejoined it", self.name, self.config.coordinator)

    def suspect(self, server: int) -> None:
        """--replicas, a worker (any thread): its connection to ``server`` dropped; the next heartbeat tells the
        coordinator, which fails it over once its heartbeats are late too."""
        with self._suspects_lock:
            self._suspects.add(server)

    def register(self, address: str | None = None) -> Topology:
        """Register this process (a server passes its bound ``address``); block until the cluster is complete."""
        self._address = address
        # The coordinator itself gives up (with the names of the missing) before our own deadline does.
        reply = self._request(Kind.REGISTER, dict(self._register_body(rejoin=False)), "registration",
                              timeout=self.config.job.timeout + 10)
        self.topology = Topology.from_body(reply.body)
        self.name = peer_name(self.topology.role, self.topology.rank)
        self._start_heartbeats()
        return self.topology

    def report_replicated(self, version: int | None) -> None:
        """--replicas, a server: every chunk it serves has its copies complete after topology ``version`` (None:
        not yet). A new version goes out at once, with an early heartbeat."""
        if version is not None and version != self._replicated:
            self._replicated = version
            self._beat_now.set()

    def report_saved(self, checkpoint: int, file: str, size: int, info: dict[str, Any]) -> None:
        """Tell the coordinator this process's part of checkpoint ``checkpoint`` is on disk (any thread may call it);
        it writes the manifest once every part is, with each part's size and content hash (computed here, by the
        thread that wrote the part)."""
        try:
            sha256 = ckpt.digest(ckpt.directory(self.config.job.checkpoint_dir, checkpoint) / file)
        except OSError as exc:
            log.error("%s: checkpoint %d: the part written cannot be read back (%s): not recorded", self.name,
                      checkpoint, exc)
            return
        body = {"checkpoint": checkpoint, "file": file, "size": size, "info": {**info, "sha256": sha256}}
        sock = security.dealer(self.context, self.config.secrets)  # its own: the caller may be any thread
        try:
            transport.connect(sock, self.address)
            self._request(Kind.SAVED, body, f"the report of checkpoint {checkpoint}", sock=sock, resend=True,
                          give_up=True)
        except RendezvousError as exc:  # the checkpoint stays incomplete; the previous one stays the newest
            log.error("%s: checkpoint %d was written but not recorded: %s", self.name, checkpoint, exc.reason)
        finally:
            sock.close(linger=0)

    def barrier(self, name: str = "default") -> None:
        """Wait until every worker reached the barrier ``name``."""
        self._request(Kind.BARRIER, {"name": name}, f"barrier {name!r}", timeout=self.config.job.timeout + 10,
                      resend=True, give_up=True)

    def done(self, failure: str | None = None) -> None:
        """Tell the coordinator this process finished: cleanly, or with ``failure`` (a worker that failed is never
        taken for one that finished; the coordinator fails the job naming it)."""
        self._stop_heartbeats()
        body: dict[str, Any] = {"exit_code": 0 if failure is None else 1, **self._report()}  # its final figures
        if failure is not None:
            body["failure"] = failure
        if self.coordinator_lost:
            return  # nobody to tell: every process ends on its own
        # a live coordinator answers at once; after a failure one that is gone is not worth waiting for, but in a
        # job going well a silent one may be restarting: it is waited for as long as heartbeats would be
        wait = 3.0
        if self.failure is None:
            wait = max(wait, self._last_answer + self.config.job.heartbeat_timeout - time.monotonic())
        try:
            self._request(Kind.DONE, body, "done", timeout=min(wait, self.config.job.timeout), resend=True)
        except RendezvousError as exc:  # the coordinator may already be gone at the end of a job; nothing is lost
            log.debug("%s: done not recorded: %s", self.name, exc.reason)

    # -- heartbeats ------------------------------------------------------------------------------------
    def _start_heartbeats(self) -> None:
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="zps-heartbeat", daemon=True)
        self._hb_thread.start()

    def _stop_heartbeats(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        sock = security.dealer(self.context, self.config.secrets)
        transport.connect(sock, self.address)
        interval, timeout = self.config.job.heartbeat_interval, self.config.job.heartbeat_timeout
        self._last_answer = time.monotonic()
        warned = False  # that the coordinator is silent (once per silence)
        try:
            while not self._hb_stop.is_set():
                # sent whether or not the coordinator answers: a restarted one gets them (and says it restarted)
                body: HeartbeatBody = {}
                report = self._report()
                if "stats" in report:
                    body["stats"] = report["stats"]
                with self._suspects_lock:
                    if self._suspects:
                        body["suspect"], self._suspects = sorted(self._suspects), set()
                if self._replicated is not None:
                    body["replicated"] = self._replicated
                self._beat_now.clear()
                transport.send(sock, Message(Kind.HEARTBEAT, id=next(self._ids), src=self.name, body=dict(body)))
                deadline = time.monotonic() + interval
                while ((remaining := deadline - time.monotonic()) > 0 and not self._hb_stop.is_set()
                       and not self._beat_now.is_set()):
                    # short slices, so a stop request is seen within 50 ms
                    if not sock.poll(int(min(remaining, 0.05) * 1000) + 1):
                        continue
                    try:
                        msg = transport.recv(sock)
                    except ProtocolError:
                        continue
                    self._last_answer = time.monotonic()
                    warned = False
                    self._heard(msg, sock)
                silent = time.monotonic() - self._last_answer
                if silent > max(3 * interval, timeout / 4) and not warned and self.failure is None:
                    warned = True
                    log.warning("%s: the coordinator at %s has not answered for %.1fs; the job goes on, and it has "
                                "until --heartbeat-timeout (%.0fs) to come back", self.name, self.config.coordinator,
                                silent, timeout)
                if silent > timeout and self.failure is None:
                    self.coordinator_lost = True
                    self.failure = (
                        f"{self.name}: the coordinator at {self.config.coordinator} has not answered heartbeats "
                        f"for {timeout:.0f}s; assuming the job is gone"
                    )
                    self.shutdown_requested.set()
        finally:
            sock.close(linger=0)

    def _heard(self, msg: Message, sock: zmq.Socket) -> None:
        """What the coordinator said on the heartbeat channel."""
        if msg.kind is Kind.SHUTDOWN:
            self.shutdown_requested.set()
        elif msg.kind is Kind.NOTICE:
            self.notices.append(msg.body)
        elif msg.kind is Kind.ERROR:
            code, reason = _error(msg)
            if code is not ErrorCode.UNKNOWN_MEMBER:
                self.failure = reason
                self.shutdown_requested.set()
                return
            try:  # (an answer to a heartbeat sent before the newest rejoin changes nothing)
                self._rejoin(msg.id, sock)
            except RendezvousError as exc:
                self.failure = (f"{self.name}: could not rejoin the coordinator at {self.config.coordinator} after "
                                f"it restarted: {exc.reason}")
                self.shutdown_requested.set()

    def _report(self) -> dict[str, Any]:
        if self.reporter is None:
            return {}
        try:
            return {"stats": self.reporter()}
        except Exception as exc:  # progress is never worth a heartbeat
            log.debug("%s: no progress report: %r", self.name, exc)
            return {}

    def close(self) -> None:
        self._stop_heartbeats()
        self._sock.close(linger=0)

    def __enter__(self) -> RendezvousClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

