"""zps worker library: what a training script imports.

    from zps import worker
    worker.init()
    opt = worker.DistributedOptimizer(worker.build_optimizer(model.parameters()), model)
    sampler = worker.shard_sampler(dataset)
    ...
    worker.report(loss=loss.item(), samples=len(batch))   # the live view, zps top, the metrics
    opt.synchronize()       # every worker now holds the servers' model
    worker.shutdown()
"""
from .client import Client
from .data import shard_sampler
from .embedding import EmbeddingTable, prefetching
from .optimizer import DistributedOptimizer, build_optimizer
from .session import abort, barrier, default_client, init, num_workers, rank, report, shutdown

__all__ = ["Client", "DistributedOptimizer", "EmbeddingTable", "abort", "barrier", "build_optimizer", "default_client",
           "init", "num_workers", "prefetching", "rank", "report", "shard_sampler", "shutdown"]
