"""The local backend's fork server (a "zygote"): one process imports torch and zps once, then forks every server
and worker of a job attempt, so that none of them pays for those imports again.

``python -u -m zps.launcher.zygote FD`` imports torch, numpy, zmq, msgpack and zps's server, worker and node modules
(and ``torch._dynamo``, which torch imports at the first optimizer step, before it forks the first worker) --
imports only: no torch computation, no ZeroMQ context, no CUDA, nothing that does not survive a fork -- then
serves spawn requests on the Unix socket
``FD`` (SOCK_SEQPACKET: one message per request or reply, each a JSON object; file descriptors as SCM_RIGHTS):

* launcher -> zygote: ``{"id": N, "role": "server" | "worker", "script": [SCRIPT, ARGS...], "env": {...},
  "cwd": DIR}`` with one descriptor, the write end of the pipe the child's output goes to;
* zygote -> launcher: ``{"ready": PID}`` once the imports are done; ``{"id": N, "pid": PID}`` or
  ``{"id": N, "error": TEXT}`` (a malformed request: the zygote goes on serving); ``{"exited": PID, "code": C}``
  when a child ends (C as Popen gives it: the exit code, or -N for signal N).

A child is what ``python -u -m zps.launcher.cli node SCRIPT...`` would be, minus the imports: its own session,
SIGKILL when the zygote dies (PR_SET_PDEATHSIG), the pipe on fds 1 and 2, the given environment and directory, the
signal dispositions of a fresh interpreter; it runs :func:`zps.launcher.node.main_node` (the role its environment
names), then the exit handlers, and ends with the code Python would have exited with (``os._exit``: it never
returns into the zygote's loop). A request whose environment differs from the zygote's in what is read only at
start-up (``PYTHON*``, ``LD_*``, ``OMP_*``, ...) is refused, so the launcher starts that child as a plain process.

The zygote dies with the launcher (PR_SET_PDEATHSIG) and its children with it; when the launcher closes the socket
it kills what is left, reports it and exits. The launcher's side is :mod:`zps.launcher.zygote_client`.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from zps.process import die_with_parent, set_process_name

# how the launcher starts this program: python -u -m ZYGOTE_MODULE FD
ZYGOTE_MODULE = "zps.launcher.zygote"
# seconds the zygote may take to import everything and answer the first request (a loaded machine is slow)
START_TIMEOUT = 300.0
# seconds a later request may take to be answered (a fork takes milliseconds)
REPLY_TIMEOUT = 30.0
# seconds the zygote may take to end its children and exit once the launcher closed the socket
CLOSE_TIMEOUT = 10.0
# the largest request (an environment; a SOCK_SEQPACKET message must fit the socket's buffer anyway)
MAX_MESSAGE = 1 << 20
# the roles it forks
ROLES = ("server", "worker")
# variables a process reads only while it starts (the interpreter, the loader, OpenMP, MKL, OpenBLAS, torch's
# import): a child whose values differ from the zygote's would not be what a fresh process is, so it is refused
STARTUP_PREFIXES = ("PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "TORCH", "PYTORCH_")
# what the zygote imports before it forks anything
PRELOAD = ("numpy", "torch", "zmq", "msgpack", "zps.ps.server", "zps.worker", "zps.launcher.node")
# what it imports before it forks the first worker: servers come first and serve sooner without waiting for it
# (each imports it beside its loop, see zps.ps.server); the workers' optimizers need it at once
WORKER_PRELOAD = ("torch._dynamo",)
# what a fresh `python -m zps.launcher.cli` has as sys.argv[0]
_CLI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli.py")


def startup_mismatch(env: Mapping[str, str], own: Mapping[str, str]) -> list[str]:
    """The start-up variables (:data:`STARTUP_PREFIXES`) whose values differ between ``env`` and ``own``."""
    names = {k for k in (*env, *own) if k.startswith(STARTUP_PREFIXES)}
    return sorted(k for k in names if env.get(k) != own.get(k))


class _Refused(Exception):
    def __init__(self, rid: int | None, why: str) -> None:
        super().__init__(why)
        self.rid = rid


def _text_list(value: Any, what: str, rid: int | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise _Refused(rid, f"{what} must be a list of strings without NUL")
    return value


def _parse(data: bytes, fds: list[int], flags: int, own_env: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """A spawn request's id and fields, or :class:`_Refused` naming what is wrong with it."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise _Refused(None, f"the request is larger than {MAX_MESSAGE} bytes or carries too many descriptors")
    try:
        request = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _Refused(None, f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _Refused(None, "the request is not a JSON object")
    rid = request.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise _Refused(None, "the request has no integer id")
    role = request.get("role")
    if role not in ROLES:
        raise _Refused(rid, f"role must be one of {', '.join(ROLES)}")
    script = _text_list(request.get("script"), "script", rid)
    env = request.get("env")
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()):
        raise _Refused(rid, "env must map names (no '=', no NUL) to strings (no NUL)")
    cwd = request.get("cwd")
    if not isinstance(cwd, str) or "\0" in cwd or not os.path.isdir(cwd):
        raise _Refused(rid, f"cwd {cwd!r} is not a directory")
    if len(fds) != 1:
        raise _Refused(rid, f"a request carries one descriptor (the output pipe), this one {len(fds)}")
    differ = startup_mismatch(env, own_env)
    if differ:
        raise _Refused(rid, f"{', '.join(differ)} differ from the zygote's (read only when a process starts)")
    return rid, {"role": role, "script": script, "env": env, "cwd": cwd}


