"""What ``zps run`` and ``zps launch`` show while a job runs, and the summary table at its end.

``--progress live`` (the default on a terminal): a table of every role redrawn in place (rich), the processes'
own output scrolling above it. ``lines`` (the default when the output is not a terminal: CI logs, files): one
plain line per role every :data:`LINE_INTERVAL` seconds. ``off``: nothing while it runs. Every job ends with a
summary table of its roles (``off`` too: it is one table, at the end). The figures come from the coordinator's
:class:`~zps.telemetry.monitor.Monitor`; ``zps top`` renders the same table from another terminal or host.
"""
from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

LINE_INTERVAL = 10.0  # seconds between two progress lines per role (lines mode)
REFRESH = 0.5  # seconds between two redraws of the live table


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _number(value: Any, fmt: str = "{:,.0f}") -> str:
    return "" if value is None else fmt.format(value)


def short_bytes(n: float) -> str:
    """``human_bytes`` in fewer characters: 1.2M, 830k, 12B."""
    text = human_bytes(n)
    number, unit = text.split()
    return number + ("B" if unit == "B" else unit[0].upper() if unit != "kB" else "k")


# The columns, in order: (key, header, its abbreviation). To fit a terminal, the table first drops the host, then
# abbreviates headers and values (roles as w0 / s1, rates as 1.2M/s), then drops memory, samples/s, sent and
# received, step time and loss, in that order, until it fits: the role, its state, its step and steps/s stay.
COLUMNS = (("role", "role", "role"), ("host", "host", "host"), ("state", "state", "state"), ("step", "step", "step"),
           ("loss", "loss", "loss"), ("samples/s", "samples/s", "smp/s"), ("steps/s", "steps/s", "st/s"),
           ("sent", "sent", "sent"), ("received", "received", "recv"), ("step time", "step time", "step t"),
           ("memory", "memory", "mem"))
FIT_ORDER: tuple[tuple[str, ...], ...] = (
    (), ("host",), ("host", "abbreviate"), ("host", "abbreviate", "memory"),
    ("host", "abbreviate", "memory", "samples/s"), ("host", "abbreviate", "memory", "samples/s", "sent", "received"),
    ("host", "abbreviate", "memory", "samples/s", "sent", "received", "step time"),
    ("host", "abbreviate", "memory", "samples/s", "sent", "received", "step time", "loss"),
)
_RIGHT = {"step", "loss", "samples/s", "steps/s", "sent", "received", "step time", "memory"}


def _cells(r: dict[str, Any], final: bool, short: bool) -> dict[str, str]:
    """One member's row of the table, by column key (``short``: abbreviated values)."""
    worker = r["role"] == "worker"
    size = short_bytes if short else human_bytes
    if final:  # averages over the time this run of the worker reported (from its first step's report to its last)
        active = float(r.get("active", 0.0)) or None
        samples_s = r.get("samples_run", 0) / active if worker and r.get("samples") and active else None
        steps_s = r.get("steps_run", 0) / active if worker and active else None
        sent, recv = size(r.get("sent", 0)), size(r.get("recv", 0))
    else:
        samples_s = r.get("samples_per_s") if worker and r.get("samples") else None
        steps_s = r.get("step_per_s") if worker else None
        sent, recv = f"{size(r.get('sent_per_s', 0))}/s", f"{size(r.get('recv_per_s', 0))}/s"
    if worker or r.get("step") is not None:  # a server counts steps where it reports them
        step = _number(r.get("step"))
    else:  # else optimizer updates, one per key and step: say so
        step = _number(r.get("updates"), "{:,} key-upd" if short else "{:,} key updates")
    state = str(r.get("state", ""))
    if r.get("straggler"):
        state = "[bold red]STRAGGLER[/]" if short else f"{state}, [bold red]STRAGGLER[/]"
    role = f"{r['role'][0]}{r['rank']}" if short else f"{r['role']} {r['rank']}"
    return {"role": role, "host": str(r.get("host", "")), "state": state, "step": step,
            "loss": _number(r.get("loss"), "{:.4f}"), "samples/s": _number(samples_s, "{:,.1f}"),
            "steps/s": _number(steps_s, "{:,.2f}"), "sent": sent, "received": recv,
            "step time": _number(r.get("step_time"), "{:.3f}" if short else "{:.3f} s"),
            "memory": size(r.get("rss", 0))}


