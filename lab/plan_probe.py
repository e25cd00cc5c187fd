"""The model ``zps plan --model SCRIPT`` plans for, taken from any zps training script by running its first steps
under a planning stand-in for the cluster.

    python -m zps.lab.plan_probe --out model.json [--warmup 2] [--steps 5] SCRIPT [ARGS...]

:func:`probe_script` runs this module in a fresh interpreter (one torch thread, no ``ZPS_ROLE``). It runs the script
as ``python SCRIPT ARGS`` would (``__main__``, its own arguments), so ``worker.init()`` gives it the local session
of a script started by no launcher (:mod:`zps.worker.local`: the only worker, its optimizer stepped in the process).
Before the script starts, ``zps.worker.DistributedOptimizer``'s ``__init__`` is wrapped by a stand-in that describes
the first one built and times its ``step`` (the class stays, so ``isinstance`` holds), and ``zps.worker.init`` by
one that gives the local session the job's default settings and a one-server BSP topology where it has none, for
scripts that read ``client.config`` or ``client.topology``. A step's compute is the time from the end of the
previous ``step()`` to the start of this one (data, forward, backward, the script's own work: what ``--metrics-out``
calls compute), its samples what the script reported meanwhile (``worker.report(samples=...)``). After ``warmup``
steps and ``steps`` more, the stand-in stops the script (an exception no ``except Exception`` catches) and writes
what it saw: the parameters the optimizer steps (names and shapes, in the model's order), the median compute and
samples of the timed steps, and the optimizer's class and learning rate. Nothing of zps.worker is changed on disk
(only in the probe's own interpreter); the script's training beyond those steps never runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# a launcher's variables: without them the script runs as the only worker (zps.worker.local)
_LAUNCHED = ("ZPS_ROLE", "DMLC_ROLE", "WORLD_SIZE")
WARMUP, STEPS = 2, 5
TIMEOUT = 600.0  # seconds the script may take to reach its timed steps


class ProbeError(RuntimeError):
    """The script could not be planned for; the message says why (and what to give instead)."""


@dataclass(frozen=True)
class Probed:
    """What the script's first steps showed."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    compute: float  # seconds, the median of the timed steps
    computes: tuple[float, ...]
    batch: int  # samples per step the script reported (0: it reports none)
    optimizer: str  # e.g. "adam:lr=0.002"
    steps: int  # steps the script ran


class _Enough(BaseException):
    """Raised from the stand-in's step once the timed steps are done: ends the script (not an Exception, so the
    script's own ``except Exception`` does not catch it)."""


