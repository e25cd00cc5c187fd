"""The coordinator's live view of a job: every member's newest report, its rates, and who straggles.

Fed by the heartbeats (their ``stats``, :mod:`zps.protocol.progress`); read by the launcher's live view (same
process), by ``zps top`` (a STATUS request; :meth:`Monitor.snapshot` is its reply body) and by Prometheus (the
workers' metrics are served by the coordinator: :class:`WorkerMetrics`).

Stragglers: a worker's step time is its compute time (the step less its time inside zps: forward, backward, data);
over the newest :data:`WINDOW` steps of each worker, one whose median is at least ``--straggler-factor`` (1.5)
times the median of the other workers' medians is flagged: in its row, in the metrics, and once in the log, with
its rank and host. It is unflagged when it falls back below the factor. A worker is flagged only when it is also
:data:`MIN_GAP` seconds per step slower (steps of a few milliseconds jitter by more than 1.5x on a busy host).
"""
from __future__ import annotations

import collections
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zps.protocol.progress import clean_report

log = logging.getLogger("zps.coordinator")
WINDOW = 10  # step times per worker the straggler check looks at
MIN_TIMES = 3  # before this many, a worker is neither flagged nor a reference
RATE_MIN_SECONDS = 0.2  # rates are measured between reports at least this far apart
# a straggler is also this many seconds per step slower than the others: a few milliseconds of scheduling noise
# on a busy host are not a slow worker
MIN_GAP = 0.01


@dataclass
class Row:
    """One member as the coordinator sees it."""

    role: str
    rank: int
    host: str
    pid: int
    state: str = "running"  # running | done | failed
    stats: dict[str, Any] = field(default_factory=dict)
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    rates: dict[str, float] = field(default_factory=dict)  # per second: steps, samples, sent, recv
    straggler: bool = False
    step_time: float | None = None  # median compute time of the window
    seen: float = field(default_factory=time.monotonic)
    # (when, step, samples) at its first report with a step done by this process (a server: its first report): the
    # averages of the job's summary count from there, so a resumed job's steps before the checkpoint, which this run
    # did not do (its first reports say 0, then the checkpoint's step), are not counted as run
    counted: tuple[float, int, int] | None = None
    logged: bool = False  # its straggling was logged (once per worker)
    _mark: tuple[float, dict[str, Any]] | None = None  # the report the rates are measured from

    def view(self, now: float) -> dict[str, Any]:
        when, step, samples = self.counted if self.counted is not None else (self.seen, 0, 0)
        return {"role": self.role, "rank": self.rank, "host": self.host, "pid": self.pid, "state": self.state,
                "straggler": self.straggler, "step_time": self.step_time, "age": round(now - self.seen, 3),
                "active": round(self.seen - when, 3), "steps_run": max(0, self.stats.get("step", 0) - step),
                "samples_run": max(0, self.stats.get("samples", 0) - samples),
                **{k: v for k, v in self.stats.items() if k != "times"},
                **{f"{k}_per_s": round(v, 3) for k, v in self.rates.items()}}


class Monitor:
    """Members' reports and what follows from them; thread-safe (the launcher reads while the coordinator writes)."""

    def __init__(self, factor: float = 1.5) -> None:
        self.factor = factor
        self.rows: dict[tuple[str, int], Row] = {}
        self.failures: collections.Counter[str] = collections.Counter()  # by role
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def joined(self, role: str, rank: int, host: str, pid: int) -> None:
        with self._lock:
            self.rows[(role, rank)] = Row(role, rank, host, pid)

    def ended(self, role: str, rank: int, failed: bool) -> None:
        with self._lock:
            row = self.rows.get((role, rank))
            if row is not None:
                row.state = "failed" if failed else "done"
                row.straggler = False
            if failed:
                self.failures[role] += 1

    def report(self, role: str, rank: int, stats: Any) -> None:
        """A member's heartbeat, with its ``stats`` (checked here: it came from the network)."""
        clean = clean_report(stats)
        now = time.monotonic()
        with self._lock:
            row = self.rows.get((role, rank))
            if row is None:
                return
            row.seen = now
            if not clean:
                return
            row.times.extend(clean.pop("times", []))
            row.stats = clean
            if row.counted is None and (role != "worker" or clean.get("step", 0) > 0):
                row.counted = (now, clean.get("step", 0), clean.get("samples", 0))
            if row._mark is None:
                row._mark = (now, clean)
            elif now - row._mark[0] >= RATE_MIN_SECONDS:
                then, old = row._mark
                row.rates = {k: max(0.0, (clean.get(k, 0) - old.get(k, 0)) / (now - then))
                             for k in ("step", "samples", "sent", "recv")}
                row._mark = (now, clean)
            if role == "worker":
                self._stragglers()

    def _stragglers(self) -> None:
        workers = [r for r in self.rows.values() if r.role == "worker" and r.state == "running"]
        for r in workers:
            r.step_time = statistics.median(r.times) if r.times else None
        timed = [(r, r.step_time) for r in workers if len(r.times) >= MIN_TIMES and r.step_time is not None]
        for r, mine in timed:
            others = [t for o, t in timed if o is not r]
            if not others:
                continue
            reference = statistics.median(others)
            slow = reference > 0 and mine >= self.factor * reference and mine - reference >= MIN_GAP
            if slow and not r.straggler:
                r.logged, first = True, not r.logged
                log.log(logging.WARNING if first else logging.DEBUG,
                        "straggler: worker %d on %s takes %.3fs per step, %.1fx the others' median of %.3fs (compute "
                        "time, without the wait for the servers)", r.rank, r.host, mine, mine / reference, reference)
            elif r.straggler and not slow:
                log.debug("worker %d on %s no longer straggles (%.3fs per step; the others' median %.3fs)", r.rank,
                          r.host, mine, reference)
            r.straggler = slow

    def snapshot(self) -> dict[str, Any]:
        """The STATUS reply body: every member's row, by role then rank."""
        now = time.monotonic()
        with self._lock:
            rows = [self.rows[k].view(now) for k in sorted(self.rows)]
        return {"uptime": round(now - self.started, 3), "members": rows}