class _Server:
    """The zygote's loop: requests from the launcher, forks, exit codes back. Single-threaded, so forking is safe."""

    def __init__(self, sock: socket.socket, dispositions: dict[int, Any], own_env: dict[str, str],
                 set_by_imports: dict[str, str]) -> None:
        self.sock, self.dispositions, self.own_env = sock, dispositions, own_env
        self.set_by_imports = set_by_imports  # variables the preload set (a child's own imports would set them)
        self.children: set[int] = set()
        self.workers_preloaded = False
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe()  # SIGCHLD wakes the loop through this pipe
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        self.sock.settimeout(REPLY_TIMEOUT)  # a launcher that stops reading for this long is gone

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def serve(self) -> int:
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLRDHUP)
        poller.register(self.wake_r, select.POLLIN)
        try:
            self.send({"ready": self.pid})
            while True:
                events = dict(poller.poll(1000))  # a timeout, to reap even if a wake-up were lost
                self._drain_wakeups()
                for pid, code in self._reap():
                    self.send({"exited": pid, "code": code})
                if self.sock.fileno() in events and not self._request(events[self.sock.fileno()]):
                    return 0
        except OSError as exc:  # the launcher is gone or stopped reading
            print(f"zps zygote: {exc}; ending", file=sys.stderr, flush=True)
            return 1
        finally:
            self._end()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> list[tuple[int, int]]:
        """The children that exited, with their codes as Popen gives them."""
        exits = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            if pid in self.children:
                self.children.discard(pid)
                exits.append((pid, os.waitstatus_to_exitcode(status)))
        return exits

    def _end(self) -> None:
        """Kill the children the launcher left running and report them (bounded: the kernel does the killing)."""
        for pid in self.children:
            for kill in (os.killpg, os.kill):  # its group, and itself should it not have left ours yet
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + CLOSE_TIMEOUT / 2
        while self.children and time.monotonic() < deadline:
            for pid, code in self._reap():
                try:
                    self.send({"exited": pid, "code": code})
                except OSError:
                    pass
            if self.children:
                select.select([self.wake_r], [], [], 0.05)  # SIGCHLD writes to it
                self._drain_wakeups()

    def _request(self, events: int) -> bool:
        """Serve one message; False once the launcher closed its end."""
        data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
        if not data and not fds and events & (select.POLLHUP | select.POLLRDHUP):
            return False
        rid = None
        try:
            rid, request = _parse(data, fds, flags, self.own_env)
            out = fds[0]
            fds = []
            try:
                pid = self._fork(request, out)
            finally:
                os.close(out)
            self.send({"id": rid, "pid": pid})
        except _Refused as exc:
            self.send({"id": exc.rid, "error": str(exc)})
        except Exception as exc:  # whatever else went wrong with this request (a fork): say so, serve the next one
            self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _fork(self, request: dict[str, Any], out: int) -> int:
        if request["role"] == "worker" and not self.workers_preloaded:
            before = dict(os.environ)
            preload(WORKER_PRELOAD)
            self.workers_preloaded = True
            self.set_by_imports.update({k: v for k, v in os.environ.items() if before.get(k) != v})
            gc.freeze()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            self._child(request, out)
        self.children.add(pid)
        return pid

    def _child(self, request: dict[str, Any], out: int) -> NoReturn:
        """In the forked child: become the process ``python -u -m zps.launcher.cli node SCRIPT...`` would be, run
        its role, exit."""
        try:
            signal.set_wakeup_fd(-1)
            for sig, handler in self.dispositions.items():  # a fresh interpreter's (SIGCHLD is the zygote's)
                if signal.getsignal(sig) is not handler:
                    signal.signal(sig, handler)
            self.sock.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.setsid()
            set_process_name(os.path.basename(sys.executable))  # a fresh one's name, until its role names it
            die_with_parent(signal.SIGKILL)
            if os.getppid() != self.pid:  # the zygote died before the kernel could be asked
                os._exit(128 + signal.SIGKILL)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            os.environ.clear()
            os.environ.update(request["env"])
            for name, value in self.set_by_imports.items():  # as its own imports would (torch: the inductor cache)
                os.environ.setdefault(name, value)
            os.chdir(request["cwd"])
            _fresh_state()
            from . import node

            script = request["script"]
            sys.argv = [_CLI_PATH, "node", *script]
        except BaseException:
            traceback.print_exc()
            _exit(1)
        _exit(_run(lambda: node.main_node(script)))


