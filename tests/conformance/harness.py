"""Running one conformance script under DDP/gloo and under ``zps run``, and comparing what rank 0 ended with.

DDP runs as torchrun would start it: W processes with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``,
gloo on loopback. zps runs as a user would: ``zps run --servers S --workers W script.py``. Both with one torch
thread per process (``zps run`` gives each process cores // processes, 1 on the 2-core CI machines), so the two
do the same arithmetic in each process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..helpers import ROOT, finish, free_port, start, wait_for_no_tagged

SCRIPTS = Path(__file__).resolve().parent / "scripts"
TIMEOUT = 240.0


def script(name: str) -> str:
    return str(SCRIPTS / f"{name}.py")


def run_ddp(tag: str, name: str, world: int, out: Path, args: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``name`` under DDP/gloo with ``world`` ranks; rank 0's state."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZPS_", "DMLC_", "SLURM_"))}
    procs = []
    logs = []
    for rank in range(world):
        log = open(out.parent / f"{out.stem}.ddp{rank}.log", "wb")  # noqa: SIM115  # closed below
        logs.append(log)
        env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "ZPS_TEST_TAG": tag}
        procs.append(subprocess.Popen([sys.executable, script(name), "--backend", "ddp", "--out", str(out), *args],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    text = "\n".join((out.parent / f"{out.stem}.ddp{r}.log").read_text(errors="replace") for r in range(world))
    assert codes == [0] * world, f"DDP exited {codes}:\n{text}"
    return load_file(str(out))


def run_zps(tag: str, name: str, workers: int, servers: int, out: Path, args: tuple[str, ...] = (),
            job: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], str]:
    """``zps run --servers S --workers W [job] name --backend zps [args]``; rank 0's state and the output."""
    code, text = finish(start(tag, ["run", "--servers", str(servers), "--workers", str(workers), *job,
                                    script(name), "--backend", "zps", "--out", str(out), *args],
                              env={"OMP_NUM_THREADS": "1"}), timeout=TIMEOUT)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    return load_file(str(out)), text


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float = 0.0,
                what: str = "") -> None:
    """Every tensor of ``expected`` in ``got``, equal within ``atol`` (0: bit for bit)."""
    assert expected.keys() == got.keys(), f"{what}: {sorted(expected)} != {sorted(got)}"
    worst = {}
    for name, a in expected.items():
        b = got[name]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} {name}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
        if a.is_floating_point():
            worst[name] = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        else:
            worst[name] = float((a != b).sum().item())
    bad = {k: v for k, v in worst.items() if not v <= atol}
    assert not bad, f"{what}: differ by more than {atol}: {bad}"
