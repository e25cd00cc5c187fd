"""The client side of the coordinator, shared by servers and workers: register, barrier, heartbeat, done.

Every call has a deadline and names what it waited for when it gives up. A background heartbeat thread keeps
the coordinator informed and listens for its notices: ``shutdown`` (the job is over) and ``dead`` (a peer was
lost); :attr:`RendezvousClient.failure` then holds the reason, for the process to act on.
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

from . import security, transport
from .config import Config, ConfigError
from .messages import ErrorCode, Kind, Message, ProtocolError
from .peers import peer_name

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
        self.topology: Topology | None = None
        self.notices: collections.deque[dict[str, Any]] = collections.deque()  # membership news, for the server
        # what each heartbeat reports (zps.protocol.progress): the process sets it once it has something to say
        self.reporter: Callable[[], dict[str, Any]] | None = None

    # -- request / reply -------------------------------------------------------------------------------
    def _request(self, kind: Kind, body: dict[str, Any], what: str, timeout: float | None = None,
                 sock: zmq.Socket | None = None) -> Message:
        """One request and its reply, on the main socket (the owning thread's) or on ``sock``."""
        sock = sock or self._sock
        timeout = self.config.job.timeout if timeout is None else timeout
        request_id = next(self._ids)
        transport.send(sock, Message(kind, id=request_id, src=self.name, body=body))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                raise RendezvousError(
                    ErrorCode.TIMEOUT,
                    f"{self.name}: no answer from the coordinator at {self.config.coordinator} to {what} within "
                    f"{timeout:.0f}s (is it running, and is ZPS_COORDINATOR right?)",
                )
            reply = transport.recv(sock)
            if reply.id == request_id:
                if reply.kind is Kind.ERROR:
                    body = reply.body
                    raise RendezvousError(ErrorCode(body.get("code", "internal")), str(body.get("reason")))
                return reply

    def register(self, address: str | None = None) -> Topology:
        """Register this process (a server passes its bound ``address``); block until the cluster is complete."""
        body = {
            "role": self.config.role,
            "rank": self.config.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        if address is not None:
            body["address"] = address
        # The coordinator itself gives up (with the names of the missing) before our own deadline does.
        reply = self._request(Kind.REGISTER, body, "registration", timeout=self.config.job.timeout + 10)
        self.topology = Topology.from_body(reply.body)
        self.name = peer_name(self.topology.role, self.topology.rank)
        self._start_heartbeats()
        return self.topology

    def report_saved(self, checkpoint: int, file: str, size: int, info: dict[str, Any]) -> None:
        """Tell the coordinator this process's part of checkpoint ``checkpoint`` is on disk (any thread may call it);
        it writes the manifest once every part is."""
        body = {"checkpoint": checkpoint, "file": file, "size": size, "info": info}
        sock = security.dealer(self.context, self.config.secrets)  # its own: the caller may be any thread
        try:
            transport.connect(sock, self.address)
            self._request(Kind.SAVED, body, f"the report of checkpoint {checkpoint}", sock=sock)
        except RendezvousError as exc:  # the checkpoint stays incomplete; the previous one stays the newest
            log.error("%s: checkpoint %d was written but not recorded: %s", self.name, checkpoint, exc.reason)
        finally:
            sock.close(linger=0)

    def barrier(self, name: str = "default") -> None:
        """Wait until every worker reached the barrier ``name``."""
        self._request(Kind.BARRIER, {"name": name}, f"barrier {name!r}", timeout=self.config.job.timeout + 10)

    def done(self, failure: str | None = None) -> None:
        """Tell the coordinator this process finished: cleanly, or with ``failure`` (a worker that failed is never
        taken for one that finished; the coordinator fails the job naming it)."""
        self._stop_heartbeats()
        body: dict[str, Any] = {"exit_code": 0 if failure is None else 1, **self._report()}  # its final figures
        if failure is not None:
            body["failure"] = failure
        try:
            # a live coordinator answers at once; one that is gone is not worth waiting for
            self._request(Kind.DONE, body, "done", timeout=min(3.0, self.config.job.timeout))
        except RendezvousError:
            pass  # the coordinator may already be gone at the end of a job; nothing is lost

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
        interval = self.config.job.heartbeat_interval
        last_answer = time.monotonic()
        try:
            while not self._hb_stop.is_set():
                transport.send(sock, Message(Kind.HEARTBEAT, src=self.name, body=self._report()))
                deadline = time.monotonic() + interval
                while (remaining := deadline - time.monotonic()) > 0 and not self._hb_stop.is_set():
                    # short slices, so a stop request is seen within 50 ms
                    if not sock.poll(int(min(remaining, 0.05) * 1000) + 1):
                        continue
                    try:
                        msg = transport.recv(sock)
                    except ProtocolError:
                        continue
                    last_answer = time.monotonic()
                    if msg.kind is Kind.SHUTDOWN:
                        self.shutdown_requested.set()
                    elif msg.kind is Kind.NOTICE:
                        self.notices.append(msg.body)
                    elif msg.kind is Kind.ERROR:
                        self.failure = str(msg.body.get("reason", "the coordinator reported a failure"))
                        self.shutdown_requested.set()
                if time.monotonic() - last_answer > self.config.job.heartbeat_timeout and self.failure is None:
                    self.failure = (
                        f"{self.name}: the coordinator at {self.config.coordinator} has not answered heartbeats "
                        f"for {self.config.job.heartbeat_timeout:.0f}s; assuming the job is gone"
                    )
                    self.shutdown_requested.set()
        finally:
            sock.close(linger=0)

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

