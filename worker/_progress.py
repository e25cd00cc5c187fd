"""A worker's own accounting: its steps, their compute time, its bytes, the loss it reports.

The heartbeats carry :meth:`Progress.report` to the coordinator (fields: :mod:`zps.protocol.progress`), which
feeds the launcher's live view, ``zps top``, the workers' Prometheus metrics and the straggler check. The
:class:`~zps.protocol.trace.Tracer` records the same steps as spans under ``--trace``.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from zps.protocol.progress import MAX_TIMES, cpu_seconds, rss_bytes
from zps.protocol.trace import Tracer, now_us


class Progress:
    """Counters a worker keeps; :meth:`report` is called from the heartbeat thread."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.step = 0
        self.samples = 0
        self.loss: float | None = None
        self.accuracy: float | None = None  # the newest held-out accuracy the script reported
        self.wait = 0.0  # seconds inside zps step calls
        self.shm_sent = self.shm_recv = 0  # bytes through the shared areas (the engine counts the sockets')
        self.logical_sent = self.logical_recv = 0
        self.engine_bytes: Any = None  # () -> (sent, received) socket bytes
        self._times: collections.deque[float] = collections.deque(maxlen=MAX_TIMES)
        self._lock = threading.Lock()
        self._step_end: float | None = None  # perf_counter at the end of the previous step
        self._step_end_us = 0.0
        self._step_start = 0.0
        self._forward_end: float | None = None  # under --trace, when the model's forward pass ended

    # -- steps (DistributedOptimizer.step) -------------------------------------------------------------
    def watch(self, model: Any, step: Callable[[], int]) -> list[Any]:
        """Under ``--trace``: hooks on ``model`` that record each step's ``forward`` span (the model's forward
        pass) and ``backward`` span (from its end to the optimizer's step: the loss, backward); their handles."""
        if not self.tracer.enabled:
            return []
        began = [0.0]

        def before(*_: Any) -> None:
            began[0] = now_us()

        def after(*_: Any) -> None:
            self.tracer.span("forward", began[0], step=step())
            self._forward_end = now_us()

        return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    def ready(self) -> None:
        """The model holds its first values: the first step's compute starts now."""
        self._step_end, self._step_end_us = time.perf_counter(), now_us()

    def step_begin(self, step: int) -> None:
        """``step``'s compute is over (forward, backward); zps's part of the step begins."""
        now = time.perf_counter()
        if self._step_end is not None:
            with self._lock:
                self._times.append(now - self._step_end)
            self.tracer.span("compute", self._step_end_us, step=step)
            if self._forward_end is not None:
                self.tracer.span("backward", self._forward_end, step=step)
                self._forward_end = None
        self._step_start = now

    def step_end(self, step: int) -> None:
        """``step`` is over: its values are in the model (``step`` + 1 steps are done)."""
        now = time.perf_counter()
        self.wait += now - self._step_start
        self.step = max(self.step, step + 1)
        self._step_end, self._step_end_us = now, now_us()

    def reported(self, loss: float | None, samples: int | None, accuracy: float | None = None) -> None:
        """What the script said (``zps.worker.report``)."""
        if loss is not None:
            self.loss = float(loss)
        if accuracy is not None:
            if not 0.0 <= accuracy <= 1.0:
                raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
            self.accuracy = float(accuracy)
        if samples is not None:
            if samples < 0:
                raise ValueError(f"samples must be >= 0, got {samples}")
            self.samples += int(samples)

    # -- the heartbeat's report ------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        with self._lock:
            times = list(self._times)
            self._times.clear()
        sent, recv = self.engine_bytes() if self.engine_bytes is not None else (0, 0)
        out: dict[str, Any] = {"step": self.step, "samples": self.samples, "times": times, "wait": self.wait,
                               "sent": sent + self.shm_sent, "recv": recv + self.shm_recv, "rss": rss_bytes(),
                               "cpu": cpu_seconds(), "logical_sent": self.logical_sent,
                               "logical_recv": self.logical_recv}
        if self.loss is not None:
            out["loss"] = self.loss
        return out
