"""The one guard around serving a request: whatever it raised becomes its ERROR reply, counted, and logged at most
once per peer per minute (a peer that floods the server with bad messages is answered, not logged at its rate)."""
from __future__ import annotations

import logging

from zps.protocol.messages import ErrorCode, Message, ProtocolError, error_reply
from zps.telemetry.complaints import Complaints

from ._metrics import ServerMetrics

log = logging.getLogger("zps.server")


class Guard:
    """Error replies signed ``name``, counted in ``metrics``."""

    def __init__(self, name: str, metrics: ServerMetrics) -> None:
        self.name = name
        self.metrics = metrics
        self.complain = Complaints(log, name)  # (callers log what they refused but do not tell the asker here too)

    def refuse(self, identity: bytes, request_id: int, exc: ProtocolError) -> Message:
        """The reply to a request refused with ``exc``."""
        self.metrics.failed += 1
        self.complain(identity, f"{exc} ({exc.detail})" if exc.detail else str(exc))
        return error_reply(request_id, self.name, exc.code, f"{self.name}: {exc.reason}")

    def fail(self, identity: bytes, request_id: int, exc: Exception) -> Message:
        """The reply to a request whose serving raised what no check expected (a bug: the server goes on, the worker
        hears of it, the log has the traceback)."""
        self.metrics.failed += 1
        self.complain(identity, f"internal error: {type(exc).__name__}: {exc}", logging.ERROR, exc_info=True)
        return error_reply(request_id, self.name, ErrorCode.INTERNAL, f"{self.name}: {type(exc).__name__}: {exc}")
