"""The coordinator: the rendezvous process of a job (ranks, topology, barriers, heartbeats, failover, manifests).

:class:`Coordinator` is its loop (:mod:`.service`); what a request means lives in one collaborator each:
:mod:`.membership` (who is in the job, and the job's :class:`State`), :mod:`.failover` (``--replicas``),
:mod:`.manifests` (checkpoints) and :mod:`.barriers`.
"""
from .membership import State
from .service import Coordinator

__all__ = ["Coordinator", "State"]
