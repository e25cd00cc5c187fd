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
import logging
import os
import sys
import threading
from types import TracebackType
from typing import Any

from .client import Client
from .local import LocalClient, started_by_a_launcher

log = logging.getLogger("zps.worker")
_client: Client | LocalClient | None = None
_failure: str | None = None  # an exception that escaped the script (seen by the hook below)
_lock = threading.Lock()


def init(**kwargs: Any) -> Client:
    """Register this process with the cluster described by ``ZPS_*`` variables and return its client (the same
    one on every call).

    Started by no launcher (``python script.py``: no ``ZPS_ROLE``, ``DMLC_ROLE`` or torchrun variables), the
    script runs as the only worker of a job of its own: the DistributedOptimizer steps the wrapped optimizer in
    this process, which is what one BSP worker computes (:mod:`zps.worker.local`)."""
    global _client
    with _lock:
        if _client is None:
            if started_by_a_launcher(os.environ):
                _client = Client.from_env(**kwargs)
            else:
                _client = LocalClient()
                log.warning("zps: no launcher started this process (ZPS_ROLE is not set): it runs as the only worker,"
                            " its optimizer stepped here; `zps run --servers S --workers W SCRIPT` runs it on a "
                            "cluster")
            atexit.register(_at_exit)
            _watch_uncaught_exceptions()
        return _client  # type: ignore[return-value]  # a LocalClient stands in for one


def default_client() -> Client:
    if _client is None:
        raise RuntimeError("call zps.worker.init() first")
    return _client  # type: ignore[return-value]


def _take() -> Client | LocalClient | None:
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
    accuracy from ``accuracy``). Call it after ``opt.step()``: ``--metrics-out`` files the loss and samples under the
    step that just ended."""
    default_client().progress.reported(loss, samples, accuracy)
