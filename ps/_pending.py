"""Requests a server cannot answer yet: pulls waiting for a BSP version or an SSP clock, and INITs waiting for rank
0's values. Each waits with a deadline; past it the worker gets an ERROR naming exactly what held it up."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zps.protocol.messages import ErrorCode, Message, ProtocolError, error_reply

from .store import KeyState


@dataclass
class Waiting:
    """One request waiting. ``ready()`` says whether it can be answered, ``answer()`` builds the reply, and
    ``why()`` names what it still waits for (the timeout error's reason)."""

    identity: bytes
    request_id: int
    worker: int
    states: list[KeyState]
    deadline: float
    ready: Callable[[], bool]
    answer: Callable[[], Message]
    why: Callable[[], str]
    what: str = "request"


@dataclass
class Pending:
    """The waiting requests of one server; ``send(identity, message)`` delivers replies."""

    send: Callable[[bytes, Message], None]
    name: str
    items: list[Waiting] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, waiting: Waiting) -> None:
        self.items.append(waiting)

    def soonest(self) -> float | None:
        return min((w.deadline for w in self.items), default=None)

    def _answer(self, w: Waiting) -> None:
        """Send ``w``'s reply; one that cannot be built (its worker left meanwhile, say) becomes an ERROR reply."""
        try:
            reply = w.answer()
        except Exception as exc:
            code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.INTERNAL
            reply = error_reply(w.request_id, self.name, code, f"{self.name}: {w.what} could not be answered: {exc}")
        self.send(w.identity, reply)

    def flush(self) -> None:
        """Answer every request that became ready."""
        if not self.items:
            return
        still = []
        for w in self.items:
            if w.ready():
                self._answer(w)
            else:
                still.append(w)
        self.items = still

    def expire(self, timeout: float) -> None:
        """Fail the requests past their deadline, naming what each waited for (one ready after all is answered)."""
        now = time.monotonic()
        if not any(w.deadline <= now for w in self.items):
            return
        still = []
        for w in self.items:
            if w.deadline > now:
                still.append(w)
            elif w.ready():
                self._answer(w)
            else:
                reason = f"{self.name}: {w.what} gave up after {timeout:.0f}s: {w.why()}"
                self.send(w.identity, error_reply(w.request_id, self.name, ErrorCode.TIMEOUT, reason))
        self.items = still

    def fail_all(self, reason: str) -> None:
        for w in self.items:
            self.send(w.identity, error_reply(w.request_id, self.name, ErrorCode.DEAD, f"{self.name}: {reason}"))
        self.items = []
