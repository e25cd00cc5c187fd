"""zps: a parameter server for PyTorch.

The packages live at the top of the repository (``protocol/``, ``ps/``, ``worker/``, ``launcher/``,
``telemetry/``, ``lab/``, ``process/``; docs/architecture.md) and are installed under this one namespace, so a
user's ``worker.py`` or ``ps.py`` can never shadow them::

    from zps import worker          # the client library a training script imports
    from zps.protocol import Config
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """``zps.__version__``, read from the installed metadata on first use (importing that costs ~80 ms, which
    every process of a job would pay at start)."""
    if name != "__version__":
        raise AttributeError(f"module 'zps' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("zps")
    except PackageNotFoundError:  # a source checkout that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
