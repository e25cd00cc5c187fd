"""``zps top --coordinator HOST:PORT``: a live view of a running job from any terminal or host (read-only).

It asks the coordinator for the job's status (a STATUS request) every ``--interval`` seconds and draws the table
the launcher's own live view draws: every role, its step, loss, rates, memory, step time, and who straggles, fitted
to the terminal's width (:func:`~.live.table`: at 80 columns it drops the host and memory, and abbreviates).
``--once`` prints the table once and exits (scripts, logs). A ``--secure`` job answers only its own keys: pass one
of its key files (``--secrets DIR/worker-0.json``, as ``zps secrets`` wrote them).
"""
from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from typing import IO, Any

import zmq
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from zps.protocol import security, transport
from zps.protocol.config import ConfigError
from zps.protocol.messages import Kind, Message, ProtocolError
from zps.protocol.security import Secrets

from .live import table

ANSWER_WAIT = 3.0  # seconds to wait for the coordinator's answer


class Unreachable(RuntimeError):
    """The coordinator did not answer."""


class StatusClient:
    """Asks a coordinator for the job's status."""

    def __init__(self, coordinator: str, secrets: Secrets | None = None, context: zmq.Context | None = None) -> None:
        self.coordinator = coordinator
        self.src = secrets.name if secrets is not None else "top"
        self.sock = security.dealer(context or zmq.Context.instance(), secrets)
        self.sock.setsockopt(zmq.LINGER, 0)
        transport.connect(self.sock, "tcp://" + coordinator)
        self._ids = itertools.count(1)

    def status(self, wait: float = ANSWER_WAIT) -> dict[str, Any]:
        request_id = next(self._ids)
        transport.send(self.sock, Message(Kind.STATUS, id=request_id, src=self.src))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            try:
                reply = transport.recv(self.sock)
            except ProtocolError:
                continue
            if reply.id == request_id:
                if reply.kind is Kind.ERROR:
                    raise Unreachable(f"the coordinator at {self.coordinator} refused: {reply.body.get('reason')}")
                return reply.body
        raise Unreachable(f"no answer from the coordinator at {self.coordinator} within {wait:.0f}s (is the job "
                          "running, and is this its coordinator? A --secure job needs --secrets)")

    def close(self) -> None:
        self.sock.close(linger=0)


def view(status: dict[str, Any], coordinator: str, width: int | None = None) -> Group:
    """The job's line, its roles' table (no wider than ``width`` where it can be: :func:`~.live.table`), who
    straggles and why it failed."""
    head = Text(f"zps job at {coordinator}: {status.get('state', '?')}, {status.get('mode', '?')}, "
                f"{status.get('num_servers', '?')} servers x {status.get('num_workers', '?')} workers, up "
                f"{float(status.get('uptime', 0)):.0f} s" + (f", newest checkpoint {status['checkpoint']}"
                                                            if status.get("checkpoint") else ""))
    stragglers = [f"worker {r['rank']} ({r['host']})" for r in status.get("members", []) if r.get("straggler")]
    parts: list[Any] = [head, table(status, width=width)]
    if stragglers:
        parts.append(Text(f"stragglers: {', '.join(stragglers)}", style="bold red"))
    if status.get("error"):
        parts.append(Text(f"failed: {status['error']}", style="bold red"))
    return Group(*parts)


def main_top(coordinator: str, interval: float = 1.0, once: bool = False, secrets_file: str | None = None,
             out: IO[str] | None = None) -> int:
    """Show the job until it ends (0) or its coordinator stops answering (1)."""
    out = out or sys.stdout
    try:
        secrets = Secrets.from_json(open(secrets_file).read(), secrets_file) if secrets_file else None
    except (OSError, ConfigError) as exc:
        print(f"zps top: cannot read --secrets {secrets_file}: {exc}", file=sys.stderr)
        return 2
    client = StatusClient(coordinator, secrets)
    console = Console(file=out)
    # Ctrl-C sets a flag the loop looks at: a KeyboardInterrupt raised inside rich's Live (holding its lock) could
    # leave its refresh thread waiting for that lock at exit
    stop = threading.Event()
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        status = client.status()
        if once:
            console.print(view(status, coordinator, console.width))
            return 0
        with Live(view(status, coordinator, console.width), console=console, refresh_per_second=4) as live:
            while status.get("state") in ("registering", "recovering", "running"):
                if stop.wait(interval):  # the refresh period of a dashboard, or Ctrl-C
                    break
                status = client.status()
                live.update(view(status, coordinator, console.width))
        return 0
    except Unreachable as exc:
        print(f"zps top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
        client.close()
