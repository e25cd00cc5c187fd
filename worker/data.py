"""Each worker's disjoint share of a dataset, with torch's DistributedSampler semantics."""
from __future__ import annotations

from torch.utils.data import Dataset, DistributedSampler

from .session import default_client


def shard_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                  rank: int | None = None, num_workers: int | None = None) -> DistributedSampler:
    """A :class:`torch.utils.data.DistributedSampler` for this worker (rank and count from the cluster).

    Call ``sampler.set_epoch(epoch)`` each epoch for a new shuffle, as with DDP.
    """
    if rank is None or num_workers is None:
        client = default_client()
        rank = client.rank if rank is None else rank
        num_workers = client.num_workers if num_workers is None else num_workers
    return DistributedSampler(dataset, num_replicas=num_workers, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)
