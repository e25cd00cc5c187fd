"""Shared helpers of the benchmarks: timing and medians, markdown tables, machine facts, starting a zps job.

A benchmark script measures its baselines in its own process (plus helper processes it starts and ends), and
runs zps by re-launching itself as the worker script of ``zps run``. Worker rank 0 prints one line
``ZPS_BENCH_RESULT {json}``; the launcher prefixes it ``[worker 0] `` and :func:`run_zps` parses it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULT_TAG = "ZPS_BENCH_RESULT "

if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# -- timing ----------------------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (``clock``: wall time; or
    ``time.process_time`` for this process's CPU time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def rate_windows(fn: Callable[[], object], windows: int, seconds: float, warmup: float = 0.2) -> list[float]:
    """Calls per second of ``fn`` in ``windows`` back-to-back windows of about ``seconds`` each."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    rates = []
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            fn()
            count += 1
            now = time.perf_counter()
            if now >= end:
                break
        rates.append(count / (now - start))
    return rates


# -- machine facts -----------------------------------------------------------------------------------------
def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def code_version() -> str:
    """The checkout's commit, plus a mark when the core packages differ from it (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", "protocol", "ps", "worker", "launcher"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if not head:
        return "?"
    return head + (f" + uncommitted changes in {len(changed)} core file(s)" if changed else "")


def machine_facts() -> dict[str, Any]:
    import numpy
    import torch
    import zmq

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "numpy": numpy.__version__,
        "load_avg": load_avg(),
        "zps_code": code_version(),
        "mem_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
    }


def _meminfo_kib(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (and RssAnon, RssFile) of ``pid`` in KiB, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(rest.split()[0])
    return out


def echo_until_empty(sock: Any) -> None:
    """Echo every message back to its sender (a ROUTER), until a message with an empty body; then close
    ``sock``'s context. The pyzmq peer of the transport and secure benchmarks."""
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and len(frames[1]) == 0:
            break
        sock.send_multipart(frames, copy=False)
    sock.close()
    sock.context.term()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- tables ------------------------------------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}x"


# -- command line and results ---------------------------------------------------------------------------------
def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="a fast pass: fewer sizes, repeats and steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the results (and the markdown) here")
    return parser


def finish(
    name: str, markdown: str, data: dict[str, Any], json_path: Path | None, started: float, load_before: str
) -> dict[str, Any]:
    """Print the markdown, write the JSON (with the markdown and machine facts) and return it."""
    result = {
        "benchmark": name,
        "markdown": markdown,
        "load_before": load_before,
        "load_after": load_avg(),
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_facts(),
        **data,
    }
    print(markdown)
    print(
        f"\n(load average before: {load_before}; after: {result['load_after']}; {result['seconds']:.0f} s)", flush=True
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    return result


def emit_result(obj: Any) -> None:
    """Worker side: hand a JSON-able result back to :func:`run_zps` through stdout."""
    print(RESULT_TAG + json.dumps(obj), flush=True)


# -- zps jobs ------------------------------------------------------------------------------------------------
def zps_command() -> list[str]:
    exe = Path(sys.executable).parent / "zps"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zps.launcher.cli"]


def run_zps(
    script: str | Path,
    script_args: Sequence[str],
    servers: int = 1,
    workers: int = 1,
    mode: str = "bsp",
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    zps_args: Sequence[str] = (),
    echo: bool = False,
) -> dict[str, Any]:
    """Run ``zps run ... script script_args`` and return worker 0's ``ZPS_BENCH_RESULT`` object.

    The launcher runs in its own session; on timeout or error it gets SIGTERM (its own teardown ends the
    servers and workers), then SIGKILL of its group. Raises RuntimeError with the output's tail when no result came.
    """
    argv = [
        *zps_command(),
        "run",
        "--servers",
        str(servers),
        "--workers",
        str(workers),
        "--mode",
        mode,
        *zps_args,
        str(script),
        *script_args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    pythonpath = full_env.get("PYTHONPATH", "")
    full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pythonpath if pythonpath else "")
    proc = subprocess.Popen(
        argv,
        env=full_env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    lines: list[str] = []
    result: Any = None
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"zps job did not finish within {timeout:.0f}s")
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            line = line.rstrip("\n")
            lines.append(line)
            del lines[:-200]
            if echo:
                print("    " + line, flush=True)
            marker = line.find(RESULT_TAG)
            if marker >= 0 and line.startswith("[worker 0]"):
                result = json.loads(line[marker + len(RESULT_TAG) :])
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:
        _end(proc)
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"zps job {' '.join(argv[1:])} failed: {exc}\n--- last output ---\n{tail}") from exc
    finally:
        _end(proc)
    if result is None or code != 0:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(
            f"zps job {' '.join(argv[1:])} exited {code} (result: {result is not None})\n--- last output ---\n{tail}"
        )
    return result


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def shm_option() -> tuple[dict[str, str], dict[str, str], str]:
    """(environment that turns zps's same-host shared-memory path on, environment that turns it off, note)."""
    return {"ZPS_SHM": "1"}, {"ZPS_SHM": "0"}, "zps's same-host shared-memory path: ZPS_SHM=1 on (default), 0 off"


class Helper:
    """A helper process running ``python -c CODE`` (or argv) that prints one line when ready; ended by pid."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        full_env = {**os.environ, **(env or {})}
        pythonpath = full_env.get("PYTHONPATH", "")
        full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        self.proc = subprocess.Popen(
            list(argv),
            env=full_env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        assert self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=ready_timeout):
            self.close()
            raise RuntimeError(f"helper {' '.join(argv)} was not ready within {ready_timeout:.0f}s")
        self.ready_line = self.proc.stdout.readline().strip()
        if not self.ready_line:
            self.close()
            raise RuntimeError(f"helper {' '.join(argv)} exited before it was ready (code {self.proc.poll()})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        _end(self.proc)

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def zmq_peer(argv: Sequence[str], socket_type: int) -> Iterator[Any]:
    """Start a helper that prints the loopback port it bound, and yield a pyzmq socket of ``socket_type``
    connected to it; socket, context and helper are closed on the way out."""
    import zmq

    ctx = zmq.Context()
    try:
        with Helper(argv) as helper:
            sock = ctx.socket(socket_type)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{int(helper.ready_line)}")
            try:
                yield sock
            finally:
                sock.close()
    finally:
        ctx.term()
