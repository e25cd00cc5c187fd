"""The ssh backend of ``zps launch``: each server and worker is one ``ssh host -- <remote command>``.

The coordinator runs inside the launcher (:func:`zps.launcher.job.run_job`); every other process runs on the host
:func:`zps.launcher.hostfile.place` gives it, started with the system OpenSSH client (``BatchMode=yes``: no
prompts; the user's ``~/.ssh/config``, keys and agent apply; host keys are checked as ssh always does).

The remote command is an argv list, quoted with :func:`shlex.join` only for the remote shell::

    cd WORKDIR && exec env K=V ... PYTHON -m zps.launcher.remote guard --label 'worker 1@node2' \\
        [--interface IF] -- PYTHON -u -m zps.launcher.cli node [SCRIPT ARGS...]

The guard (:mod:`zps.launcher.remote`) ends the role when the ssh session ends and sets its bind address.
"""
from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace

from zps.protocol.config import JobConfig
from zps.protocol.variables import ZPS_HOST

from .backend import LaunchError, ProcSpec, local_env, role_command, role_env
from .hostfile import Host, HostfileError, Placement, format_placement, place
from .remote import host_address
from .ssh_command import Remote, SshOptions, ssh_destination

# --- addresses -------------------------------------------------------------------------------------------------

def coordinator_address(interface: str | None, first_host: str) -> str:
    """The launcher host's address the remote hosts reach the coordinator at.

    ``interface``'s IPv4 address here, else the local address the kernel routes to ``first_host`` from (a UDP
    ``connect`` sends nothing). For hosts on loopback that is 127.0.0.1.
    """
    if interface:
        try:
            return host_address(interface, {})
        except LookupError as exc:
            raise LaunchError(str(exc)) from None
    destination = ssh_destination(first_host)
    try:
        infos = socket.getaddrinfo(destination, 9, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise LaunchError(f"cannot resolve {destination!r} on the launcher host ({exc.strerror}), so the address "
                          f"the hosts reach the coordinator at is unknown; pass --interface") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(infos[0][4])
        except OSError as exc:
            raise LaunchError(f"no route from the launcher host to {destination} ({exc.strerror}); "
                              f"pass --interface") from None
        return s.getsockname()[0]


# --- the backend -----------------------------------------------------------------------------------------------

def remote_hosts(placements: Sequence[Placement]) -> list[str]:
    """The hosts that run servers or workers, in placement order, each once."""
    return list(dict.fromkeys(p.host for p in placements if p.role != "coordinator"))


class SshBackend:
    """Servers and workers on the hosts of a hostfile, each started by one ssh client of the launcher."""

    def __init__(self, hosts: Sequence[Host], script: Sequence[str], remote: Remote, ssh: SshOptions,
                 preflight: bool = True, preflight_timeout: float = 15.0, port: int = 0,
                 base_env: Mapping[str, str] | None = None) -> None:
        self.hosts, self.script, self.remote, self.ssh = list(hosts), list(script), remote, ssh
        self.preflight, self.preflight_timeout, self.port = preflight, preflight_timeout, port
        self.base_env = base_env
        self.placements: list[Placement] = []

    def _place(self, job: JobConfig) -> None:
        self._check_env(job)
        try:
            self.placements = place(self.hosts, job.num_servers, job.num_workers)
        except HostfileError as exc:
            raise LaunchError(f"zps launch: {exc}") from None

    def _check_env(self, job: JobConfig) -> None:
        """Refuse ``--env`` variables that zps launch sets itself: the two values would disagree."""
        clash = sorted(set(role_env(job, "worker", 0, "host:1")) & set(self.remote.env))
        if clash:
            hint = "; --interface chooses the bind address" if ZPS_HOST in clash else ""
            raise LaunchError(f"zps launch: --env {', '.join(clash)}: zps launch sets "
                              f"{'it' if len(clash) == 1 else 'them'} for each process from its own options "
                              f"(--timeout, --optimizer, ...){hint}")

    def prepare(self, job: JobConfig) -> str:
        """Place the job and run the preflight (:mod:`zps.launcher.preflight`); the coordinator's address."""
        from . import preflight as checks

        self._place(job)
        targets = remote_hosts(self.placements)
        try:
            coordinator_host: str | None = coordinator_address(self.remote.interface, targets[0])
            problems = []
        except LaunchError as exc:
            if not self.preflight:
                raise LaunchError(f"zps launch: {exc}") from None
            # reported with whatever the hosts have to say, in one table
            coordinator_host, problems = None, [checks.Problem(checks.LAUNCHER, "interface", str(exc))]
        if self.preflight:
            problems += checks.run_preflight(targets, self.ssh, self.remote, coordinator_host, self.port,
                                             self.script[0], timeout=self.preflight_timeout,
                                             checkpoint_dir=job.checkpoint_dir)
            if problems:
                raise LaunchError(checks.format_problems(problems))
        assert coordinator_host is not None
        return coordinator_host

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        """One ssh client per server and worker (servers first), each labelled ``role rank@host``."""
        launcher_env = local_env(self.base_env)
        per_host: dict[str, int] = {}
        for p in self.placements:
            if p.role != "coordinator":
                per_host[p.host] = per_host.get(p.host, 0) + 1
        procs = []
        for p in self.placements:
            if p.role == "coordinator":
                continue
            env = role_env(job, p.role, p.rank, coordinator, local_rank=p.local_rank)
            del env[ZPS_HOST]  # the guard sets it on the host (see zps.launcher.remote.host_address)
            label = f"{p.role} {p.rank}@{ssh_destination(p.host)}"
            script = self.script if p.role == "worker" else []
            guarded = self.remote.guarded(label, role_command(self.remote.python, script), share=per_host[p.host],
                                          secrets_stdin=job.secure)
            command = self.remote.command(guarded, {"PYTHONUNBUFFERED": "1", **env})
            procs.append(ProcSpec(label, p.role, p.rank, self.ssh.argv(p.host, command), launcher_env,
                                  secrets_on_stdin=job.secure))
        return procs

    def describe(self, job: JobConfig) -> str:
        """What ``zps launch --dry-run`` prints: the placement table and the exact command of every process."""
        self._place(job)
        coordinator_host = coordinator_address(self.remote.interface, remote_hosts(self.placements)[0])
        port = str(self.port) if self.port else "PORT"
        shown = [replace(p, host=f"{coordinator_host} (in zps launch)") if p.role == "coordinator" else p
                 for p in self.placements]
        lines = [f"zps launch: {job.num_servers} servers, {job.num_workers} workers on "
                 f"{len(remote_hosts(self.placements))} hosts; coordinator at {coordinator_host}:{port}", "",
                 format_placement(shown), ""]
        if not self.port:
            lines += ["PORT: the coordinator binds a free port when the job starts (fix it with --port)", ""]
        base_env, self.base_env = self.base_env, {}
        try:
            for proc in self.processes(job, f"{coordinator_host}:{port}"):
                lines.append(f"[{proc.label}] {shlex.join(proc.argv)}")
        finally:
            self.base_env = base_env
        return "\n".join(lines)
