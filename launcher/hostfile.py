"""Hostfiles, and where each process of a cluster goes on the hosts they list.

Syntax: one host per line, the DeepSpeed / Horovod / MPI form you already have::

    # comment lines, trailing comments and blank lines are ignored
    node1 slots=4                       # 4 worker slots; runs servers and workers
    node2:4                             # Horovod style, the same as "node2 slots=4"
    node3                               # a bare name is 1 slot
    node4 slots=0 roles=server          # a host for servers only
    node5 slots=8 roles=worker          # workers only
    node6 slots=0 roles=coordinator     # the coordinator's host (at most one host says so)

``slots=N`` (N >= 0) is the number of *workers* a host takes (think: its GPUs). ``roles=`` is a comma list of
``coordinator``, ``server``, ``worker``; without it a host takes servers and workers. Any other key is an
error, as are duplicate hosts. IPv6 literals go in brackets: ``[fd00::1] slots=2`` or ``[fd00::1]:2``.

Placement (:func:`place`): the coordinator goes on the host marked ``coordinator``, else on the first host.
Servers go round-robin over the hosts with the ``server`` role, in file order. Servers do *not* use slots:
they hold parameters in host memory and need no GPU. Workers fill the hosts with the ``worker`` role one host
at a time, in file order, up to each host's slots. ``local_rank`` counts processes of the same role on the
same host from 0, so a worker's GPU is ``cuda:<local_rank>``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ROLES = ("coordinator", "server", "worker")
DEFAULT_ROLES = ("server", "worker")

# a name never starts with '-': ssh would read it as an option
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.%A-Za-z]+\]")
_HOROVOD = re.compile(r"(?P<name>.+):(?P<slots>[^:\]]*)")


class HostfileError(ValueError):
    """A hostfile (or host list) is malformed, or the cluster does not fit on its hosts."""


@dataclass(frozen=True)
class Host:
    """One hostfile line: ``name`` takes up to ``slots`` workers and the processes of ``roles``."""

    name: str
    slots: int
    roles: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Placement:
    """One process: its ``role``, its ``rank`` within the role, its ``host`` and index there."""

    role: str
    rank: int
    host: str
    local_rank: int


def _slots(where: str, text: str) -> int:
    if not text.isdigit():
        raise HostfileError(f"{where}: slots={text!r} is not a whole number >= 0")
    return int(text)


def _parse_line(where: str, text: str, line: int) -> Host:
    """One host from ``text`` (comment already stripped); ``where`` prefixes every error."""
    fields = text.split()
    token, options = fields[0], fields[1:]
    slots: int | None = None
    match = _HOROVOD.fullmatch(token)
    if match and not (token.startswith("[") and token.endswith("]")):
        if ":" in match.group("name") and not match.group("name").startswith("["):
            raise HostfileError(f"{where}: {token!r}: write an IPv6 address in brackets, e.g. [fd00::1]:4")
        token = match.group("name")
        slots = _slots(where, match.group("slots"))
    if _NAME.fullmatch(token) is None:
        raise HostfileError(f"{where}: {token!r} is not a host name (letters, digits, '.', '-', '_'; "
                            f"not starting with '-')")

    roles: tuple[str, ...] | None = None
    seen: set[str] = set()
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise HostfileError(f"{where}: {option!r} is not key=value; write e.g. 'slots=4'")
        if key in seen:
            raise HostfileError(f"{where}: {key}= is given twice")
        seen.add(key)
        if key == "slots":
            if slots is not None:
                raise HostfileError(f"{where}: slots given twice ({fields[0]!r} and {option!r}); keep one")
            slots = _slots(where, value)
        elif key == "roles":
            names = [r.strip().lower() for r in value.split(",")]
            bad = [r for r in names if r not in ROLES]
            if bad or not value:
                raise HostfileError(f"{where}: roles={value!r}: each role must be one of {', '.join(ROLES)}")
            roles = tuple(r for r in ROLES if r in names)
        else:
            raise HostfileError(f"{where}: unknown key {key!r}; a host line knows slots= and roles=")
    return Host(name=token, slots=1 if slots is None else slots, roles=roles or DEFAULT_ROLES, line=line)


def _check(hosts: list[Host], source: str, unit: str) -> list[Host]:
    seen: dict[str, Host] = {}
    coordinators: list[Host] = []
    for host in hosts:
        if host.name in seen:
            raise HostfileError(f"{source}: {unit} {host.line}: host {host.name!r} is already listed at "
                                f"{unit} {seen[host.name].line}; give each host one line")
        seen[host.name] = host
        if "coordinator" in host.roles:
            coordinators.append(host)
    if len(coordinators) > 1:
        where = ", ".join(f"{h.name} ({unit} {h.line})" for h in coordinators)
        raise HostfileError(f"{source}: more than one host has the coordinator role: {where}; keep one")
    if not hosts:
        raise HostfileError(f"{source}: no hosts (the file is empty or all comments); "
                            f"write one host per line, e.g. 'node1 slots=4'")
    return hosts


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
    """Parse hostfile ``text`` (syntax in the module docstring); errors name ``source`` and the line."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if content:
            hosts.append(_parse_line(f"{source}: line {number}", content, number))
    return _check(hosts, source, "line")


