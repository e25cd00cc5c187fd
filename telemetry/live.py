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


def table(status: dict[str, Any], title: str | None = None, final: bool = False) -> Table:
    """The roles of ``status`` (a coordinator's STATUS body) as a rich table."""
    t = Table(title=title, title_justify="left", expand=False)
    for name, justify in (("role", "left"), ("host", "left"), ("state", "left"), ("step", "right"),
                          ("loss", "right"), ("samples/s", "right"), ("steps/s", "right"), ("sent", "right"),
                          ("received", "right"), ("step time", "right"), ("memory", "right"), ("", "left")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in status.get("members", []):
        worker = r["role"] == "worker"
        if final:  # averages over the time the worker reported (from its first report to its last)
            active = float(r.get("active", 0.0)) or None
            samples_s = r.get("samples", 0) / active if worker and r.get("samples") and active else None
            steps_s = r.get("step", 0) / active if worker and active else None
            sent, recv = human_bytes(r.get("sent", 0)), human_bytes(r.get("recv", 0))
        else:
            samples_s = r.get("samples_per_s") if worker and r.get("samples") else None
            steps_s = r.get("step_per_s") if worker else None
            sent = f"{human_bytes(r.get('sent_per_s', 0))}/s"
            recv = f"{human_bytes(r.get('recv_per_s', 0))}/s"
        flag = "[bold red]STRAGGLER[/]" if r.get("straggler") else ""
        t.add_row(f"{r['role']} {r['rank']}", str(r.get("host", "")), str(r.get("state", "")),
                  _number(r.get("step")) if worker else _number(r.get("updates"), "{:,} updates"),
                  _number(r.get("loss"), "{:.4f}"), _number(samples_s, "{:,.1f}"), _number(steps_s, "{:,.2f}"),
                  sent, recv, _number(r.get("step_time"), "{:.3f} s"), human_bytes(r.get("rss", 0)), flag)
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
    else:
        parts.append(f"{r.get('updates', 0):,} updates")
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
            self._live = Live(table(self.status()), console=Console(file=self.out), refresh_per_second=1 / REFRESH,
                              redirect_stdout=False, transient=True)
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
            self._live.update(table(self.status()))

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
                                    final=True))
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
