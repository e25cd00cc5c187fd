"""What every process reports with its heartbeats: the one definition of the ``stats`` map of a HEARTBEAT body.

The coordinator keeps the newest report of each member; the launcher's live view, ``zps top``, the workers'
Prometheus metrics and the straggler check all read from there. A report comes from the network, so
:func:`clean_report` keeps only the fields below, of the right type and within bounds; anything else is dropped.

Worker fields:

- ``samples``: samples processed so far, as the script reported them (``zps.worker.report(samples=...)``)
- ``loss``: the newest loss the script reported (float), if any
- ``times``: compute seconds of each step since the previous report (the step's time outside zps: forward,
  backward, data loading), at most :data:`MAX_TIMES`
- ``wait``: seconds spent so far inside zps calls (sending, waiting for the servers, receiving)

Server fields:

- ``keys``, ``param_bytes``, ``optimizer_bytes``: what the server holds
- ``requests``, ``updates``: requests served, optimizer updates applied (per key)

Both:

- ``step``: a worker's steps completed; a server's newest step applied (BSP: its keys' version; ASP/SSP: the
  furthest worker clock)
- ``rss``: resident memory in bytes
- ``cpu``: CPU seconds the process used so far (all its threads)
- ``sent``, ``recv``: bytes that crossed a socket or the shared-memory path (wire bytes), so far
- ``logical_sent``, ``logical_recv``: uncompressed float32 bytes of the tensors moved, so far
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from .fields import is_int, is_number

MAX_TIMES = 64  # step times per report; a worker faster than this per heartbeat reports its newest
_INT_FIELDS = ("step", "samples", "keys", "param_bytes", "optimizer_bytes", "requests", "updates", "rss", "sent",
               "recv", "logical_sent", "logical_recv")
_FLOAT_FIELDS = ("loss", "wait", "cpu")


def rss_bytes() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds() -> float:
    """CPU seconds this process used so far, every thread's."""
    return time.process_time()


def clean_report(stats: Any) -> dict[str, Any]:
    """The fields of a peer's ``stats`` that are well-formed (module docstring); everything else is dropped."""
    if not isinstance(stats, dict):
        return {}
    out: dict[str, Any] = {}
    for name in _INT_FIELDS:
        value = stats.get(name)
        if is_int(value):
            out[name] = value
    for name in _FLOAT_FIELDS:
        number = stats.get(name)
        if is_number(number, -sys.float_info.max, sys.float_info.max):  # finite
            out[name] = float(number)
    times = stats.get("times")
    if isinstance(times, list):
        out["times"] = [float(t) for t in times[-MAX_TIMES:] if is_number(t, 0, 1e6) and t < 1e6]
    return out
