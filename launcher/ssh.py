"""The ssh backend of ``zps launch``: each server and worker is one ``ssh host -- <remote command>``.

The coordinator runs inside the launcher (:func:`launcher.job.run_job`); every other process runs on the host
:func:`launcher.hostfile.place` gives it, started with the system OpenSSH client (``BatchMode=yes``: no
prompts; the user's ``~/.ssh/config``, keys and agent apply; host keys are checked as ssh always does).

The remote command is an argv list, quoted with :func:`shlex.join` only for the remote shell::

    cd WORKDIR && exec env K=V ... PYTHON -m zps.launcher.ssh guard --label 'worker 1@node2' [--interface IF] \\
        -- PYTHON -u SCRIPT ARGS...            (a server: -- PYTHON -m zps.ps)

The *guard* is the remote half of the backend. It sets ``ZPS_HOST`` (the address the role binds on that host:
the IPv4 address of ``--interface`` there, else the address ssh reached the host at, from ``SSH_CONNECTION``),
starts the role in its own process group and ends that group (SIGTERM, then SIGKILL after a grace period)

* when the ssh session goes away -- the launcher's teardown, Ctrl-C, a crash, a lost network: sshd starts
  the remote command without a terminal and does not signal it when the client disconnects, so the guard asks
  the kernel for a signal when its parent, the sshd session process, exits (``PR_SET_PDEATHSIG``);
* when the guard itself is told to stop (SIGTERM, SIGHUP, SIGINT).

The guard exits with the role's exit code (``128 + N`` when signal N killed it, saying so), which ssh passes
back, so the launcher's first-failure rule and exit code work as for local processes.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import IO, Mapping, Sequence

from .hostfile import Host, Placement, format_placement, place
from .job import JobSpec, ProcSpec, local_env, run_job

DEFAULT_CONNECT_TIMEOUT = 10.0
# seconds the guard gives a role between SIGTERM and SIGKILL
GUARD_GRACE = 3.0
# variables zps launch sets for each process besides JobSpec.role_env's; --env may not set them
LAUNCHER_VARS = ("ZPS_HOST", "ZPS_LOCAL_RANK", "ZPS_OPTIMIZER", "ZPS_CODEC", "ZPS_PULL_CODEC", "ZPS_MODE",
                 "ZPS_STALENESS")


class LaunchError(RuntimeError):
    """zps launch cannot start the job as asked; the message says why and what to do."""


@dataclass(frozen=True)
class SshOptions:
    """How to reach the hosts: ``ssh -p port -l user -o option ...``; ``None`` leaves it to ssh and its config."""

    port: int | None = None
    user: str | None = None
    options: tuple[str, ...] = ()  # extra -o values, e.g. "IdentityFile=/path/key"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def argv(self, host: str, remote: str, connect_timeout: float | None = None) -> list[str]:
        """The local ssh command that runs the shell command ``remote`` on ``host``."""
        timeout = self.connect_timeout if connect_timeout is None else connect_timeout
        argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout))}",
                # a host that vanishes (power, network) ends its ssh client, so the launcher sees it as a failure
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        for option in self.options:
            argv += ["-o", option]
        return [*argv, ssh_destination(host), "--", remote]


@dataclass(frozen=True)
class Remote:
    """What the remote command looks like on every host: the interpreter, the directory, extra variables."""

    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)
    env: Mapping[str, str] = field(default_factory=dict)  # --env K=V, for every remote process
    interface: str | None = None  # the interface whose address servers and workers bind

    def command(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cd: bool = True) -> str:
        """The shell command that runs ``argv`` (in :attr:`workdir` when ``cd``) with :attr:`env` plus ``env``."""
        variables = {**self.env, **(env or {})}
        run = "exec " + shlex.join(["env", *(f"{k}={v}" for k, v in variables.items()), *argv])
        return f"cd {shlex.quote(self.workdir)} && {run}" if cd else run

    def guarded(self, label: str, argv: Sequence[str], share: int = 1) -> list[str]:
        """``argv`` wrapped in the guard (see the module docstring); ``share``: the job's processes on the host."""
        guard = [self.python, "-m", "zps.launcher.ssh", "guard", "--label", label, "--share", str(share)]
        if self.interface:
            guard += ["--interface", self.interface]
        return [*guard, "--", *argv]


