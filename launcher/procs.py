"""Child processes of a job: started in their own sessions, output prefixed by role and rank, torn down as a unit.

A child is a plain process (``subprocess.Popen``) or, where its :class:`~.backend.ProcSpec` names a
:class:`~.zygote_client.Zygote`, forked by that fork server;
where the zygote cannot start it, it falls back to a plain process (saying so once). Where the spec names a
:class:`~.backend.Starter`, that starts the role elsewhere (a Ray actor) and signals it there. Teardown is SIGTERM
to each child's process group, a bounded wait, then SIGKILL. On Linux each child also gets PR_SET_PDEATHSIG, so it dies
even when the launcher itself is SIGKILLed (a forked child: when the zygote dies, which dies with the launcher).
"""
from __future__ import annotations

import codecs
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from zps.process import die_with_parent, kill_group

from .backend import Proc, ProcSpec
from .zygote_client import Zygote, ZygoteError

log = logging.getLogger("zps.launcher")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGKILL)


class LineForwarder:
    """Copies a child's byte stream to ``out`` line by line with a prefix.

    Decodes incrementally (a UTF-8 character split across reads survives; invalid bytes become U+FFFD), treats
    ``\\r`` as a line end too (progress bars), and writes the last line even without a newline.
    """

    def __init__(self, prefix: str, out: IO[str], lock: threading.Lock, tail: list[str] | None = None) -> None:
        self.prefix, self.out, self.lock = prefix, out, lock
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.tail = tail  # the last lines, kept for error reports

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.partial + self.decoder.decode(data, final=final)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.partial = "" if final else lines.pop()
        if final and lines and lines[-1] == "":
            lines.pop()
        if not lines:
            return
        with self.lock:
            for line in lines:
                self.out.write(f"{self.prefix}{line}\n")
                if self.tail is not None:
                    self.tail.append(line)
                    del self.tail[:-20]
            self.out.flush()

    def pump(self, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                self.feed(b"", final=True)
                return
            self.feed(data)


@dataclass
class Child:
    """A started process and what it was started from (``spec``: to start it again)."""

    spec: ProcSpec
    proc: Proc
    tail: list[str] = field(default_factory=list)
    exited_at: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    # sends a signal to its process group: this host's (kill_group), or wherever its Starter runs it
    signal_group: Callable[[int], None] | None = None

    def signal(self, sig: int) -> None:
        if self.signal_group is not None:
            self.signal_group(sig)
        else:  # start_new_session: its pid is its process group's id
            kill_group(self.proc.pid, sig)

    @property
    def label(self) -> str:  # e.g. "worker 1"
        return self.spec.label

    @property
    def role(self) -> str:  # server | worker
        return self.spec.role

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


class ProcessGroup:
    """Starts children and ends them together. ``changed`` is set whenever a child exits."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.children: list[Child] = []
        self.changed = threading.Event()
        self.zygotes: list[Zygote] = []  # the fork servers children were started from, closed with the group

    def start(self, spec: ProcSpec, env: dict[str, str] | None = None, stdin: bytes | None = None) -> Child:
        """Start ``spec`` (forked by its zygote where it names one that is able), with ``env`` for its environment
        where given. ``stdin``, where given, is written to its standard input (a plain process's), which is then
        closed."""
        env = spec.env if env is None else env
        if spec.starter is not None:
            started = spec.starter.start(spec, env)
            return self._watch(Child(spec, started, signal_group=started.signal_group))
        proc = self._fork(spec, env) if spec.zygote is not None and stdin is None else None
        if proc is None:
            proc = subprocess.Popen(
                spec.argv,
                env=env,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            if stdin is not None:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(stdin)
                    proc.stdin.close()
                except BrokenPipeError:  # it exited at once; its exit code says why
                    pass
        return self._watch(Child(spec, proc))

    def _watch(self, child: Child) -> Child:
        """Forward ``child``'s output and note its exit (``changed``)."""
        spec, proc = child.spec, child.proc
        forwarder = LineForwarder(f"[{spec.label}] ", self.out, self.lock, child.tail)
        assert proc.stdout is not None
        reader = threading.Thread(target=forwarder.pump, args=(proc.stdout,), name=f"out-{spec.label}", daemon=True)
        waiter = threading.Thread(target=self._wait, args=(child,), name=f"wait-{spec.label}", daemon=True)
        child.threads = [reader, waiter]
        reader.start()
        waiter.start()
        self.children.append(child)
        return child

    def _fork(self, spec: ProcSpec, env: dict[str, str]) -> Proc | None:
        """``spec``'s role forked by its zygote; None where it cannot (then the caller starts a plain process)."""
        zygote = spec.zygote
        if zygote is None or zygote.failure is not None:
            return None
        if zygote not in self.zygotes:
            self.zygotes.append(zygote)
        try:
            return zygote.spawn(spec.role, spec.script, env)
        except ZygoteError as exc:
            if zygote.failure is None:  # it refused this one
                self.say(f"{spec.label}: the zygote cannot fork it ({exc}); starting it as a plain process")
            elif not zygote.said:
                zygote.said = True
                self.say(f"the zygote (--preload) failed: {exc}; starting processes without it")
            return None

    def _wait(self, child: Child) -> None:
        code = child.proc.wait()
        child.exited_at = time.monotonic()
        log.debug("%s exited with code %d", child.label, code)
        self.changed.set()

    def say(self, text: str) -> None:
        with self.lock:
            self.out.write(f"[zps] {text}\n")
            self.out.flush()

    def running(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is None]

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM every child's process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
        for child in self.running():
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            # the group may hold grandchildren (data loader workers) even when the child itself has exited
            child.signal(signal.SIGKILL)
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for zygote in self.zygotes:
            zygote.close()
        for child in self.children:
            for thread in child.threads:
                thread.join(timeout=2)


def install_signal_handlers(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGINT/SIGTERM/SIGHUP to ``on_signal``; return a function that restores the old handlers."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, lambda signum, frame: on_signal(signum))

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
