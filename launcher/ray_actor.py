"""The half of ``zps ray`` that runs on the nodes of a Ray cluster: one :class:`RoleHost` actor per server and worker.

:mod:`.ray_backend` makes the class an actor (``ray.remote(RoleHost)``) and places each one on its bundle of the
job's placement group. Ray pickles the class by reference, so a node needs zps installed (and Ray), nothing else:
the training script comes in the job's runtime environment (``working_dir``), the actor's current directory.

:meth:`RoleHost.run` starts the role as every backend does, ``zps node [SCRIPT ARGS...]`` with the role's ``ZPS_*``
variables laid over the node's environment and ``ZPS_HOST`` set to this node's address, in its own process group.
It is a generator, and Ray streams what it yields to the launcher in order:

* ``("started", PID, HOST)`` -- the role's pid and the node's address, once it runs;
* ``("out", BYTES)`` -- its output (stdout and stderr), as it comes;
* ``("exit", CODE)`` -- its exit code (``-N``: signal N ended it), last.

The role dies with the actor: it asks for ``PR_SET_PDEATHSIG`` before it execs (the thread that started it waits
for it: the signal follows that thread), so an actor that Ray kills, or that dies with its node, takes its role
with it.
:meth:`RoleHost.signal` (the actor runs two calls at once) signals the role's process group.

The role's keys (``--secure``) are in ``env``, an argument of the call: never on a command line, nor in the
runtime environment the Ray dashboard shows.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence

from zps.process import kill_group
from zps.protocol.variables import ZPS_HOST

from .backend import role_command

# the most output bytes one message to the launcher carries
CHUNK = 1 << 16


# Starts the role (argv[2:]) once the kernel will kill it when the actor dies, unless the actor (pid argv[1]) is
# gone already. A separate program rather than a preexec_fn: the actor's process has many threads, and only exec
# is safe between fork and exec there.
_TRAMPOLINE = ("import os, sys; from zps.process import die_with_parent; die_with_parent(9); "
               "os.getppid() == int(sys.argv[1]) or sys.exit(137); os.execv(sys.argv[2], sys.argv[2:])")


class RoleHost:
    """Runs one role of a zps job inside a Ray actor (see the module docstring)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stopped: int | None = None  # a signal that came before the role started: it is not started

    def run(self, script: Sequence[str], env: Mapping[str, str]) -> Iterator[tuple[object, ...]]:
        import ray

        host = ray.util.get_node_ip_address()
        if self.stopped is not None:
            yield ("exit", -self.stopped)
            return
        argv = [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *role_command(sys.executable, script)]
        self.proc = subprocess.Popen(argv, env={**os.environ, **env, ZPS_HOST: host}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        yield ("started", self.proc.pid, host)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            yield ("out", data)
        code = self.proc.wait()
        kill_group(self.proc.pid, signal.SIGKILL)  # what the role left in its group (data loader workers)
        yield ("exit", code)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the role's process group; a role not started yet never starts."""
        if self.proc is None:
            self.stopped = sig
        elif self.proc.poll() is None:
            kill_group(self.proc.pid, sig)