def _fresh_state() -> None:
    """What differs between a forked child and a fresh process, where it can be undone: torch's CPU generator and
    numpy's global random state were seeded once, in the zygote, so every child would draw the same numbers (a fresh
    process seeds both from the OS; Python's ``random`` reseeds itself after a fork). The hash seed cannot be redone:
    the children share the zygote's."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None:
        numpy.random.seed()
    if torch is not None:
        torch.default_generator.seed()  # the CPU generator only: CUDA's are seeded when CUDA starts, as in any process


def _run(main: Callable[[], int]) -> int:
    """``main()`` as the interpreter runs a program: its exit code as Python computes it, an uncaught exception
    printed by ``sys.excepthook`` (exit 1), then the non-daemon threads joined and the exit handlers run."""
    interrupted = False
    try:
        code = _exit_code(main())
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code, interrupted = 1, True
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx does first
    if shutdown is not None:
        try:
            shutdown()
        except BaseException:
            traceback.print_exc()
    atexit._run_exitfuncs()
    if interrupted:  # Python ends an interrupted program with SIGINT itself, so its parent sees -SIGINT
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def preload(names: Sequence[str] = PRELOAD) -> None:
    """Import what the roles import (:data:`PRELOAD`, :data:`WORKER_PRELOAD`), and nothing more: no computation, no
    context, no CUDA."""
    import importlib

    for name in names:
        importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -u -m zps.launcher.zygote FD``: preload, then serve the launcher on the socket ``FD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m zps.launcher.zygote FD (the local backend starts it)", file=sys.stderr)
        return 2
    die_with_parent(signal.SIGKILL)
    set_process_name("zps-zygote")
    dispositions: dict[int, Any] = {}
    for sig in signal.valid_signals():
        handler = signal.getsignal(sig)
        if handler is not None:
            dispositions[sig] = handler
    own_env = dict(os.environ)
    sock = socket.socket(fileno=int(args[0]))
    preload()
    set_by_imports = {k: v for k, v in os.environ.items() if own_env.get(k) != v}
    gc.freeze()  # what the imports made stays put: the collector never writes to the children's shared pages
    # nothing to finalize: tearing torch down would only keep the launcher waiting
    _exit(_Server(sock, dispositions, own_env, set_by_imports).serve())


if __name__ == "__main__":
    sys.exit(main())