def read_hostfile(path: str | os.PathLike[str]) -> list[Host]:
    """Read and parse the hostfile at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise HostfileError(f"cannot read hostfile {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise HostfileError(f"hostfile {os.fspath(path)!r} is not UTF-8 text: {exc.reason}") from None
    return parse_hostfile(text, os.fspath(path))


def parse_host_list(spec: str, source: str = "--hosts") -> list[Host]:
    """Parse a command-line host list, Horovod's ``-H`` form: ``"node1:4,node2:4,node3"``.

    Each item is a hostfile line without options; ``Host.line`` is the item's position from 1.
    """
    hosts = []
    for number, item in enumerate(spec.split(","), start=1):
        item = item.strip()
        if not item or len(item.split()) != 1:
            raise HostfileError(f"{source}: item {number} ({item!r}) must be host or host:slots, e.g. node1:4")
        hosts.append(_parse_line(f"{source}: item {number}", item, number))
    return _check(hosts, source, "item")


def _describe(hosts: Iterable[Host]) -> str:
    return ", ".join(f"{h.name} slots={h.slots}" for h in hosts)


def coordinator_host(hosts: Sequence[Host]) -> str:
    """The host the coordinator runs on: the one with the ``coordinator`` role, else the first."""
    if not hosts:
        raise HostfileError("no hosts to place the coordinator on")
    for host in hosts:
        if "coordinator" in host.roles:
            return host.name
    return hosts[0].name


def place(hosts: Sequence[Host], num_servers: int, num_workers: int) -> list[Placement]:
    """Where every process runs: the coordinator, then servers 0.., then workers 0.. (rules in the module doc).

    Raises :class:`HostfileError` saying what does not fit and what the hosts offer.
    """
    if num_servers < 1 or num_workers < 1:
        raise HostfileError(f"a cluster needs at least 1 server and 1 worker, "
                            f"not {num_servers} and {num_workers}")
    out = [Placement("coordinator", 0, coordinator_host(hosts), 0)]
    per_host: dict[tuple[str, str], int] = {}

    def put(role: str, rank: int, host: str) -> None:
        local = per_host.get((role, host), 0)
        per_host[(role, host)] = local + 1
        out.append(Placement(role, rank, host, local))

    server_hosts = [h for h in hosts if "server" in h.roles]
    if not server_hosts:
        raise HostfileError(f"{num_servers} server(s) need a host with the server role, and none of "
                            f"{', '.join(h.name for h in hosts)} has it; add 'server' to a host's roles=")
    for rank in range(num_servers):
        put("server", rank, server_hosts[rank % len(server_hosts)].name)

    worker_hosts = [h for h in hosts if "worker" in h.roles]
    offered = sum(h.slots for h in worker_hosts)
    if offered < num_workers:
        others = [h.name for h in hosts if "worker" not in h.roles]
        note = f" ({', '.join(others)} without the worker role)" if others else ""
        raise HostfileError(f"{num_workers} workers need {num_workers} slots but the hostfile offers "
                            f"{offered}: {_describe(worker_hosts) or 'no worker hosts'}{note}; "
                            f"add hosts or slots, or start fewer workers")
    rank = 0
    for host in worker_hosts:
        for _ in range(host.slots):
            if rank == num_workers:
                break
            put("worker", rank, host.name)
            rank += 1
    return out


def format_placement(placements: Iterable[Placement]) -> str:
    """A plain text table, one process a row: role, rank, host, local_rank."""
    rows = [("role", "rank", "host", "local_rank")]
    rows += [(p.role, str(p.rank), p.host, str(p.local_rank)) for p in placements]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows)