class WorkerMetrics(Collector):
    """The workers' metrics, served by the coordinator from their reports (a worker serves nothing itself), and
    the coordinator's own."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Any]:
        return []  # (the names are fixed; nothing to check at registration)

    def collect(self) -> Iterator[Any]:
        rows = self.monitor.snapshot()["members"]
        workers = [r for r in rows if r["role"] == "worker"]
        labels = ["rank", "host"]

        def family(kind: type[Any], name: str, text: str, key: str) -> Any:
            out = kind(name, text, labels=labels)
            for r in workers:
                if r.get(key) is not None:
                    out.add_metric([str(r["rank"]), r["host"]], float(r[key]))
            return out

        def gauge(name: str, text: str, key: str) -> GaugeMetricFamily:
            return family(GaugeMetricFamily, name, text, key)

        def counter(name: str, text: str, key: str) -> CounterMetricFamily:
            return family(CounterMetricFamily, name, text, key)

        yield gauge("zps_worker_step", "steps the worker completed", "step")
        yield counter("zps_worker_samples", "samples the worker reported (zps.worker.report)", "samples")
        yield gauge("zps_worker_samples_per_second", "samples per second over the newest reports", "samples_per_s")
        yield gauge("zps_worker_steps_per_second", "steps per second over the newest reports", "step_per_s")
        yield gauge("zps_worker_loss", "the newest loss the worker reported", "loss")
        yield gauge("zps_worker_step_compute_seconds", f"median compute time of the newest {WINDOW} steps "
                    "(without the wait for the servers)", "step_time")
        yield counter("zps_worker_zps_seconds", "seconds inside zps step calls (sending, waiting, receiving)", "wait")
        yield gauge("zps_worker_resident_memory_bytes", "the worker's resident memory", "rss")
        yield counter("zps_worker_cpu_seconds", "CPU seconds the worker process used", "cpu")
        yield gauge("zps_worker_straggler", "1 while the worker's step time is >= --straggler-factor x the others' "
                    "median", "straggler")
        wire = CounterMetricFamily("zps_worker_wire_bytes", "bytes the worker sent and received over sockets and "
                                   "the shared-memory path", labels=[*labels, "direction"])
        logical = CounterMetricFamily("zps_worker_logical_bytes", "uncompressed float32 bytes of the tensors the "
                                      "worker pushed and pulled", labels=[*labels, "direction"])
        for r in workers:
            for direction, key in (("out", "sent"), ("in", "recv")):
                if key in r:
                    wire.add_metric([str(r["rank"]), r["host"], direction], float(r[key]))
                if f"logical_{key}" in r:
                    logical.add_metric([str(r["rank"]), r["host"], direction], float(r[f"logical_{key}"]))
        yield from (wire, logical)
        members = GaugeMetricFamily("zps_coordinator_members", "registered processes, by role and state",
                                    labels=["role", "state"])
        counts = collections.Counter((r["role"], r["state"]) for r in rows)
        for (role, state), n in sorted(counts.items()):
            members.add_metric([role, state], n)
        yield members
        failures = CounterMetricFamily("zps_coordinator_member_failures", "members that failed, by role",
                                       labels=["role"])
        for role, n in sorted(self.monitor.failures.items()):
            failures.add_metric([role], n)
        yield failures
