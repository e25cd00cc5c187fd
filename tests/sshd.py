"""A throw-away OpenSSH server on loopback, for multi-host tests on one machine.

It listens on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (each address is one "host"), accepts only a client key made
for it, and knows its own host key, so clients keep strict host-key checking. Everything lives in a temporary
directory; :meth:`Sshd.stop` ends the daemon and every session it forked (its process group).

``ensure_openssh()`` installs ``openssh-server`` and ``openssh-client`` with apt-get when they are missing (as
CI does on a fresh Debian machine, as root); it returns a reason to skip only when that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .helpers import free_port

SSHD = "/usr/sbin/sshd"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def openssh_missing() -> str | None:
    """Why the real-sshd tests cannot run here (a skip reason), or None. Nothing is installed from a test:
    .ci/run installs openssh-server on CI's fresh machine; elsewhere ``apt-get install openssh-server``."""
    missing = [
        name
        for name, there in (
            (SSHD, os.path.exists(SSHD)),
            ("ssh", shutil.which("ssh")),
            ("ssh-keygen", shutil.which("ssh-keygen")),
        )
        if not there
    ]
    if missing:
        return (
            f"OpenSSH is not installed ({', '.join(missing)} missing): apt-get install openssh-server "
            "openssh-client to run the real-sshd tests"
        )
    return None


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` in the process tree (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # the command name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry))
    out, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            out.append(child)
            queue.append(child)
    return out


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zps-test", "-f", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    """``sshd -f CONFIG -D -e`` on a free port of :data:`HOSTS`; use as a context manager."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.dir / "host_key"
        self.client_key = self.dir / "client_key"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    # -- the client's side ---------------------------------------------------------------------------
    def client_options(self) -> list[str]:
        """``-o`` values for ``ssh`` (or ``zps launch --ssh-option``): our key, our known_hosts, strict checks."""
        return [
            f"IdentityFile={self.client_key}",
            "IdentitiesOnly=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "LogLevel=ERROR",
        ]

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        argv = ["ssh", "-T", "-p", str(self.port), "-o", "BatchMode=yes"]
        for option in self.client_options():
            argv += ["-o", option]
        return subprocess.run(
            [*argv, host, "--", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, deadline_s: float = 20.0) -> Sshd:
        host_pub = _keygen(self.host_key)
        client_pub = _keygen(self.client_key)
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        last_error = ""
        for _ in range(3):  # the free port may be taken between our probe and sshd's bind: try another
            self.port = free_port()
            self.known_hosts.write_text(",".join(f"[{h}]:{self.port}" for h in HOSTS) + f" {host_pub}\n")
            lines = [
                f"Port {self.port}",
                *(f"ListenAddress {h}" for h in HOSTS),
                f"HostKey {self.host_key}",
                f"PidFile {self.dir / 'sshd.pid'}",
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "StrictModes no",
                "UsePAM no",
                "PrintMotd no",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                "MaxStartups 64",
                "MaxSessions 64",
                "LogLevel ERROR",
            ]
            self.config.write_text("\n".join(lines) + "\n")
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [SSHD, "-f", str(self.config), "-D", "-e"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            last_error = self._wait_listening(deadline_s)
            if not last_error:
                return self
            self.stop()
        raise RuntimeError(f"sshd did not start: {last_error}\n{self.log.read_text(errors='replace')}")

    def _wait_listening(self, within: float) -> str:
        """Wait until every address accepts TCP connections; return '' or what went wrong."""
        deadline = time.monotonic() + within
        pending = list(HOSTS)
        while pending:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return f"sshd exited with code {self.proc.returncode}"
            try:
                with socket.create_connection((pending[0], self.port), timeout=1):
                    pending.pop(0)
                continue
            except OSError as exc:
                if time.monotonic() > deadline:
                    return f"{pending[0]}:{self.port} not accepting connections after {within}s ({exc})"
            time.sleep(0.05)  # polling an external condition (the daemon's listen), bounded by the deadline
        return ""

    def stop(self) -> None:
        """End the daemon and every session it forked (each session is its own process group); safe twice."""
        if self.proc is None:
            return
        sessions = descendants(self.proc.pid)  # before the listener goes, while the tree still hangs off it
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
