"""zps launcher: the ``zps`` command, the coordinator, the job lifecycle and the backends that start processes.

The names below are imported on first use, so a command that needs none of them (``zps top``, ``zps node``)
starts without loading the rest.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Coordinator": ".coordinator", "Backend": ".backend", "LaunchError": ".backend", "ProcSpec": ".backend",
          "run_job": ".job", "LocalBackend": ".local", "run_local": ".local"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
