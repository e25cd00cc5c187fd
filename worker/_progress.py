"""A worker's own accounting: its steps, their compute time, its bytes, the loss it reports.

The heartbeats carry :meth:`Progress.report` to the coordinator (fields: :mod:`zps.protocol.progress`), which
feeds the launcher's live view, ``zps top``, the workers' Prometheus metrics and the straggler check. The
:class:`~zps.protocol.trace.Tracer` records the same steps as spans under ``--trace``.
"""
from __future__ import annotations

import collections
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from zps.protocol.config import JobConfig
from zps.protocol.progress import MAX_TIMES, cpu_seconds, rss_bytes
from zps.protocol.simulation import kill_due, kill_step, parse_jitter, parse_stragglers
from zps.protocol.stepmetrics import MetricsFile
from zps.protocol.trace import Tracer, now_us

log = logging.getLogger("zps.worker")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Disturbance:
    """What ``--straggler``, ``--jitter`` and ``--kill`` do to one worker: a pause before each step's zps part (the
    straggler's (FACTOR - 1) x its compute time; a jitter pause with probability P, drawn from a generator seeded
    by the rank, so a run repeats), and a SIGKILL at a step. ``sleep`` and ``kill`` are replaceable (tests)."""

    def __init__(self, job: JobConfig, rank: int) -> None:
        self.factor = parse_stragglers(job.straggler).get(rank, 1.0) if job.straggler else 1.0
        self.chance, self.stall = parse_jitter(job.jitter) if job.jitter else (0.0, 0.0)
        self.kill_at = kill_step(job.kill, "worker", rank)
        self._random = random.Random(0x5EED + rank)
        self.sleep: Callable[[float], None] = time.sleep
        self.kill: Callable[[], None] = _kill_self

    def pause(self, compute: float) -> float:
        """Seconds to pause after a step's ``compute`` seconds (slept here)."""
        pause = (self.factor - 1.0) * compute
        if self.chance and self._random.random() < self.chance:
            pause += self.stall
        if pause > 0:
            self.sleep(pause)
        return pause

    def reached(self, steps: int) -> None:
        """``steps`` steps are done."""
        if kill_due(self.kill_at, steps - 1, steps):  # (one that starts past it is not killed again)
            log.warning("killed at step %d (--kill)", steps)
            self.kill()


def _no_hook(*_: Any) -> None:
    """What a traced model's hooks become when it is pickled (``torch.save(model)``): nothing to record."""


class _SpanHooks:
    """--trace's forward hooks. A pickled model takes :func:`_no_hook` in their place: a hook that held this process's
    tracer would make ``torch.save(model)`` fail."""

    def __init__(self, progress: Progress, step: Callable[[], int]) -> None:
        self.progress, self.step, self.began = progress, step, 0.0

    def before(self, *_: Any) -> None:
        self.began = now_us()

    def after(self, *_: Any) -> None:
        self.progress.tracer.span("forward", self.began, step=self.step())
        self.progress._forward_end = now_us()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_hook_pair, ()


def _no_hook_pair() -> _NoHooks:
    return _NoHooks()


class _NoHooks:
    before = staticmethod(_no_hook)
    after = staticmethod(_no_hook)


