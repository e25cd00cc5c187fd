"""The remote half of ``zps launch``: code that runs on each host, standard library only
(and :mod:`zps.process`, which is too).

* :func:`host_address` -- the address a host's zps processes bind (also shipped, as source, in the preflight
  probe, so it runs whatever zps a host has, or none).
* :func:`guard` (``python -m zps.launcher.remote guard``) -- runs one role for the ssh backend. It sets
  ``ZPS_HOST`` (the IPv4 address of ``--interface`` there, else the address ssh reached the host at, from
  ``SSH_CONNECTION``), starts the role in its own process group and ends that group (SIGTERM, then SIGKILL
  after a grace period)

  - when the ssh session goes away -- the launcher's teardown, Ctrl-C, a crash, a lost network: sshd starts the
    remote command without a terminal and does not signal it when the client disconnects, so the guard asks the
    kernel for a signal when its parent, the sshd session process, exits (``PR_SET_PDEATHSIG``);
  - when the guard itself is told to stop (SIGTERM, SIGHUP, SIGINT).

  With ``--secrets-stdin`` (``zps launch --secure``) the guard reads the role's keys, one line, from its standard
  input -- what ssh forwards from the launcher -- and hands them on in the role's environment (``ZPS_SECRETS``),
  so they never appear on a command line.

  The guard exits with the role's exit code (``128 + N`` when signal N killed it, saying so), which ssh passes
  back, so the launcher's first-failure rule and exit code work as for local processes.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from zps.process import die_with_parent, kill_group

# seconds the guard gives a role between SIGTERM and SIGKILL
GUARD_GRACE = 3.0


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


# the most bytes of keys the guard reads from its standard input (a job's keys are a few KiB per 100 processes)
MAX_SECRETS_LINE = 8 << 20


def guard(label: str, argv: Sequence[str], interface: str | None = None, share: int = 1,
          grace: float = GUARD_GRACE, secrets_stdin: bool = False) -> int:
    """Run ``argv`` as the role ``label`` until it exits or the ssh session ends; return its exit code.

    ``share`` processes of the job run on this host: unless set, ``OMP_NUM_THREADS`` is cores // share, so they
    share the cores instead of oversubscribing them (as the local backend does).
    """
    parent = os.getppid()
    die_with_parent(signal.SIGTERM)
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
        if secrets_stdin:
            line = sys.stdin.buffer.readline(MAX_SECRETS_LINE).strip()
            if not line.startswith(b"{"):
                raise LookupError("--secrets-stdin: no keys arrived on standard input")
            env["ZPS_SECRETS"] = line.decode("utf-8", "replace")
    except LookupError as exc:
        print(f"zps: {label} on {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
        return 2
    child = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=lambda: die_with_parent(signal.SIGKILL))

    def end_child() -> None:
        stopping.wait()
        kill_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        kill_group(child.pid, signal.SIGKILL)

    threading.Thread(target=end_child, name="zps-guard", daemon=True).start()
    code = child.wait()
    kill_group(child.pid, signal.SIGKILL)  # what the role left behind in its group (data loader workers)
    if code < 0:
        if not stopping.is_set():  # (when we stopped it, nobody is listening any more)
            print(f"zps: {label} (pid {child.pid} on {socket.gethostname()}) was killed by "
                  f"{signal.Signals(-code).name}", file=sys.stderr, flush=True)
        return 128 - code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zps.launcher.remote",
                                     description="the remote half of zps launch (see zps/launcher/remote.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("guard", help="run one role; end it when the ssh session ends")
    g.add_argument("--label", required=True, help="the role's name in messages, e.g. 'worker 1@node2'")
    g.add_argument("--interface", default=None, help="bind the role to this interface's IPv4 address")
    g.add_argument("--share", type=int, default=1, help="processes of the job on this host (for OMP_NUM_THREADS)")
    g.add_argument("--secrets-stdin", action="store_true", help="read the role's keys from standard input")
    g.add_argument("role", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    role = args.role[1:] if args.role[:1] == ["--"] else args.role
    if not role:
        parser.error("guard: no command after --")
    return guard(args.label, role, args.interface, args.share, secrets_stdin=args.secrets_stdin)


if __name__ == "__main__":
    sys.exit(main())
