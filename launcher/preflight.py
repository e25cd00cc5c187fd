"""Checks ``zps launch`` makes on every host before it starts anything, in parallel, each bounded in time.

On the launcher host:

* ``interface`` -- ``--interface`` exists here and has an IPv4 address (the coordinator binds it);
* ``port`` -- a fixed coordinator port (``--port``) is free on that address.

On each host, over one ``ssh HOST -- env ... PYTHON -c PROBE`` (the probe is :func:`probe`, shipped as source so
it runs whatever zps the host has, or none):

* ``ssh`` -- the host resolves and answers without a prompt (``BatchMode=yes``, ``ConnectTimeout``);
* ``python`` -- ``--python`` runs there, with the launcher's Python major.minor version;
* ``zps`` -- that Python has zps installed, the launcher's version (``--env`` applies, as for the job);
* ``workdir`` / ``script`` -- ``--workdir`` exists there and holds the script;
* ``interface`` / ``address`` -- the address the host's processes will bind (``--interface``'s IPv4 address, or
  the address ssh reached the host at) exists there: the probe binds it;
* ``checkpoint`` -- with ``--checkpoint-dir``, the host can write there (every process writes its part of each
  checkpoint there, so across hosts it must be a file system they share);
* ``reach`` -- the host can open a TCP connection to the coordinator's address: during the preflight the
  launcher listens there (on the fixed port if one is given, so a firewall rule for it is tested too).

What is *not* checked: that the hosts reach each other's server ports (servers pick free ports when they
start); a firewall between hosts shows up as a registration or push timeout naming the peer.

Every problem found is reported in one table, by host and check; nothing starts while there is one.
"""
from __future__ import annotations

import errno
import inspect
import json
import socket
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .remote import host_address
from .ssh_command import Remote, SshOptions

LAUNCHER = "launcher"
_MARK = "ZPS_PROBE "


@dataclass(frozen=True)
class Problem:
    host: str  # a host name, or "launcher" for the launcher host
    check: str  # ssh | python | zps | workdir | script | interface | address | reach | port
    detail: str


def format_problems(problems: Sequence[Problem]) -> str:
    """The table ``zps launch`` prints when the preflight fails."""
    rows = [("host", "check", "problem")] + [(p.host, p.check, p.detail) for p in problems]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    lines = [f"zps launch: the preflight found {count}; nothing was started (--skip-preflight skips it)"]
    lines += [f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in rows]
    return "\n".join(lines)


# --- the probe: runs on each host, standard library only -------------------------------------------------------

def probe(args: dict) -> dict:
    """Facts and problems of this host for the preflight, as JSON-able values.

    ``args``: ``workdir``, ``script``, ``interface`` (or None), ``address`` (check the bind address: bool),
    ``coordinator`` ([host, port] to connect to, or None), ``connect_timeout``.
    """
    import os
    import platform
    import socket
    import sys

    out: dict = {"python": platform.python_version(), "executable": sys.executable, "problems": [],
                 "hostname": socket.gethostname(), "address": None}

    def problem(check: str, detail: str) -> None:
        out["problems"].append([check, detail])

    try:
        from importlib.metadata import version
        out["zps"] = version("zps")
    except Exception:  # PackageNotFoundError (a source checkout, or none), or a broken installation
        out["zps"] = None
    workdir = args.get("workdir")
    if workdir:
        try:
            os.chdir(workdir)
        except OSError as exc:
            problem("workdir", f"cannot enter {workdir}: {exc.strerror}")
        else:
            script = args.get("script")
            if script and not os.path.isfile(script):
                problem("script", f"{script} is not a file in {workdir}")
    import importlib.util  # from the workdir, as the roles will (python -m zps.ps, python SCRIPT)

    out["importable"] = all(importlib.util.find_spec(name) is not None
                            for name in ("zps.launcher", "zps.ps", "zps.worker"))
    if args.get("address"):
        interface = args.get("interface")
        try:
            out["address"] = host_address(interface, os.environ)  # noqa: F821 -- shipped with this source
        except LookupError as exc:
            problem("interface" if interface else "address", str(exc))
        else:
            family = socket.AF_INET6 if ":" in out["address"] else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((out["address"], 0))
            except OSError as exc:
                problem("address", f"cannot bind {out['address']} here ({exc.strerror}), so servers could not")
    checkpoints = args.get("checkpoint_dir")
    if checkpoints:  # every host writes its part of each checkpoint there: a shared file system
        try:
            os.makedirs(checkpoints, exist_ok=True)
            probe_file = os.path.join(checkpoints, f".zps-preflight-{socket.gethostname()}-{os.getpid()}")
            with open(probe_file, "w") as f:
                f.write("zps")
            os.remove(probe_file)
        except OSError as exc:
            problem("checkpoint", f"cannot write in --checkpoint-dir {checkpoints} ({exc.strerror or exc}); every "
                                  "host needs it, on a file system they share")
    target = args.get("coordinator")
    if target:
        try:
            socket.create_connection((target[0], int(target[1])), timeout=args.get("connect_timeout", 5)).close()
        except OSError as exc:
            problem("reach", f"cannot open a TCP connection to the coordinator's address {target[0]}:{target[1]} "
                             f"({exc.strerror or exc}); a firewall? choose the network with --interface")
    return out


