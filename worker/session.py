"""The process-wide client of a training script: ``init()`` once, ``shutdown()`` at the end.

How the worker's part in the job ends decides what the job does:

* :func:`shutdown` -- a clean end: the worker leaves the servers (BSP and SSP stop waiting for it) and tells the
  coordinator it finished. A script that returns normally gets this at exit by itself.
* :func:`abort` -- a failure: no leave; the coordinator is told why and fails the job naming this worker. An
  exception that escapes the script gets this at exit by itself, and under ``zps node`` (every zps launcher runs
  workers so) so does a non-zero ``sys.exit``: a crashing worker is never taken for one that finished.
"""
from __future__ import annotations

import atexit
import sys
import threading
from types import TracebackType
from typing import Any

from .client import Client

_client: Client | None = None
_failure: str | None = None  # an exception that escaped the script (seen by the hook below)
_lock = threading.Lock()


def init(**kwargs: Any) -> Client:
    """Register this process with the cluster described by ``ZPS_*`` variables and return its client (the same
    one on every call)."""
    global _client
    with _lock:
        if _client is None:
            _client = Client.from_env(**kwargs)
            atexit.register(_at_exit)
            _watch_uncaught_exceptions()
        return _client


def default_client() -> Client:
    if _client is None:
        raise RuntimeError("call zps.worker.init() first (inside a process started by zps)")
    return _client


def _take() -> Client | None:
    global _client
    with _lock:
        client, _client = _client, None
    return client


def shutdown() -> None:
    """End cleanly: leave the servers and tell the coordinator this worker is done. Safe to call twice."""
    client = _take()
    if client is not None:
        client.close()


def abort(reason: str) -> None:
    """End as a failure: do not leave the servers; the coordinator fails the job naming this worker and ``reason``."""
    client = _take()
    if client is not None:
        client.close(failure=reason)


def _at_exit() -> None:
    if _failure is not None:
        abort(_failure)
    else:
        shutdown()


def _watch_uncaught_exceptions() -> None:
    """Note an exception that escapes the script (Python calls sys.excepthook before the exit handlers)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        global _failure
        if _failure is None:
            _failure = f"{kind.__name__}: {value}"
        previous(kind, value, tb)

    sys.excepthook = hook


def rank() -> int:
    return default_client().rank


def num_workers() -> int:
    return default_client().num_workers


def barrier(name: str = "default") -> None:
    """Wait until every live worker reached the barrier ``name`` (fails after the job's timeout, naming who is
    missing)."""
    default_client().barrier(name)


def report(loss: float | None = None, samples: int | None = None, accuracy: float | None = None) -> None:
    """Tell the job how training goes: the newest ``loss``, ``samples`` processed since the previous call, and
    (where the script evaluates) the newest held-out ``accuracy`` in [0, 1]. The launcher's live view, ``zps top``,
    the metrics and ``--metrics-out`` show them (samples/s from ``samples``; ``zps experiment``'s time to target
    accuracy from ``accuracy``)."""
    default_client().progress.reported(loss, samples, accuracy)
