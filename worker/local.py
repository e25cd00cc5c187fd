"""A script started by no launcher (``python train.py``) runs as the only worker of a job of its own.

One BSP worker's step is torch's own: its gradient is the aggregate, the servers would apply the wrapped optimizer
to it, clipping and a GradScaler act on it directly. So :class:`LocalClient` stands in for the cluster and
:class:`~zps.worker.DistributedOptimizer` steps the wrapped optimizer in this process: a ported script can be run,
debugged and unit-tested like any other, with the same result as ``zps run --servers 1 --workers 1``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zps.protocol.config import Config, JobConfig
from zps.protocol.rendezvous import Topology
from zps.protocol.trace import Tracer

from ._progress import Progress

# any of these means a launcher (zps, a ps-lite/BytePS tracker, torchrun) started the process as part of a job
_LAUNCHED = ("ZPS_ROLE", "DMLC_ROLE", "WORLD_SIZE")


def started_by_a_launcher(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in _LAUNCHED)


class LocalClient:
    """The cluster of a script started by no launcher: one worker, rank 0, no servers."""

    rank = 0
    num_workers = 1
    name = "worker:0"
    start_step = 0

    def __init__(self) -> None:
        self.progress = Progress(Tracer())
        self.config = Config(role="worker", coordinator="127.0.0.1:0", rank=0, job=JobConfig(num_servers=1,
                                                                                          num_workers=1))
        self.topology = Topology(role="worker", rank=0, num_servers=0, num_workers=1, servers=(), mode="bsp",
                                 staleness=0)

    def stats(self) -> list[dict[str, Any]]:
        """The servers' counters: there are none."""
        return []

    def barrier(self, name: str = "default") -> None:
        """One worker: everyone is here."""

    def close(self, failure: str | None = None) -> None:
        self.progress.end()
