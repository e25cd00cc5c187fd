"""Each worker's disjoint share of a dataset, with torch's DistributedSampler semantics, and a position that goes
with every checkpoint.

Drawing from a :func:`shard_sampler` marks where a training iteration ends (the next batch is drawn), which is
where a worker's part of a checkpoint is taken; a resumed job's sampler continues at the saved epoch and position:
an epoch before it yields nothing, the saved epoch continues where it stopped. So a loop written for DDP
(``for epoch in range(E): sampler.set_epoch(epoch); for batch in loader: ...``) resumes exactly, unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset, DistributedSampler

from . import _iteration
from .session import default_client

log = logging.getLogger("zps.worker")


class ShardSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that knows its position in the epoch (see the module)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.position = 0  # indices of the current epoch drawn so far
        self.resume_at: tuple[int, int] | None = None  # (epoch, position) a resumed job continues from
        self._skipped: set[int] = set()
        _iteration.register(self)

    def __iter__(self) -> Iterator[int]:
        indices: list[int] = list(super().__iter__())
        start = 0
        if self.resume_at is not None:
            epoch, position = self.resume_at
            if self.epoch < epoch:  # drawn before the checkpoint: nothing left of it
                if self.epoch not in self._skipped:
                    self._skipped.add(self.epoch)
                    log.warning("sampler: epoch %d was done before the checkpoint this job resumed from; it yields "
                                "nothing (training continues in epoch %d at sample %d)", self.epoch, epoch, position)
                self.position = len(indices)
                return iter(())
            self.resume_at = None
            if self.epoch == epoch:
                start = min(position, len(indices))
        return self._draw(indices, start)

    def _draw(self, indices: list[int], start: int) -> Iterator[int]:
        self.position = start
        for index in indices[start:]:
            _iteration.boundary()  # the next sample is drawn: the previous iteration is over
            self.position += 1
            yield index

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this sampler."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.num_samples}


def shard_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                  rank: int | None = None, num_workers: int | None = None) -> ShardSampler:
    """A :class:`ShardSampler` for this worker (rank and count from the cluster).

    Call ``sampler.set_epoch(epoch)`` each epoch for a new shuffle, as with DDP.
    """
    if rank is None or num_workers is None:
        client = default_client()
        rank = client.rank if rank is None else rank
        num_workers = client.num_workers if num_workers is None else num_workers
    return ShardSampler(dataset, num_replicas=num_workers, rank=rank, shuffle=shuffle, seed=seed,
                        drop_last=drop_last)
