"""What a backend is and what it hands the job's lifecycle: the vocabulary every launcher backend shares.

A :class:`Backend` places a job's processes and says how each one starts, as one :class:`ProcSpec` per server
and worker; :func:`zps.launcher.job.run_job` does the rest. Every backend starts a role the same way: the
role's ``ZPS_*`` variables (:func:`role_env`) and ``zps node`` (:func:`role_command`), which runs the role they
name. :class:`LaunchError` is the one error of a job that cannot start as asked.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Protocol

from zps.protocol.config import Config, JobConfig

if TYPE_CHECKING:
    from .zygote_client import Zygote


class LaunchError(RuntimeError):
    """The job cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ProcSpec:
    """One process to start: ``label`` prefixes its output (``worker 1``), ``env`` is its whole environment,
    ``argv`` its command as a fresh process. ``script`` is what the role runs (a worker's training script and its
    arguments; none for a server); ``zygote``, where set, forks the role with that script instead of starting
    ``argv`` (the local backend's --preload)."""

    label: str
    role: str
    rank: int
    argv: list[str]
    env: dict[str, str]
    script: tuple[str, ...] = ()
    zygote: Zygote | None = field(default=None, compare=False, repr=False)
    # --secure: how the process gets its keys: in its environment (ZPS_SECRETS), or on its standard input (the ssh
    # backend: an ssh command line is visible to every user of both hosts)
    secrets_on_stdin: bool = False
    # where set, this starts the role instead of a local process (the Ray backend: an actor on a node of its cluster)
    starter: Starter | None = field(default=None, compare=False, repr=False)


class Proc(Protocol):
    """A started role as the process group sees it: a ``subprocess.Popen``, a zygote's child, or a role that another
    system runs (:class:`Started`). Its output comes on ``stdout``; ``poll`` and ``wait`` give its exit code."""

    @property
    def pid(self) -> int: ...

    @property
    def stdout(self) -> IO[bytes] | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Started(Proc, Protocol):
    """A role a :class:`Starter` started somewhere other than this host's process table. Its ``pid`` is on its own
    node: the launcher never signals it; :meth:`signal_group` does, wherever the role runs. ``cause``, once it
    ended, says how where an exit code cannot (``its actor died with node 10.0.0.3``); else None."""

    cause: str | None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the role's process group (SIGKILL: end it and whatever holds it, at once)."""


class Starter(Protocol):
    """Starts a :class:`ProcSpec`'s role itself (an actor on a Ray cluster) instead of a local process."""

    def start(self, spec: ProcSpec, env: dict[str, str]) -> Started:
        """Start ``spec``'s role with ``env`` laid over its node's environment."""


class Backend(Protocol):
    """Where a job's servers and workers run and how each one starts (local processes, ssh, ...)."""

    def prepare(self, job: JobConfig) -> str:
        """Place the processes and check that they can start; return the address the coordinator binds."""

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        """Every server and worker of the job, servers first; ``coordinator`` is its ``host:port``."""


def role_command(python: str, script: Sequence[str]) -> list[str]:
    """How every backend starts a role: ``zps node`` runs the role its ``ZPS_*`` variables name (a worker runs
    ``script`` in that process, so a script that fails is reported as a failure, never as a clean exit)."""
    return [python, "-u", "-m", "zps.launcher.cli", "node", *script]


def role_env(job: JobConfig, role: str, rank: int, coordinator: str, host: str = "127.0.0.1",
             local_rank: int = 0) -> dict[str, str]:
    """The ``ZPS_*`` variables of one process of ``job``."""
    return Config(role=role, coordinator=coordinator, rank=rank, host=host, local_rank=local_rank, job=job).to_env()


def local_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base environment of children started from this host: the launcher's own, with unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
