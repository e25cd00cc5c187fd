"""A server's Prometheus metrics (docs/metrics.md), in a registry of its own.

Counters of the hot path are plain integers the request loop adds to (cheaper than a labelled counter per key
per message); a collector turns them into metric families when someone scrapes. Histograms observe per request.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32, 64)


class ServerMetrics:
    """What one server counts. ``gauges()`` gives the server's current holdings when scraped."""

    def __init__(self, server: str, gauges: Callable[[], dict[str, float]]) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        # (direction, tensor, codec) -> [logical bytes, encoded bytes, keys]
        self.tensors: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        # (direction, path) -> bytes; every key present from the start (other threads only read them)
        self.wire: dict[tuple[str, str], int] = {(d, p): 0 for d in ("in", "out") for p in ("tcp", "shm")}
        self.requests: dict[str, int] = collections.defaultdict(int)  # kind -> requests
        self.errors: dict[str, int] = collections.defaultdict(int)  # code -> error replies
        self.counts = {"updates": 0, "duplicates": 0, "checkpoints": 0}
        self.latency = Histogram("zps_server_request_duration_seconds", "from a request's arrival to its reply "
                                 "(a pull waiting for its version included)", ["kind"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.apply = Histogram("zps_server_apply_duration_seconds", "optimizer steps over the keys of one push "
                               "message", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.bsp_wait = Histogram("zps_server_bsp_wait_seconds", "BSP: from a key's first push of a step to its "
                                  "last (the wait for the slowest worker)", buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.staleness = Histogram("zps_server_staleness_steps", "ASP/SSP: how many steps the pushing worker "
                                   "trails the fastest worker, per push message", buckets=STALENESS_BUCKETS,
                                   registry=self.registry)
        self.checkpoint = Histogram("zps_server_checkpoint_duration_seconds", "writing this server's part of a "
                                    "checkpoint", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                    registry=self.registry)
        self._latency_children: dict[str, Any] = {}
        self.registry.register(_Counters(self, gauges))

    def observe_latency(self, kind: str, seconds: float) -> None:
        child = self._latency_children.get(kind)
        if child is None:
            child = self._latency_children[kind] = self.latency.labels(kind)
        child.observe(seconds)

    def tensor(self, direction: str, tensor: str, codec: str, logical: int, encoded: int) -> None:
        row = self.tensors[(direction, tensor, codec)]
        row[0] += logical
        row[1] += encoded
        row[2] += 1


class _Counters(Collector):
    def __init__(self, metrics: ServerMetrics, gauges: Callable[[], dict[str, float]]) -> None:
        self.metrics, self.gauges = metrics, gauges

    def describe(self) -> list[Any]:
        return []  # (the names are fixed; nothing to check at registration)

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        requests = CounterMetricFamily("zps_server_requests", "requests received, by kind", labels=["kind"])
        for kind, n in list(m.requests.items()):
            requests.add_metric([kind], n)
        yield requests
        errors = CounterMetricFamily("zps_server_errors", "ERROR replies, by code", labels=["code"])
        for code, n in list(m.errors.items()):
            errors.add_metric([code], n)
        yield errors
        wire = CounterMetricFamily("zps_server_wire_bytes", "bytes received and sent: socket frames (headers "
                                   "included) or the same-host shared-memory path", labels=["direction", "path"])
        for (direction, path), n in list(m.wire.items()):
            wire.add_metric([direction, path], n)
        yield wire
        logical = CounterMetricFamily("zps_server_logical_bytes", "uncompressed float32 bytes of the tensors pushed "
                                      "(in) and pulled (out)", labels=["direction", "tensor", "codec"])
        encoded = CounterMetricFamily("zps_server_encoded_bytes", "the same tensors as the codec encoded them "
                                      "(what compression leaves)", labels=["direction", "tensor", "codec"])
        keys = CounterMetricFamily("zps_server_key_transfers", "keys (chunks) pushed and pulled",
                                   labels=["direction", "tensor", "codec"])
        for (direction, tensor, codec), (lb, eb, n) in list(m.tensors.items()):
            logical.add_metric([direction, tensor, codec], lb)
            encoded.add_metric([direction, tensor, codec], eb)
            keys.add_metric([direction, tensor, codec], n)
        yield from (logical, encoded, keys)
        yield CounterMetricFamily("zps_server_updates", "optimizer updates applied, per key", value=m.counts["updates"])
        yield CounterMetricFamily("zps_server_duplicate_pushes", "retried pushes recognised and not applied again",
                                  value=m.counts["duplicates"])
        for name, value in self.gauges().items():
            help_text, = (text for key, text in GAUGES if key == name)
            yield GaugeMetricFamily(f"zps_server_{name}", help_text, value=value)


GAUGES = (
    ("resident_memory_bytes", "the server process's resident memory"),
    ("parameter_bytes", "float32 bytes of the parameters this server holds"),
    ("optimizer_state_bytes", "bytes of the torch.optim state (momentum, Adam's moments) this server holds"),
    ("keys", "keys (chunks of parameters) this server holds"),
    ("pending_requests", "requests waiting (BSP versions, SSP clocks, initial values)"),
)
