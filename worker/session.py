"""The process-wide client of a training script: ``init()`` once, ``shutdown()`` at the end (also at exit)."""
from __future__ import annotations

import atexit
import threading

from .client import Client

_client: Client | None = None
_lock = threading.Lock()


def init(**kwargs) -> Client:
    """Register this process with the cluster described by ``ZPS_*`` variables and return its client."""
    global _client
    with _lock:
        if _client is None:
            _client = Client.from_env(**kwargs)
            atexit.register(shutdown)
        return _client


def default_client() -> Client:
    if _client is None:
        raise RuntimeError("call worker.init() first (inside a process started by `zps run`)")
    return _client


def shutdown() -> None:
    """Leave the servers and tell the coordinator this worker is done. Safe to call twice."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        client.close()


def rank() -> int:
    return default_client().rank


def num_workers() -> int:
    return default_client().num_workers


def barrier(name: str = "default") -> None:
    """Wait until every live worker reached the barrier ``name`` (fails after the job's timeout, naming who is
    missing)."""
    default_client().rendezvous.barrier(name)
