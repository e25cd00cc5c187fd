"""Prometheus metrics over HTTP (``--metrics-port``): where each role serves them, and the serving itself.

Each role has its own :class:`prometheus_client.CollectorRegistry` (several roles may share a process in tests and
under the zygote) and serves it at ``http://HOST:PORT/metrics`` on the address it binds for the job, never on
every interface. The coordinator serves on ``--metrics-port`` (its own metrics and every worker's, from their
heartbeats: nothing to scrape on a worker), server ``r`` on ``--metrics-port + 1 + r``. The metric names and
labels are listed in docs/metrics.md.
"""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("zps.metrics")


def metrics_port(base: int, role: str, rank: int) -> int:
    """The port ``role`` ``rank`` serves its metrics on (0: metrics off)."""
    if not base:
        return 0
    return base if role == "coordinator" else base + 1 + rank


class MetricsServer:
    """``registry`` served at ``http://host:port/metrics`` from a daemon thread; :meth:`close` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        served: Any = start_http_server(port, addr=host, registry=registry)
        # prometheus-client >= 0.19 returns (server, thread); older ones return nothing (then it lives with us)
        self._server = served[0] if isinstance(served, tuple) else None
        self.address = f"http://{host}:{port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            server = self._server
            self._server = None
            server.shutdown()
            server.server_close()


def bind_address(metrics_host: str, role_host: str) -> str:
    """Where a role serves its metrics: ``--metrics-host`` (loopback by default: plain HTTP that anyone who reaches
    it may read, also in a --secure job), ``host`` meaning the role's own address ``role_host``."""
    return role_host if metrics_host == "host" else metrics_host


def serve(registry: CollectorRegistry, host: str, port: int, who: str) -> MetricsServer | None:
    """Serve ``registry`` for ``who`` (a log name) on ``host`` (:func:`bind_address`), or log why it cannot (a port
    in use must not end a job)."""
    if not port:
        return None
    try:
        server = MetricsServer(registry, host, port)
    except OSError as exc:
        log.error("%s: cannot serve metrics on %s:%d: %s", who, host, port, exc)
        return None
    log.info("%s: metrics at %s", who, server.address)
    return server