class Progress:
    """Counters a worker keeps; :meth:`report` is called from the heartbeat thread."""

    def __init__(self, tracer: Tracer, out: MetricsFile | None = None, disturbance: Disturbance | None = None) -> None:
        self.tracer = tracer
        self.out = out or MetricsFile("", "worker", -1)  # --metrics-out
        self.disturbance = disturbance
        # seconds and bytes of the current step, for --metrics-out (encode: the caller's thread; decode: replies')
        self.encode_s = self.decode_s = 0.0
        self.payload_sent = self.payload_recv = 0  # what the codecs produced (the data frames), so far
        self._compute = self._pause = 0.0
        self._last: dict[str, float] = {}
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
        self._pending: dict[str, Any] | None = None  # --metrics-out: the step record waiting for its loss

    # -- steps (DistributedOptimizer.step) -------------------------------------------------------------
    def watch(self, model: Any, step: Callable[[], int]) -> list[Any]:
        """Under ``--trace``: hooks on ``model`` that record each step's ``forward`` span (the model's forward
        pass) and ``backward`` span (from its end to the optimizer's step: the loss, backward); their handles."""
        if not self.tracer.enabled:
            return []
        hook = _SpanHooks(self, step)
        return [model.register_forward_pre_hook(hook.before), model.register_forward_hook(hook.after)]

    def ready(self) -> None:
        """The model holds its first values: the first step's compute starts now (and its bytes count from here:
        the declaration's are not the first step's)."""
        self._step_end, self._step_end_us = time.perf_counter(), now_us()
        self._last = self.totals()

    def step_begin(self, step: int) -> None:
        """``step``'s compute is over (forward, backward); zps's part of the step begins."""
        self._flush()
        now = time.perf_counter()
        if self._step_end is not None:
            compute = now - self._step_end
            self._pause = self.disturbance.pause(compute) if self.disturbance is not None else 0.0
            if self._pause:
                now = time.perf_counter()
            self._compute = now - self._step_end
            with self._lock:
                self._times.append(self._compute)
            self.tracer.span("compute", self._step_end_us, step=step)
            if self._forward_end is not None:
                self.tracer.span("backward", self._forward_end, step=step)
                self._forward_end = None
        self._step_start = now

    def step_end(self, step: int) -> None:
        """``step`` is over: its values are in the model (``step`` + 1 steps are done)."""
        now = time.perf_counter()
        took = now - self._step_start
        self.wait += took
        self.step = max(self.step, step + 1)
        self._step_end, self._step_end_us = now, now_us()
        if self.out.enabled:
            self._record(step, took)
        if self.disturbance is not None:
            self.disturbance.reached(self.step)

    def totals(self) -> dict[str, float]:
        """The counters --metrics-out records per step (so far)."""
        sent, recv = self.engine_bytes() if self.engine_bytes is not None else (0, 0)
        return {"encode": self.encode_s, "decode": self.decode_s, "raw_sent": self.logical_sent,
                "raw_recv": self.logical_recv, "logical_sent": self.payload_sent, "logical_recv": self.payload_recv,
                "sent": sent + self.shm_sent, "recv": recv + self.shm_recv, "samples": self.samples}

    def _record(self, step: int, took: float) -> None:
        now = self.totals()
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        inside = delta["encode"] + delta["decode"]
        self._flush()
        # written once the script reports the step's loss (after opt.step(), as zps.worker.report asks), or when
        # the next step begins
        self._pending = {"t": time.time(), "step": step, "compute": self._compute, "pause": self._pause,
                         "wait": max(0.0, took - inside), "loss": None,
                         **{k: (int(v) if k not in ("encode", "decode") else v) for k, v in delta.items()}}

    def _flush(self) -> None:
        """Write the step record that waited for its loss (with the samples reported since)."""
        if self._pending is None:
            return
        record, self._pending = self._pending, None
        record["samples"] += self.samples - self._last.get("samples", 0)
        self._last["samples"] = self.samples
        self.out.write("step", **record)

    def end(self) -> None:
        """The worker's part is over: its ``end`` record (totals), and the file is closed."""
        self._flush()
        if self.out.enabled:
            self.out.write("end", step=self.step, wait=self.wait, rss=rss_bytes(), cpu=cpu_seconds(),
                           **self.totals())
            self.out.close()

    def reported(self, loss: float | None, samples: int | None, accuracy: float | None = None) -> None:
        """What the script said (``zps.worker.report``): a loss reported after ``opt.step()`` is that step's."""
        if samples is not None:
            if samples < 0:
                raise ValueError(f"samples must be >= 0, got {samples}")
            self.samples += int(samples)
        if loss is not None:
            self.loss = float(loss)
            if self._pending is not None:
                self._pending["loss"] = self.loss
                self._flush()
        if accuracy is not None:
            if not 0.0 <= accuracy <= 1.0:
                raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
            self.accuracy = float(accuracy)
            self._flush()
            self.out.write("eval", step=self.step, accuracy=self.accuracy, loss=self.loss)

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
