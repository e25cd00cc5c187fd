"""Running a command on a host with the system OpenSSH client: the ssh options and the remote command line.

Shared by the ssh backend (:mod:`zps.launcher.ssh`) and its preflight (:mod:`zps.launcher.preflight`).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .backend import LaunchError

DEFAULT_CONNECT_TIMEOUT = 10.0


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

    def guarded(self, label: str, argv: Sequence[str], share: int = 1, secrets_stdin: bool = False) -> list[str]:
        """``argv`` wrapped in the guard (see :mod:`zps.launcher.remote`); ``share``: the job's processes on the
        host; ``secrets_stdin``: the guard reads the role's keys from its standard input (``--secure``)."""
        guard = [self.python, "-m", "zps.launcher.remote", "guard", "--label", label, "--share", str(share)]
        if secrets_stdin:
            guard.append("--secrets-stdin")
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
