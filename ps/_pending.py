"""Requests a server cannot answer yet: pulls waiting for a BSP version or an SSP clock, INITs waiting for rank 0's
values, pushes waiting for their backups (``--replicas``). Each waits with a deadline; past it the worker gets an
ERROR naming exactly what held it up.

Waiting requests are indexed by the keys they wait on, so a message that changed some keys re-checks only the
requests on those keys (linear in what changed, not in what waits); a change that can release anything (a worker
left, SSP's slowest clock moved) re-checks them all. One worker keeps at most ``max_per_worker`` requests waiting.
Nothing here sends: each call returns the replies it produced, for the loop to send.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from zps.protocol.messages import ErrorCode, Message, ProtocolError, error_reply

from .store import KeyState

Reply = tuple[bytes, Message]  # (the ROUTER identity of the peer, the message to send it)


@dataclass
class Waiting:
    """One request waiting: whose it is, the keys whose changes may release it, its deadline and how an error names
    it. A subclass (one per way to wait, its own fields keyword-only) says whether it is :meth:`ready`, builds its
    :meth:`answer` and says :meth:`why` it waits (the timeout error's reason)."""

    identity: bytes
    request_id: int
    worker: int
    states: list[KeyState]
    deadline: float
    what: str = "request"

    def ready(self) -> bool:
        raise NotImplementedError

    def answer(self) -> Message:
        raise NotImplementedError

    def why(self) -> str:
        raise NotImplementedError


class Pending:
    """The waiting requests of one server (``name``: how error replies sign)."""

    def __init__(self, name: str, max_per_worker: int = 256) -> None:
        self.name = name
        self.max_per_worker = max_per_worker
        self.items: dict[int, Waiting] = {}  # in arrival order
        self._by_key: dict[int, set[int]] = {}
        self._per_worker: dict[int, int] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, waiting: Waiting) -> None:
        """Keep ``waiting`` until it is ready or past its deadline; ProtocolError when its worker has too many."""
        held = self._per_worker.get(waiting.worker, 0)
        if held >= self.max_per_worker:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"worker {waiting.worker} has {held} requests waiting here "
                                                     f"already (the cap: --max-pending {self.max_per_worker})")
        wid = next(self._ids)
        self.items[wid] = waiting
        self._per_worker[waiting.worker] = held + 1
        for state in waiting.states:
            self._by_key.setdefault(state.key, set()).add(wid)

    def _remove(self, wid: int) -> Waiting:
        waiting = self.items.pop(wid)
        self._per_worker[waiting.worker] -= 1
        for state in waiting.states:
            found = self._by_key.get(state.key)
            if found is not None:
                found.discard(wid)
                if not found:
                    del self._by_key[state.key]
        return waiting

    def soonest(self) -> float | None:
        return min((w.deadline for w in self.items.values()), default=None)

    def _answer(self, w: Waiting) -> Reply:
        """``w``'s reply; one that cannot be built (its worker left meanwhile, say) becomes an ERROR reply."""
        try:
            reply = w.answer()
        except Exception as exc:
            code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.INTERNAL
            reply = error_reply(w.request_id, self.name, code, f"{self.name}: {w.what} could not be answered: {exc}")
        return w.identity, reply

    def flush(self, keys: Iterable[int] | None = None) -> list[Reply]:
        """The replies of the requests that became ready: those waiting on ``keys``, or every one (``None``)."""
        if not self.items:
            return []
        if keys is None:
            candidates: Iterable[int] = list(self.items)
        else:
            found: set[int] = set()
            for key in keys:
                found |= self._by_key.get(key, set())
            candidates = sorted(found)  # in arrival order
        out = []
        for wid in candidates:
            w = self.items.get(wid)
            if w is not None and w.ready():
                self._remove(wid)
                out.append(self._answer(w))
        return out

    def expire(self, timeout: float) -> list[Reply]:
        """Fail the requests past their deadline, naming what each waited for (one ready after all is answered)."""
        now = time.monotonic()
        out = []
        for wid in [wid for wid, w in self.items.items() if w.deadline <= now]:
            w = self._remove(wid)
            if w.ready():
                out.append(self._answer(w))
            else:
                reason = f"{self.name}: {w.what} gave up after {timeout:.0f}s: {w.why()}"
                out.append((w.identity, error_reply(w.request_id, self.name, ErrorCode.TIMEOUT, reason)))
        return out

    def fail_all(self, reason: str, code: ErrorCode = ErrorCode.DEAD) -> list[Reply]:
        """Answer every waiting request with an error (``code`` MOVED: this server was failed over, the workers
        send them again to the new primaries)."""
        out = []
        for wid in list(self.items):
            w = self._remove(wid)
            out.append((w.identity, error_reply(w.request_id, self.name, code, f"{self.name}: {reason}")))
        return out
