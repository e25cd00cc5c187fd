"""The launcher's side of the zygote (:mod:`zps.launcher.zygote`, the fork server of ``zps run --preload``).

:class:`Zygote` starts the zygote program at the first :meth:`~Zygote.spawn`, asks it to fork each server and worker
of one job attempt (the request format is in :mod:`zps.launcher.zygote`'s docstring) and ends it with
:meth:`~Zygote.close`; each forked role is a :class:`ZygoteChild`, the part of :class:`subprocess.Popen` the process
group uses. Standard library only: the launcher never imports torch.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from zps.process import die_with_parent

from .zygote import CLOSE_TIMEOUT, MAX_MESSAGE, REPLY_TIMEOUT, START_TIMEOUT, ZYGOTE_MODULE

log = logging.getLogger("zps.launcher")


class ZygoteError(RuntimeError):
    """The zygote could not start a child; :attr:`Zygote.failure` says whether it can start any more."""


class ZygoteChild:
    """A child the zygote forked, with the part of :class:`subprocess.Popen` the launcher uses."""

    def __init__(self, pid: int, stdout: IO[bytes], args: Sequence[str]) -> None:
        self.pid, self.stdout, self.args = pid, stdout, list(args)
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def _die_with_launcher() -> None:  # runs in the zygote between fork and exec
    die_with_parent(signal.SIGKILL)


class Zygote:
    """The launcher's side of one zygote: started at the first :meth:`spawn`, ended by :meth:`close`.

    ``env`` is the zygote's own environment (the children's, less their ``ZPS_*`` variables), ``cwd`` its directory.
    """

    def __init__(self, env: Mapping[str, str], cwd: str | None = None, python: str = sys.executable,
                 command: Sequence[str] | None = None, timeout: float = START_TIMEOUT) -> None:
        self.env, self.cwd, self.python, self.timeout = dict(env), cwd, python, timeout
        self.command = list(command) if command else [python, "-u", "-m", ZYGOTE_MODULE]
        self.failure: str | None = None  # why it cannot start children any more
        self.said = False  # whether the launcher said so already
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._spawning = threading.Lock()  # one request in flight
        self._cond = threading.Condition()  # guards what follows; notified on every reply
        self._ready = False
        self._replies: dict[int, dict[str, Any]] = {}
        self._children: dict[int, ZygoteChild] = {}
        self._early_exits: dict[int, int] = {}  # exits read before the spawner registered the child
        self._next_id = 0
        self._closed = False
        self._started = 0.0

    def _fail(self, why: str) -> ZygoteError:
        with self._cond:
            if self.failure is None and not self._closed:
                self.failure = why
            self._cond.notify_all()
        return ZygoteError(why)

    def _start(self) -> None:
        if self._proc is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [*self.command, str(theirs.fileno())], env=self.env, cwd=self.cwd, pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_launcher if sys.platform.startswith("linux") else None)
        except OSError as exc:
            ours.close()
            raise self._fail(f"cannot start it: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(self.timeout)  # a request waits at most this long for room in the socket's buffer
        self.pid, self._sock, self._started = self._proc.pid, ours, time.monotonic()
        self._reader = threading.Thread(target=self._read, name="zps-zygote", daemon=True)
        self._reader.start()

    def spawn(self, role: str, script: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> ZygoteChild:
        """Fork the role ``role`` (a worker running ``script``), as ``zps node SCRIPT...`` with environment ``env``
        would run it, in ``cwd``; its output on the child's ``stdout`` pipe.

        ZygoteError when the zygote refuses the request (then :attr:`failure` is None) or cannot start children
        at all (then :attr:`failure` says why)."""
        with self._spawning:
            if self.failure is not None or self._closed:
                raise ZygoteError(self.failure or "closed")
            self._start()
            assert self._sock is not None
            read_end, write_end = os.pipe()
            try:
                self._next_id += 1
                rid = self._next_id
                header = json.dumps({"id": rid, "role": role, "script": list(script), "env": dict(env),
                                     "cwd": cwd or self.cwd or os.getcwd()}).encode()
                try:
                    socket.send_fds(self._sock, [header], [write_end])
                except OSError as exc:
                    if len(header) > MAX_MESSAGE or exc.errno == errno.EMSGSIZE:  # this request, not the zygote
                        raise ZygoteError(f"the request is too large ({len(header)} bytes)") from None
                    raise self._fail(f"cannot send it a request: {exc}") from None
                finally:
                    os.close(write_end)
                reply = self._reply(rid)
                if "error" in reply:
                    raise ZygoteError(str(reply["error"]))
                pid = reply.get("pid")
                if not isinstance(pid, int):
                    raise self._fail(f"a reply without a pid: {reply!r}")
                child = ZygoteChild(pid, os.fdopen(read_end, "rb"), [role, *script])
            except BaseException:
                os.close(read_end)
                raise
            with self._cond:
                self._children[pid] = child
                if pid in self._early_exits:
                    child._exited(self._early_exits.pop(pid))
            log.debug("zygote %d forked pid %d: %s %s", self.pid, pid, role, " ".join(script))
            return child

    def _reply(self, rid: int) -> dict[str, Any]:
        started = time.monotonic()
        with self._cond:
            while rid not in self._replies:
                if self.failure is not None:
                    raise ZygoteError(self.failure)
                # until it is ready the zygote is importing torch: that may take a while
                limit = REPLY_TIMEOUT if self._ready else self.timeout
                left = started + limit - time.monotonic()
                if left <= 0:
                    raise self._fail(f"no answer within {limit:.0f}s")  # (the condition's lock is re-entrant)
                self._cond.wait(left)
            return self._replies.pop(rid)

    def _read(self) -> None:
        """The reader thread: replies to the spawner, exit codes to the children."""
        assert self._sock is not None and self._proc is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:  # (the socket's timeout is for sending) nothing to read yet
                continue
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            with self._cond:
                if "ready" in message:
                    self._ready = True
                    log.debug("zygote %d ready after %.1fs", self.pid, time.monotonic() - self._started)
                elif isinstance(message.get("id"), int):
                    self._replies[message["id"]] = message
                elif isinstance(message.get("exited"), int) and isinstance(message.get("code"), int):
                    child = self._children.get(message["exited"])
                    if child is not None:
                        child._exited(message["code"])
                    else:
                        self._early_exits[message["exited"]] = message["code"]
                self._cond.notify_all()
        try:
            code: int | None = self._proc.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        with self._cond:
            if not self._closed and self.failure is None:
                self.failure = f"it exited (code {code})" if code is not None else "it closed its socket"
            for child in self._children.values():  # the kernel killed them with the zygote (PR_SET_PDEATHSIG)
                child._exited(-signal.SIGKILL)
            self._cond.notify_all()

    def close(self) -> None:
        """End the zygote: it kills the children it still has, reports them and exits (bounded waits)."""
        with self._cond:
            self._closed = True
        if self._proc is None or self._sock is None:
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(CLOSE_TIMEOUT)
        try:
            self._proc.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            try:
                self._proc.wait(timeout=CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self._sock.close()