def probe_source() -> str:
    """The Python program the preflight runs on each host: :func:`probe` and what it calls, and a main."""
    parts = ["from __future__ import annotations\n", inspect.getsource(host_address), inspect.getsource(probe),
             "import json, sys\n"
             f"print({_MARK!r} + json.dumps(probe(json.loads(sys.argv[1]))), flush=True)\n"]
    return "\n".join(parts)


# --- comparing a host with the launcher ------------------------------------------------------------------------

def local_facts() -> dict[str, Any]:
    """The launcher's own Python and zps versions, as the probe reports them."""
    return probe({})


def compare(host: str, python: str, local: dict[str, Any], remote: dict[str, Any]) -> list[Problem]:
    """The problems of one host's probe answer ``remote``, measured against the launcher's ``local`` facts."""
    problems = [Problem(host, check, detail) for check, detail in remote.get("problems", [])]
    mine, theirs = local["python"].split(".")[:2], str(remote.get("python", "?")).split(".")[:2]
    if mine != theirs:
        problems.append(Problem(host, "python", f"{python} is Python {remote.get('python')} there, the launcher "
                                                f"runs {local['python']}; use the same major.minor everywhere"))
    if not remote.get("importable"):
        version = f"=={local['zps']}" if local.get("zps") else ""
        problems.append(Problem(host, "zps", f"{python} cannot import zps there; install it there "
                                             f"(pip install zps{version}, or pip install -e . in a checkout)"))
    elif None not in (remote.get("zps"), local.get("zps")) and remote["zps"] != local["zps"]:
        problems.append(Problem(host, "zps", f"zps {remote['zps']} there, {local['zps']} on the launcher host; "
                                             f"install the same version everywhere"))
    return problems


# --- running the checks ----------------------------------------------------------------------------------------

def _listen(host: str, port: int) -> tuple[socket.socket | None, Problem | None]:
    """A listener on ``host:port`` for the reach check, and the problem if ``port`` is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    problem = None
    for candidate in ([port, 0] if port else [0]):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator's own bind
        try:
            sock.bind((host, candidate))
            sock.listen(128)
            return sock, problem
        except OSError as exc:
            sock.close()
            if candidate and exc.errno == errno.EADDRINUSE:
                problem = Problem(LAUNCHER, "port", f"the coordinator port {host}:{port} is already in use; "
                                                    f"pick another --port (or none: a free one is chosen)")
            else:
                return None, Problem(LAUNCHER, "port" if candidate else "address",
                                     f"cannot listen on {host}:{candidate} ({exc.strerror})")
    return None, problem


def check_host(host: str, ssh: SshOptions, remote: Remote, local: dict[str, Any], args: dict[str, Any],
               timeout: float) -> list[Problem]:
    """Probe one host over ssh; every problem found there."""
    argv = [remote.python, "-c", probe_source(), json.dumps(args)]
    command = remote.command(argv, cd=False)  # the probe checks the workdir itself
    try:
        done = subprocess.run(ssh.argv(host, command, connect_timeout=min(timeout, ssh.connect_timeout)),
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return [Problem(host, "ssh", f"no answer within {timeout:.0f}s (ssh or the probe hung)")]
    stderr = done.stderr.decode(errors="replace").strip().splitlines()
    last = stderr[-1] if stderr else f"exit code {done.returncode}"
    if done.returncode == 255:  # ssh's own failure: resolve, connect, authenticate, host key
        return [Problem(host, "ssh", last)]
    if done.returncode in (126, 127):  # env could not run the interpreter
        return [Problem(host, "python", f"cannot run {remote.python} there: {last}")]
    answers = [line[len(_MARK):] for line in done.stdout.decode(errors="replace").splitlines()
               if line.startswith(_MARK)]
    if done.returncode != 0 or not answers:
        return [Problem(host, "python", f"the probe failed with exit code {done.returncode}: {last}")]
    return compare(host, remote.python, local, json.loads(answers[-1]))


def run_preflight(hosts: Sequence[str], ssh: SshOptions, remote: Remote, coordinator_host: str | None, port: int,
                  script: str, timeout: float = 15.0, checkpoint_dir: str = "") -> list[Problem]:
    """Check the launcher host and every host in ``hosts`` (see the module docstring); the problems found.

    ``coordinator_host`` None: the launcher side already failed (its problem is reported by the caller), so
    the port and reach checks are left out.
    """
    problems: list[Problem] = []
    listener = None
    if coordinator_host is not None:
        listener, problem = _listen(coordinator_host, port)
        if problem:
            problems.append(problem)
    try:
        args: dict[str, Any] = {"workdir": remote.workdir, "script": script, "interface": remote.interface,
                                "address": True, "connect_timeout": min(5.0, timeout),
                                "checkpoint_dir": checkpoint_dir}
        if listener is not None:
            args["coordinator"] = [coordinator_host, listener.getsockname()[1]]
        local = local_facts()
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
            for found in pool.map(lambda h: check_host(h, ssh, remote, local, args, timeout), hosts):
                problems.extend(found)
    finally:
        if listener is not None:
            listener.close()
    return problems

