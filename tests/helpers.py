"""The tests' shared helpers: an in-process cluster (coordinator and servers in threads, real ZeroMQ on loopback),
real processes (``zps`` commands and roles started with their own environments), the process table, and reading a
launcher's output."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from zps.lab.chaos import marked_pids
from zps.lab.network import Emulator
from zps.launcher.coordinator import Coordinator
from zps.process import die_with_parent
from zps.protocol.config import Config, JobConfig
from zps.protocol.security import Secrets, make_secrets
from zps.ps.server import Server
from zps.worker.client import Client

T = TypeVar("T")
A = TypeVar("A")


class LocalCluster:
    def __init__(self, coordinator: Coordinator, servers: list[Server], job: JobConfig,
                 secrets: dict[str, Secrets] | None = None) -> None:
        self.coordinator = coordinator
        self.servers = servers
        self.job = job
        self.num_workers = job.num_workers
        self.timeout = job.timeout
        self.secrets = secrets  # the job's keys, with secure=True
        self.threads: list[threading.Thread] = []  # the coordinator's, then each server's
        self.network: Emulator | None = None  # with net=...: the emulated links (each queue counts its bytes)

    def worker_config(self, rank: int = -1, **job_overrides: Any) -> Config:
        return Config(
            role="worker",
            coordinator=self.coordinator.endpoint,
            rank=rank,
            job=dataclasses.replace(self.job, **job_overrides),
            secrets=self.secrets[f"worker-{rank}"] if self.secrets is not None else None,
        )

    def clients(self, **kwargs: Any) -> list[Client]:
        """One client per worker rank, registered concurrently (registration waits for the whole cluster)."""
        return run_parallel(lambda r: Client(self.worker_config(r), **kwargs), range(self.num_workers))


def run_parallel(fn: Callable[[A], T], items: Iterable[A], timeout: float = 120) -> list[T]:
    """``fn(item)`` for each item, each in its own thread; the results in order (the first exception re-raised)."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result(timeout=timeout) for f in futures]


@contextlib.contextmanager
def local_cluster(
    num_servers: int,
    num_workers: int,
    mode: str = "bsp",
    staleness: int = 0,
    timeout: float = 30.0,
    codec: str = "",
    heartbeat_timeout: float = 10.0,
    **job: Any,
) -> Iterator[LocalCluster]:
    """Coordinator and servers in threads of this process; ``codec`` is the job's ZPS_CODEC as servers see it."""
    settings = JobConfig(
        num_servers=num_servers,
        num_workers=num_workers,
        mode=mode,
        staleness=staleness,
        timeout=timeout,
        heartbeat_timeout=heartbeat_timeout,
        heartbeat_interval=0.2,
        codec=codec,
        **job,
    )
    secrets = make_secrets(num_servers, num_workers) if settings.secure else None
    coordinator = Coordinator(settings, secrets=secrets["coordinator"] if secrets is not None else None)
    network = Emulator(settings.net) if settings.net else None  # as zps run does
    if network is not None:
        coordinator.route = network.route
    threads = [threading.Thread(target=coordinator.serve, daemon=True)]
    servers = []
    for rank in range(num_servers):
        server = Server(Config(role="server", coordinator=coordinator.endpoint, rank=rank, job=settings,
                               secrets=secrets[f"server-{rank}"] if secrets is not None else None))
        servers.append(server)
        threads.append(threading.Thread(target=server.run, daemon=True))
    for t in threads:
        t.start()
    try:
        cluster = LocalCluster(coordinator, servers, settings, secrets)
        cluster.threads, cluster.network = threads, network
        yield cluster
    finally:
        for s in servers:
            s.stop.set()
        for t in threads[1:]:  # servers first: they say goodbye to the coordinator on the way out
            t.join(timeout=10)
        coordinator.stop()
        threads[0].join(timeout=10)
        if network is not None:
            network.close()


def close_all(clients: list[Client]) -> None:
    run_parallel(lambda c: c.close(), clients)


# -- the process table -----------------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``ZPS_TEST_TAG=tag`` (zombies have an empty environ)."""
    return marked_pids(tag, "ZPS_TEST_TAG")