def ssh_destination(host: str) -> str:
    """A hostfile name as ssh takes it: ``[fd00::1]`` -> ``fd00::1``."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def parse_env_options(items: Sequence[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` values as a dict; NAME must be a shell variable name."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"--env {item!r}: write NAME=VALUE, NAME made of letters, digits and '_'")
        out[name] = value
    return out


def check_env(spec: JobSpec, env: Mapping[str, str]) -> None:
    """Refuse ``--env`` variables that zps launch sets itself: the two values would disagree."""
    owned = {*spec.role_env("worker", 0, "-"), *LAUNCHER_VARS}
    clash = sorted(owned & set(env))
    if clash:
        hint = "; --interface chooses the bind address" if "ZPS_HOST" in clash else ""
        raise LaunchError(f"--env {', '.join(clash)}: zps launch sets {'it' if len(clash) == 1 else 'them'} for "
                          f"each process from its own options (--timeout, --optimizer, ...){hint}")


# --- addresses -------------------------------------------------------------------------------------------------

def host_address(interface: str | None, environ: Mapping[str, str]) -> str:
    """The address this host's zps processes bind: ``interface``'s IPv4 address, else the address ssh reached
    this host at (the third field of ``SSH_CONNECTION``). Raises LookupError saying what is missing.

    Runs on the remote host (in the guard and, as source, in the preflight probe): standard library only.
    """
    import fcntl
    import socket
    import struct

    if interface:
        names = sorted(name for _, name in socket.if_nameindex())
        if interface not in names:
            raise LookupError(f"no network interface {interface!r} (this host has {', '.join(names) or 'none'})")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address (Linux)
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface.encode()[:15]))
            except OSError as exc:
                raise LookupError(f"interface {interface!r} has no IPv4 address ({exc.strerror})") from None
        return socket.inet_ntoa(packed[20:24])
    fields = environ.get("SSH_CONNECTION", "").split()
    if len(fields) != 4:
        raise LookupError("SSH_CONNECTION is not set, so the address ssh reached this host at is unknown; "
                          "pass --interface")
    return fields[2]


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


# --- the processes ---------------------------------------------------------------------------------------------

def remote_hosts(placements: Sequence[Placement]) -> list[str]:
    """The hosts that run servers or workers, in placement order, each once."""
    return list(dict.fromkeys(p.host for p in placements if p.role != "coordinator"))


def ssh_processes(spec: JobSpec, placements: Sequence[Placement], script: Sequence[str], coordinator: str,
                  remote: Remote, ssh: SshOptions, base_env: Mapping[str, str] | None = None) -> list[ProcSpec]:
    """One ssh client per server and worker of ``placements`` (servers first), each labelled ``role rank@host``."""
    launcher_env = local_env(dict(base_env) if base_env is not None else None)
    per_host: dict[str, int] = {}
    for p in placements:
        if p.role != "coordinator":
            per_host[p.host] = per_host.get(p.host, 0) + 1
    procs = []
    for p in placements:
        if p.role == "coordinator":
            continue
        env = spec.role_env(p.role, p.rank, coordinator)
        del env["ZPS_HOST"]  # the guard sets it on the host (see host_address)
        env["ZPS_LOCAL_RANK"] = str(p.local_rank)
        label = f"{p.role} {p.rank}@{ssh_destination(p.host)}"
        role_argv = [remote.python, "-m", "zps.ps"] if p.role == "server" else [remote.python, "-u", *script]
        guarded = remote.guarded(label, role_argv, share=per_host[p.host])
        command = remote.command(guarded, {"PYTHONUNBUFFERED": "1", **env})
        procs.append(ProcSpec(label, p.role, ssh.argv(p.host, command), launcher_env))
    return procs


def describe(spec: JobSpec, placements: Sequence[Placement], script: Sequence[str], coordinator_host: str,
             remote: Remote, ssh: SshOptions) -> str:
    """What ``zps launch --dry-run`` prints: the placement table and the exact command of every process."""
    port = str(spec.port) if spec.port else "PORT"
    shown = [replace(p, host=f"{coordinator_host} (in zps launch)") if p.role == "coordinator" else p
             for p in placements]
    lines = [f"zps launch: {spec.num_servers} servers, {spec.num_workers} workers on "
             f"{len(remote_hosts(placements))} hosts; coordinator at {coordinator_host}:{port}", "",
             format_placement(shown), ""]
    if not spec.port:
        lines += ["PORT: the coordinator binds a free port when the job starts (fix it with --port)", ""]
    for proc in ssh_processes(spec, placements, script, f"{coordinator_host}:{port}", remote, ssh, {}):
        lines.append(f"[{proc.label}] {shlex.join(proc.argv)}")
    return "\n".join(lines)


def run_ssh(spec: JobSpec, hosts: Sequence[Host], script: Sequence[str], remote: Remote, ssh: SshOptions,
            dry_run: bool = False, preflight: bool = True, preflight_timeout: float = 15.0,
            out: IO[str] | None = None) -> int:
    """Place the job on ``hosts``, check them, start every process over ssh; return the job's exit code.

    Returns 2 without starting anything when the job does not fit or the preflight finds a problem.
    """
    from . import preflight as checks

    out = out or sys.stdout
    check_env(spec, remote.env)
    placements = place(hosts, spec.num_servers, spec.num_workers)
    targets = remote_hosts(placements)
    try:
        coordinator_host: str | None = coordinator_address(remote.interface, targets[0])
        local_problems = []
    except LaunchError as exc:
        if dry_run or not preflight:
            raise
        # report it with whatever the hosts have to say, in one table
        coordinator_host, local_problems = None, [checks.Problem(checks.LAUNCHER, "interface", str(exc))]
    if dry_run:
        out.write(describe(spec, placements, script, coordinator_host, remote, ssh) + "\n")
        return 0
    if preflight:
        problems = local_problems + checks.run_preflight(targets, ssh, remote, coordinator_host, spec.port,
                                                         script[0], timeout=preflight_timeout)
        if problems:
            out.write(checks.format_problems(problems) + "\n")
            out.flush()
            return 2
    assert coordinator_host is not None
    spec = replace(spec, host=coordinator_host)
    return run_job(spec, lambda coordinator: ssh_processes(spec, placements, script, coordinator, remote, ssh), out)


# --- the guard (runs on the remote host) -----------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _pdeathsig(sig: int) -> None:
    """Ask the kernel for ``sig`` when this process's parent exits (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except OSError:
            pass


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def guard(label: str, argv: Sequence[str], interface: str | None = None, share: int = 1,
          grace: float = GUARD_GRACE) -> int:
    """Run ``argv`` as the role ``label`` until it exits or the ssh session ends; return its exit code.

    ``share`` processes of the job run on this host: unless set, ``OMP_NUM_THREADS`` is cores // share, so they
    share the cores instead of oversubscribing them (as the local backend does).
    """
    parent = os.getppid()
    _pdeathsig(signal.SIGTERM)
    stopping = threading.Event()

    def stop(signum: int, frame: object = None) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)
    if parent == 1 or os.getppid() != parent or stopping.is_set():
        return 128 + signal.SIGHUP  # the session ended before the role could start
    try:
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, share))), **os.environ,
               "ZPS_HOST": host_address(interface, os.environ)}
    except LookupError as exc:
        print(f"zps: {label} on {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
        return 2
    child = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=lambda: _pdeathsig(signal.SIGKILL))

    def end_child() -> None:
        stopping.wait()
        _kill_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(child.pid, signal.SIGKILL)

    threading.Thread(target=end_child, name="zps-guard", daemon=True).start()
    code = child.wait()
    _kill_group(child.pid, signal.SIGKILL)  # what the role left behind in its group (data loader workers)
    if code < 0:
        if not stopping.is_set():  # (when we stopped it, nobody is listening any more)
            print(f"zps: {label} (pid {child.pid} on {socket.gethostname()}) was killed by "
                  f"{signal.Signals(-code).name}", file=sys.stderr, flush=True)
        return 128 - code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zps.launcher.ssh",
                                     description="the remote half of zps launch (see launcher/ssh.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("guard", help="run one role; end it when the ssh session ends")
    g.add_argument("--label", required=True, help="the role's name in messages, e.g. 'worker 1@node2'")
    g.add_argument("--interface", default=None, help="bind the role to this interface's IPv4 address")
    g.add_argument("--share", type=int, default=1, help="processes of the job on this host (for OMP_NUM_THREADS)")
    g.add_argument("role", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    role = args.role[1:] if args.role[:1] == ["--"] else args.role
    if not role:
        parser.error("guard: no command after --")
    return guard(args.label, role, args.interface, args.share)


if __name__ == "__main__":
    sys.exit(main())
