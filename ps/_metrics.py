"""Everything one server counts, in one object (:class:`ServerMetrics`), and the four views that read it: Prometheus
(docs/metrics.md, when scraped), the STATS reply, each heartbeat's report (:mod:`zps.protocol.progress`) and the
``--metrics-out`` records (:class:`Recorder`).

Counters of the hot path are plain integers the request loop adds to (cheaper than a labelled counter per key
per message); a collector turns them into metric families when someone scrapes. Histograms observe per request.
Each quantity is counted once, in one place.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zps.protocol.progress import cpu_seconds, rss_bytes
from zps.protocol.stepmetrics import MetricsFile

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32, 64)

GAUGES = (
    ("resident_memory_bytes", "the server process's resident memory"),
    ("parameter_bytes", "float32 bytes of the parameters this server holds"),
    ("optimizer_state_bytes", "bytes of the torch.optim state (momentum, Adam's moments) this server holds"),
    ("keys", "keys (chunks of parameters) this server holds"),
    ("pending_requests", "requests waiting (BSP versions, SSP clocks, initial values)"),
)
Holdings = Callable[[], dict[str, float]]  # the gauges of GAUGES but the resident memory, as the server holds now


def _nothing_held() -> dict[str, float]:
    return {"parameter_bytes": 0, "optimizer_state_bytes": 0, "keys": 0, "pending_requests": 0}


class ServerMetrics:
    """What one server counts. ``holdings()`` gives what it holds now (set once its keys exist)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.holdings: Holdings = _nothing_held
        self.step: Callable[[], int] = lambda: 0  # the newest step applied (set with the holdings)
        self.received = 0  # messages that reached the loop, well-formed or not
        self.failed = 0  # requests refused or failed, and replies that could not be built or sent
        self.requests: dict[str, int] = collections.defaultdict(int)  # kind -> well-formed requests
        self.errors: dict[str, int] = collections.defaultdict(int)  # code -> ERROR replies sent
        # (direction, path) -> bytes: socket frames (headers included) or the same-host shared-memory path; every
        # key present from the start (other threads only read them)
        self.wire: dict[tuple[str, str], int] = {(d, p): 0 for d in ("in", "out") for p in ("tcp", "shm")}
        self.payload = {"in": 0, "out": 0}  # of the socket bytes: the data frames' (tensors), headers not counted
        # (direction, tensor, codec) -> [logical bytes, encoded bytes, keys]
        self.tensors: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        self.updates = 0  # optimizer updates applied, per key (a primary's and a backup's alike)
        self.duplicates = 0  # retried pushes recognised and not applied again, per key
        self.seconds = {"apply": 0.0, "decode": 0.0, "encode": 0.0}  # of work, since the job began
        # --replicas: keys forwarded to backups, forwarded updates applied here as a backup and those held already,
        # keys seeded to backups and the seeds' bytes, keys this server was seeded with
        self.replication = {"replicated": 0, "replica_applied": 0, "replica_duplicates": 0, "seeded_keys": 0,
                            "seed_bytes": 0, "seeds_taken": 0}
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.registry.register(_Collector(self))

    # -- counting --------------------------------------------------------------------------------------
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

    def shared(self, direction: str, nbytes: int) -> None:
        """``nbytes`` went through a worker's shared area (``direction``: in, a push; out, a pull)."""
        self.wire[(direction, "shm")] += nbytes

    # -- the views -------------------------------------------------------------------------------------
    def gauges(self) -> dict[str, float]:
        values = {"resident_memory_bytes": rss_bytes(), **self.holdings()}
        assert set(values) == {name for name, _ in GAUGES}
        return values

    def stats(self) -> dict[str, Any]:
        """The counters of a STATS reply."""
        return {"requests": self.received, "errors": self.failed, "pushes_applied": self.updates,
                "duplicates": self.duplicates, "bytes_in": self.payload["in"], "bytes_out": self.payload["out"],
                "shm_bytes_in": self.wire[("in", "shm")], "shm_bytes_out": self.wire[("out", "shm")],
                **self.replication}

    def _moved(self) -> dict[str, int]:
        wire = self.wire
        return {"recv": wire[("in", "tcp")] + wire[("in", "shm")], "sent": wire[("out", "tcp")] + wire[("out", "shm")]}

    def report(self) -> dict[str, Any]:
        """What each heartbeat tells the coordinator (:mod:`zps.protocol.progress`)."""
        held, logical = self.holdings(), list(self.tensors.items())
        return {"step": self.step(), "keys": held["keys"], "param_bytes": held["parameter_bytes"],
                "optimizer_bytes": held["optimizer_state_bytes"], "requests": self.received, "updates": self.updates,
                "rss": rss_bytes(), "cpu": cpu_seconds(), **self._moved(),
                "logical_recv": sum(v[0] for k, v in logical if k[0] == "in"),
                "logical_sent": sum(v[0] for k, v in logical if k[0] == "out")}

    def totals(self) -> dict[str, float]:
        """What ``--metrics-out`` records: seconds of work and counts since the job began."""
        return {**self.seconds, "requests": self.received, "updates": self.updates, **self._moved()}


class Recorder:
    """``--metrics-out``: a ``server`` record a second (what changed since the previous one) and the ``end``
    record (the totals). ``step()``: the newest step applied."""

    def __init__(self, out: MetricsFile, metrics: ServerMetrics, step: Callable[[], int]) -> None:
        self.out, self.metrics, self.step = out, metrics, step
        self._recorded: dict[str, float] = {}
        self._due = 0.0

    def tick(self) -> None:
        """Write a record when one is due."""
        if not self.out.enabled or time.monotonic() < self._due:
            return
        self._due = time.monotonic() + 1.0
        now = self.metrics.totals()
        delta = {k: v - self._recorded.get(k, 0) for k, v in now.items()}
        self._recorded = now
        seconds = self.metrics.seconds
        self.out.write("server", step=self.step(), cpu=cpu_seconds(),
                       **{k: v if k in seconds else int(v) for k, v in delta.items()})

    def end(self) -> None:
        if self.out.enabled:
            self.out.write("end", step=self.step(), rss=rss_bytes(), cpu=cpu_seconds(), **self.metrics.totals())
            self.out.close()


class _Collector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

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
        yield CounterMetricFamily("zps_server_updates", "optimizer updates applied, per key", value=m.updates)
        yield CounterMetricFamily("zps_server_duplicate_pushes", "retried pushes recognised and not applied again",
                                  value=m.duplicates)
        for name, value in m.gauges().items():
            help_text, = (text for key, text in GAUGES if key == name)
            yield GaugeMetricFamily(f"zps_server_{name}", help_text, value=value)