def _optimizer_spec(optimizer: Any) -> str:
    """An optimizer spec of the wrapped torch optimizer: its class and what changes its cost (momentum, amsgrad)."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    parts = [f"lr={float(group['lr'])!r}"] if "lr" in group else []
    if group.get("momentum"):
        parts.append(f"momentum={float(group['momentum'])!r}")
    if group.get("amsgrad"):
        parts.append("amsgrad=True")
    return type(optimizer).__name__.lower() + (":" + ",".join(parts) if parts else "")


class _StandIn:
    """Builds the real DistributedOptimizer and times its steps (module docstring)."""

    def __init__(self, warmup: int, steps: int, out: Path) -> None:
        self.warmup, self.steps, self.out = warmup, steps, out
        self.computes: list[float] = []
        self.samples: list[int] = []
        self.count = 0
        self.described: dict[str, Any] | None = None
        self._end: float | None = None
        self._samples_then = 0

    @staticmethod
    def init(real: Any) -> Any:
        """``worker.init`` whose client has ``config`` and ``topology`` (the local session of a script started by no
        launcher may have neither: the job's defaults and one BSP server stand in)."""

        def init(*args: Any, **kwargs: Any) -> Any:
            client = real(*args, **kwargs)
            if not hasattr(client, "config"):
                from zps.protocol.config import JobConfig

                client.config = SimpleNamespace(job=JobConfig(), rank=0, role="worker")
            if not hasattr(client, "topology"):
                client.topology = SimpleNamespace(mode="bsp", staleness=0, num_servers=1)
            return client

        init.__doc__ = real.__doc__
        return init

    def patch(self, cls: Any) -> None:
        """``cls.__init__`` (DistributedOptimizer's) builds the real one, then describes and times the first one
        built. The class itself stays: a script's ``isinstance(opt, worker.DistributedOptimizer)`` holds (a function
        standing in for the class once broke examples/ctr.py's)."""
        real_init = cls.__init__

        def __init__(opt: Any, optimizer: Any, model: Any = None, *args: Any, **kwargs: Any) -> None:
            real_init(opt, optimizer, model, *args, **kwargs)
            if self.described is None:  # the first one built is the one planned for
                self._describe(optimizer, model, kwargs.get("named_parameters"))
                self._time(opt)

        __init__.__doc__ = real_init.__doc__
        cls.__init__ = __init__

    def _describe(self, optimizer: Any, model: Any, named: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ids = {id(p) for p in params}
        pairs = list(named) if named is not None else list(model.named_parameters()) if model is not None else []
        ordered, seen = [], set()
        for name, p in pairs:
            if id(p) in ids and id(p) not in seen:
                ordered.append((name, p))
                seen.add(id(p))
        ordered += [(f"param.{i}", p) for i, p in enumerate(params) if id(p) not in seen]
        self.described = {"names": [n for n, _ in ordered], "shapes": [list(p.shape) for _, p in ordered],
                          "sizes": [int(p.numel()) for _, p in ordered], "optimizer": _optimizer_spec(optimizer)}

    def _time(self, opt: Any) -> None:
        step = opt.step
        progress = opt.client.progress

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            if self._end is not None:
                self.computes.append(began - self._end)
                self.samples.append(progress.samples - self._samples_then)
            result = step(*args, **kwargs)
            self.count += 1
            if self.count > self.warmup + self.steps:
                raise _Enough
            self._samples_then = progress.samples
            self._end = time.perf_counter()
            return result

        opt.step = timed

    def write(self) -> None:
        timed = self.computes[self.warmup:] or self.computes
        later = self.samples[self.warmup:] or self.samples
        self.out.write_text(json.dumps({**(self.described or {}), "computes": timed, "steps": self.count,
                                        "compute": statistics.median(timed) if timed else None,
                                        "batch": int(statistics.median(later)) if later else 0}))


def _main() -> int:
    parser = argparse.ArgumentParser(description="time a zps script's first steps (zps plan --model)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    logging.getLogger("zps.worker").setLevel(logging.ERROR)  # (its "no launcher" notice is expected here)
    from zps import worker

    stand_in = _StandIn(args.warmup, args.steps, Path(args.out))
    stand_in.patch(worker.DistributedOptimizer)
    worker.init = stand_in.init(worker.init)
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, str(Path(args.script).resolve().parent))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except _Enough:
        pass
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    stand_in.write()
    return 0


def probe_script(script: str, args: list[str] | tuple[str, ...] = (), warmup: int = WARMUP, steps: int = STEPS,
                 timeout: float = TIMEOUT) -> Probed:
    """Run ``script`` under the planning stand-in (module docstring) in a fresh interpreter; what it showed."""
    if not os.path.isfile(script):
        raise ProbeError(f"{script}: no such file")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHED}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="zps-plan-") as tmp:
        out = Path(tmp) / "model.json"
        argv = [sys.executable, "-m", "zps.lab.plan_probe", "--out", str(out), "--warmup", str(warmup), "--steps",
                str(steps), script, *args]
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProbeError(f"{script} took more than {timeout:.0f} s to reach {warmup + steps + 1} steps") from None
        if done.returncode != 0 or not out.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise ProbeError(f"{script} exited {done.returncode} before its first steps:\n{tail}")
        got = json.loads(out.read_text())
    if "sizes" not in got:
        raise ProbeError(f"{script} built no zps.worker.DistributedOptimizer (a script that pushes and pulls "
                         "through the low-level client): give --params, --tensors and --compute-ms instead")
    if got["compute"] is None:
        raise ProbeError(f"{script} ended after {got['steps']} step(s): the plan times a step from the end of "
                         "the one before it; give it arguments that make at least 2 steps")
    return Probed(tuple(got["names"]), tuple(got["sizes"]), float(got["compute"]), tuple(got["computes"]),
                  int(got["batch"]), str(got["optimizer"]), int(got["steps"]))


if __name__ == "__main__":
    sys.exit(_main())