def role_pid(tag: str, role: str, rank: int, exclude: tuple[bytes, ...] = (b"zps.launcher.remote",)) -> int:
    """The pid of a role's own process among the tagged ones (not a guard or launcher: ``exclude`` names what
    must not be in its command line): its name (``zps-worker-1``, /proc/PID/comm) or, for a process that has not
    named itself yet, ``ZPS_ROLE``/``ZPS_RANK`` in the environment it was started with. (/proc/PID/environ is the
    environment a process was exec'ed with: a child the zygote forked shows the zygote's, without its role, but
    with the launcher's ZPS_TEST_TAG, which the zygote inherited.)"""
    name = f"zps-{role}-{rank}"[:15]
    for pid in tagged_pids(tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        named = comm == name
        started_as = f"ZPS_ROLE={role}".encode() in environ and f"ZPS_RANK={rank}".encode() in environ
        if (named or started_as) and not any(x in cmdline for x in exclude):
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
    stdout = proc.stdout
    assert stdout is not None, "start the process with stdout=PIPE"
    sel = selectors.DefaultSelector()
    sel.register(stdout, selectors.EVENT_READ)
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
            chunk = stdout.read1(65536)  # type: ignore[attr-defined]  # a BufferedReader
            if not chunk:
                break
            pending += chunk
    finally:
        proc._zps_pending = pending  # type: ignore[attr-defined]
        sel.close()
    raise AssertionError(
        f"{needle!r} not seen within {timeout}s; output:\n{''.join(seen)}{pending.decode(errors='replace')}"
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` to end; its exit code and output. Kills it (and fails) past ``timeout``."""
    earlier: bytes = getattr(proc, "_zps_pending", b"")  # read by wait_for_line past its line
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(
            f"the launcher did not end within {timeout}s:\n{(earlier + out).decode(errors='replace')}"
        ) from None
    return proc.returncode, (earlier + out).decode(errors="replace")


# -- real processes ---------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
ZPS = [sys.executable, "-m", "zps.launcher.cli"]
FOREVER = str(ROOT / "tests" / "scripts" / "train_forever.py")


# Ports handed to a process that binds them later are drawn below the kernel's ephemeral range (32768-60999 here):
# one the kernel picked could be taken by any outgoing connection (another test's) before the process binds it.
_PORTS = range(20000, 32768)


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """A base port with ``count`` free ports from it (metrics: the coordinator's, then one per server)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(_PORTS.start, _PORTS.stop - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError(f"no run of {count} free ports in {_PORTS.start}-{_PORTS.stop - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, outside the range the kernel gives outgoing connections."""
    return free_ports(1, host)


def _die_with_the_tests() -> None:  # in the child, before exec: it dies if the test run is killed outright
    die_with_parent(signal.SIGKILL)


def start(tag: str, args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``zps ARGS...`` with its output piped (read it with :func:`wait_for_line` and :func:`finish`)."""
    return subprocess.Popen(
        ZPS + args,
        cwd=cwd,
        env={**os.environ, **(env or {}), "ZPS_TEST_TAG": tag},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_the_tests,
    )


class Procs:
    """Processes started with their own environments; output to files (no pipe can fill up and stall one)."""

    def __init__(self, tag: str, directory: Path) -> None:
        self.tag, self.dir = tag, directory
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, env: dict[str, str], args: list[str], command: list[str] = ZPS,
              pipe: bool = False) -> subprocess.Popen:
        """``pipe``: its output to a pipe instead of its log file (read it with :func:`wait_for_line` and
        :func:`finish`)."""
        # a clean environment: no ZPS_*/DMLC_*/torchrun variable of the test runner leaks into the roles
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ZPS_", "DMLC_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        }
        with open(self.dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                command + args,
                cwd=ROOT,
                stdout=subprocess.PIPE if pipe else log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**base, "ZPS_TEST_TAG": self.tag, "OMP_NUM_THREADS": "1", **env},
                preexec_fn=_die_with_the_tests,
            )
        return self.procs[name]

    def wait(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still runs after {timeout}s\n{self.logs()}") from None
        return codes

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)}" for name in self.procs)


@contextlib.contextmanager
def engine_and_two_fake_servers(name: str) -> Iterator[tuple[Any, list[Any], list[list[int]]]]:
    """A worker's Engine connected to two fake servers (ROUTERs on inproc): (engine, [fake 0, fake 1], notices);
    appending a route list to ``notices`` is the coordinator's failover notice the engine reads next. Closed after."""
    import zmq

    from zps.protocol.tensors import Decoders
    from zps.worker._engine import Engine
    from zps.worker._replies import Replies
    from zps.worker._shm import SharedAreas

    ctx: zmq.Context[Any] = zmq.Context.instance()
    fakes = [ctx.socket(zmq.ROUTER) for _ in range(2)]
    addresses = [f"inproc://zps-test-{name}-{os.getpid()}-{id(fakes)}-{i}" for i in range(2)]
    for fake, address in zip(fakes, addresses, strict=True):
        fake.bind(address)
    notices: list[list[int]] = []
    engine = Engine("worker:0", ctx, addresses, timeout=5.0, replies=Replies(Decoders(), SharedAreas("worker:0")),
                    failure=lambda: None, reroute=lambda: notices.pop() if notices else None)
    try:
        yield engine, fakes, notices
    finally:
        engine.close()
        for fake in fakes:
            fake.close(linger=0)
