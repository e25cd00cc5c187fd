"""Logging what a role refused, at most once per peer per minute: a peer that floods a role with bad messages is
not logged at its rate (each refusal is still answered, and counted)."""
from __future__ import annotations

import logging
import time

INTERVAL = 60.0  # seconds between two log lines about one peer's refused messages
MAX_PEERS = 4096  # peers remembered; beyond this the record starts afresh (a flood of new peers costs no memory)
MAX_REASON = 500  # characters of a reason a log line shows


class Complaints:
    """``complain(peer, reason)`` logs ``reason`` unless ``peer`` was logged within :data:`INTERVAL` seconds; the
    next line says how many refusals were not logged in between."""

    def __init__(self, log: logging.Logger, who: str, interval: float = INTERVAL,
                 what: str = "refused a message") -> None:
        self.log, self.who, self.interval, self.what = log, who, interval, what
        self._last: dict[bytes, tuple[float, int]] = {}  # peer -> (when last logged, refusals since)

    def __call__(self, peer: bytes, reason: str, level: int = logging.WARNING, exc_info: bool = False) -> None:
        now = time.monotonic()
        when, quiet = self._last.get(peer, (-self.interval, 0))
        if now - when < self.interval:
            self._last[peer] = (when, quiet + 1)
            return
        if len(self._last) >= MAX_PEERS:
            self._last.clear()
        self._last[peer] = (now, 0)
        more = f" (and {quiet} more from this peer in the last minute)" if quiet else ""
        self.log.log(level, "%s %s: %s%s", self.who, self.what, reason[:MAX_REASON], more, exc_info=exc_info)
