"""Step traces (``--trace DIR``): spans of every worker and server, as Chrome trace JSON on one timeline.

Each process records complete events (``"ph": "X"``: name, start, duration, args such as the step) in memory and
writes ``DIR/<role>-<rank>.json`` when it ends; the launcher merges them into ``DIR/trace.json`` (:func:`merge`),
which Perfetto (ui.perfetto.dev) and chrome://tracing open. Times are the host's wall clock in microseconds, so
processes of one host line up exactly; across hosts they line up as well as the hosts' clocks do (NTP: well under
a millisecond on a LAN). A process records at most :data:`MAX_EVENTS` spans and says so once past that.

Span names (docs/metrics.md): a worker's ``compute`` (the step outside zps), ``forward`` and ``backward``,
``encode`` (building the messages), ``push_pull`` or ``pull`` (the round trip) and ``decode`` (a reply into the
model); a server's ``push`` (decoding and applying one push message), ``apply`` (the optimizer step over the keys
it completed) and ``pull`` (building a reply).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("zps.trace")
MAX_EVENTS = 2_000_000
MERGED = "trace.json"


def now_us() -> float:
    """The wall clock in microseconds (the traces' time base)."""
    return time.time_ns() / 1000.0


def process_id(role: str, rank: int) -> int:
    """The trace's process id of a role: servers 1.., workers 1001.. (one timeline row group per process)."""
    return (1 if role == "server" else 1001) + rank


class Tracer:
    """Records the spans of one process; disabled (every call returns at once) without a directory."""

    def __init__(self, directory: str = "", role: str = "", rank: int = 0) -> None:
        self.enabled = bool(directory)
        self.directory, self.role, self.rank = directory, role, rank
        self.events: list[dict[str, Any]] = []
        self._threads: dict[int, int] = {}
        self._full = False

    def span(self, name: str, start_us: float, end_us: float | None = None, **args: Any) -> None:
        """Record ``name`` from ``start_us`` to ``end_us`` (default: now)."""
        if not self.enabled:
            return
        if len(self.events) >= MAX_EVENTS:
            if not self._full:
                self._full = True
                log.warning("%s-%d: %d trace spans recorded; the rest of the run is not traced", self.role,
                            self.rank, MAX_EVENTS)
            return
        end = now_us() if end_us is None else end_us
        ident = threading.get_ident()
        tid = self._threads.get(ident)
        if tid is None:
            tid = self._threads[ident] = len(self._threads) + 1
        self.events.append({"name": name, "ph": "X", "ts": start_us, "dur": max(0.0, end - start_us),
                            "pid": process_id(self.role, self.rank), "tid": tid, "args": args})

    @contextmanager
    def __call__(self, name: str, **args: Any) -> Iterator[None]:
        """``with tracer("push", step=3): ...`` records the block as a span."""
        if not self.enabled:
            yield
            return
        start = now_us()
        try:
            yield
        finally:
            self.span(name, start, **args)

    def path(self) -> Path:
        return Path(self.directory) / f"{self.role}-{self.rank}.json"

    def write(self) -> Path | None:
        """Write this process's spans (with its name, for the viewer) to ``DIR/<role>-<rank>.json``."""
        if not self.enabled:
            return None
        pid = process_id(self.role, self.rank)
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"{self.role} {self.rank}"}},
                {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"traceEvents": meta + self.events}))
        os.replace(tmp, path)
        return path


def merge(directory: str | Path) -> Path | None:
    """Merge every ``<role>-<rank>.json`` of ``directory`` into ``trace.json``; None when there is none."""
    directory = Path(directory)
    parts = sorted(p for p in directory.glob("*-*.json") if p.name != MERGED)
    if not parts:
        return None
    events: list[Any] = []
    for part in parts:
        try:
            events.extend(json.loads(part.read_text())["traceEvents"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("trace part %s is unreadable (%s); merged without it", part, exc)
    out = directory / MERGED
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, out)
    return out