def _table(status: dict[str, Any], title: str | None, final: bool, drop: tuple[str, ...]) -> Table:
    short = "abbreviate" in drop
    t = Table(title=title, title_justify="left", expand=False)
    shown = [(key, abbreviated if short else header) for key, header, abbreviated in COLUMNS if key not in drop]
    for key, header in shown:
        t.add_column(header, justify="right" if key in _RIGHT else "left", no_wrap=True)
    for r in status.get("members", []):
        cells = _cells(r, final, short)
        t.add_row(*(cells[key] for key, _ in shown))
    return t


def table(status: dict[str, Any], title: str | None = None, final: bool = False, width: int | None = None) -> Table:
    """The roles of ``status`` (a coordinator's STATUS body) as a rich table no wider than ``width`` columns where
    it can be (:data:`FIT_ORDER`: what is dropped or abbreviated first); None: every column."""
    if width is None:
        return _table(status, title, final, ())
    measure = Console(width=10_000, file=io.StringIO())
    for drop in FIT_ORDER:
        t = _table(status, title, final, drop)
        if measure.measure(t).maximum <= width:
            return t
    return t


def line(r: dict[str, Any]) -> str:
    """One role's progress as a plain line (``lines`` mode)."""
    parts = [f"{r['role']} {r['rank']} ({r.get('host', '?')}): {r.get('state', '?')}"]
    if r["role"] == "worker":
        parts.append(f"step {r.get('step', 0)} ({r.get('step_per_s', 0):.2f}/s)")
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if r.get("samples"):
            parts.append(f"{r.get('samples_per_s', 0):,.1f} samples/s")
        if r.get("step_time") is not None:
            parts.append(f"step time {r['step_time']:.3f} s")
    elif r.get("step") is not None:
        parts.append(f"step {r['step']}")
    else:
        parts.append(f"{r.get('updates', 0):,} updates (one per key and step; {r.get('keys', 0)} keys)")
    parts.append(f"sent {human_bytes(r.get('sent_per_s', 0))}/s, received {human_bytes(r.get('recv_per_s', 0))}/s")
    parts.append(f"memory {human_bytes(r.get('rss', 0))}")
    if r.get("straggler"):
        parts.append("STRAGGLER")
    return ", ".join(parts)


class LiveView:
    """Shows ``status()`` while a job runs (``mode``: live, lines or off); :meth:`close` prints the summary."""

    def __init__(self, status: Callable[[], dict[str, Any]], mode: str, out: IO[str] | None = None) -> None:
        self.status = status
        self.out = out or sys.stdout
        if mode == "auto":
            mode = "live" if self.out.isatty() else "lines"
        self.mode = mode
        self._stop = threading.Event()
        self._live: Live | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> IO[str]:
        """Start showing; returns the stream the job's other output must go to (above the live table)."""
        if self.mode == "live":
            console = Console(file=self.out)
            self._live = Live(table(self.status(), width=console.width), console=console,
                              refresh_per_second=1 / REFRESH, redirect_stdout=False, transient=True)
            self._live.start()
            self._thread = threading.Thread(target=self._redraw, name="zps-progress", daemon=True)
            self._thread.start()
            return _Above(self._live)  # type: ignore[return-value]  # (a TextIOBase, as IO[str] takes it)
        if self.mode == "lines":
            self._thread = threading.Thread(target=self._lines, name="zps-progress", daemon=True)
            self._thread.start()
        return self.out

    def _redraw(self) -> None:
        assert self._live is not None
        while not self._stop.wait(REFRESH):
            self._live.update(table(self.status(), width=self._live.console.width))

    def _lines(self) -> None:
        while not self._stop.wait(LINE_INTERVAL):
            status = self.status()
            text = "".join(f"[zps] {line(r)}\n" for r in status.get("members", []) if r.get("state") == "running")
            if text:
                self.out.write(text)
                self.out.flush()

    def close(self, summary: bool = True) -> None:
        """Stop showing; print the summary table of the job's roles."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._live is not None:
            self._live.stop()
        if summary:
            status = self.status()
            if status.get("members"):
                console = Console(file=self.out, width=None if self.out.isatty() else 200)
                console.print(table(status, title=f"zps: the job's roles ({status.get('uptime', 0):.1f} s)",
                                    final=True, width=console.width))
                self.out.flush()


class _Above(io.TextIOBase):
    """A text stream whose lines are printed above a live table (the processes' output, the launcher's notes)."""

    def __init__(self, live: Live) -> None:
        super().__init__()
        self.live = live
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            lines = self._partial.split("\n")
            self._partial = lines.pop()
        for done in lines:
            self.live.console.print(done, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True
