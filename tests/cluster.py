"""Test helpers: an in-process cluster (coordinator and servers in threads, real ZeroMQ on loopback), and a
process-table check for multi-process tests."""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

from zps.launcher.coordinator import Coordinator
from zps.protocol.config import Config
from zps.ps.server import Server
from zps.worker.client import Client

T = TypeVar("T")


class LocalCluster:
    def __init__(self, coordinator: Coordinator, servers: list[Server], num_workers: int, timeout: float,
                 heartbeat_timeout: float = 10.0) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.coordinator = coordinator
        self.servers = servers
        self.num_workers = num_workers
        self.timeout = timeout

    def worker_config(self, rank: int = -1, **overrides) -> Config:
        values = dict(
            role="worker",
            coordinator=self.coordinator.endpoint,
            num_servers=len(self.servers),
            num_workers=self.num_workers,
            rank=rank,
            timeout=self.timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            heartbeat_interval=0.2,
        )
        values.update(overrides)
        return Config(**values)

    def clients(self, **kwargs) -> list[Client]:
        """One client per worker rank, registered concurrently (registration waits for the whole cluster)."""
        return run_parallel([lambda r=r: Client(self.worker_config(r), **kwargs) for r in range(self.num_workers)])


def run_parallel(calls: list[Callable[[], T]], timeout: float = 120) -> list[T]:
    """Run each call in its own thread; return the results in order, re-raising the first exception."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result(timeout=timeout) for f in futures]


@contextlib.contextmanager
def local_cluster(
    num_servers: int, num_workers: int, mode: str = "bsp", staleness: int = 0, timeout: float = 30.0, codec: str = "",
    heartbeat_timeout: float = 10.0,
) -> Iterator[LocalCluster]:
    """Coordinator and servers in threads of this process; ``codec`` is the job's ZPS_CODEC as servers see it."""
    coordinator = Coordinator(num_servers, num_workers, mode=mode, staleness=staleness, timeout=timeout, heartbeat_timeout=heartbeat_timeout)
    threads = [threading.Thread(target=coordinator.serve, daemon=True)]
    servers = []
    for rank in range(num_servers):
        config = Config(
            role="server", coordinator=coordinator.endpoint, num_servers=num_servers, num_workers=num_workers,
            rank=rank, timeout=timeout, heartbeat_timeout=heartbeat_timeout, heartbeat_interval=0.2, codec=codec,
        )
        server = Server(config)
        servers.append(server)
        threads.append(threading.Thread(target=server.run, daemon=True))
    for t in threads:
        t.start()
    try:
        yield LocalCluster(coordinator, servers, num_workers, timeout, heartbeat_timeout)
    finally:
        for s in servers:
            s.stop.set()
        for t in threads[1:]:  # servers first: they say goodbye to the coordinator on the way out
            t.join(timeout=10)
        coordinator.stop()
        threads[0].join(timeout=10)


def close_all(clients: list[Client]) -> None:
    run_parallel([c.close for c in clients])


# -- the process table -----------------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``ZPS_TEST_TAG=tag`` (zombies have an empty environ)."""
    needle = f"ZPS_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def role_pid(tag: str, role: str, rank: int, exclude: tuple[bytes, ...] = (b"zps.launcher.ssh", b"zps.launcher.cli")) -> int:
    """The pid of a role's own process among the tagged ones (not a guard or launcher: ``exclude`` names what
    must not be in its command line)."""
    for pid in tagged_pids(tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if (f"ZPS_ROLE={role}".encode() in environ and f"ZPS_RANK={rank}".encode() in environ
                and not any(x in cmdline for x in exclude)):
            return pid
    raise AssertionError(f"no {role} {rank} among the processes tagged {tag}")


def wait_for_no_tagged(tag: str, within: float) -> list[int]:
    """Wait up to ``within`` seconds for every tagged process to be gone; return the survivors."""
    deadline = time.monotonic() + within
    while True:
        left = tagged_pids(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)  # polling an external condition (the kernel's process table), bounded by the deadline


def kill_tagged(tag: str) -> None:
    for pid in tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- watching a launcher's output -------------------------------------------------------------------------
def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read ``proc``'s output until a line contains ``needle``; return everything read up to that line.

    Reads whatever is available (``read1``) and splits lines itself: ``readline`` after ``select`` would leave a
    second line that came in the same read in Python's buffer, unseen by the next ``select``. What is read past
    the line is kept for the next call and for :func:`finish`.
    """
    seen = []
    pending: bytes = getattr(proc, "_zps_pending", b"")
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                line = raw.decode(errors="replace") + "\n"
                seen.append(line)
                if needle in line:
                    return "".join(seen)
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                break
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            pending += chunk
    finally:
        proc._zps_pending = pending  # type: ignore[attr-defined]
        sel.close()
    raise AssertionError(f"{needle!r} not seen within {timeout}s; output:\n{''.join(seen)}{pending.decode(errors='replace')}")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` to end; its exit code and output. Kills it (and fails) past ``timeout``."""
    earlier: bytes = getattr(proc, "_zps_pending", b"")  # read by wait_for_line past its line
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the launcher did not end within {timeout}s:\n{(earlier + out).decode(errors='replace')}") from None
    return proc.returncode, (earlier + out).decode(errors="replace")
