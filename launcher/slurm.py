"""Roles for the tasks of one ``srun`` step, read from the variables Slurm sets; nothing is started here.

Task layout (``srun -n S+W ... zps node train.py``): tasks ``0..S-1`` are servers ``0..S-1``, tasks
``S..S+W-1`` are workers ``0..W-1``. Task 0 also starts the coordinator (:func:`is_coordinator_task`); every task
finds it on the first node of the step's node list at ``port`` (default :data:`DEFAULT_PORT`). That holds for
Slurm's default block distribution, which puts task 0 on the first node; with another distribution set
``ZPS_COORDINATOR`` yourself. ``ZPS_HOST`` (the bind address) is the node name, ``SLURMD_NODENAME``.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

from zps.protocol.variables import (
    ZPS_COORDINATOR,
    ZPS_HOST,
    ZPS_LOCAL_RANK,
    ZPS_NUM_SERVERS,
    ZPS_NUM_WORKERS,
    ZPS_RANK,
    ZPS_ROLE,
    ConfigError,
    env_value,
    join_host_port,
    parse_int,
    parse_port,
)

DEFAULT_PORT = 29600
# a node list that expands to more names than this is a typo (node[1-1000000]), not a cluster
MAX_NODES = 100_000

NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_LITERAL = re.compile(r"[A-Za-z0-9._-]*")


class NodelistError(ConfigError):
    """A Slurm node list (``node[01-04,07],login``) is malformed; the message says where."""


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets, checking that brackets pair up and do not nest."""
    items, start, depth = [], 0, 0
    for pos, char in enumerate(nodelist):
        if char == "[":
            if depth:
                raise NodelistError(f"node list {nodelist!r}: nested '[' at position {pos}; brackets do not nest")
            depth = 1
        elif char == "]":
            if not depth:
                raise NodelistError(f"node list {nodelist!r}: ']' at position {pos} closes nothing")
            depth = 0
        elif char == "," and not depth:
            items.append(nodelist[start:pos])
            start = pos + 1
    if depth:
        raise NodelistError(f"node list {nodelist!r}: '[' is never closed")
    items.append(nodelist[start:])
    return items


def _expand_group(nodelist: str, group: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``; the width of each range's first number is kept."""
    out: list[str] = []
    for part in group.split(","):
        part = part.strip()
        match = _RANGE.fullmatch(part)
        if match is None:
            raise NodelistError(f"node list {nodelist!r}: [{group}] holds {part!r}; "
                                f"write numbers and ranges like [1-4,7] or [01-04]")
        low_text, high_text = match.group(1), match.group(2)
        low = int(low_text)
        high = low if high_text is None else int(high_text)
        if high < low:
            raise NodelistError(f"node list {nodelist!r}: range {part!r} runs backwards; write [{high}-{low}]")
        if high - low >= MAX_NODES:
            raise NodelistError(f"node list {nodelist!r}: range {part!r} names more than {MAX_NODES} nodes")
        out.extend(str(n).zfill(len(low_text)) for n in range(low, high + 1))
    return out


def _expand_item(nodelist: str, item: str) -> list[str]:
    item = item.strip()
    if not item:
        raise NodelistError(f"node list {nodelist!r} has an empty name (two commas, or a comma at an end)")
    pieces = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
    choices: list[list[str]] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            choices.append(_expand_group(nodelist, piece))
        elif _LITERAL.fullmatch(piece) is None:
            raise NodelistError(f"node list {nodelist!r}: {piece!r} in {item!r} is not a host name "
                                f"(letters, digits, '.', '-', '_')")
        else:
            choices.append([piece])
    total = 1
    for options in choices:
        total *= len(options)
    if total > MAX_NODES:
        raise NodelistError(f"node list {nodelist!r}: {item!r} names {total} nodes, more than {MAX_NODES}")
    return ["".join(parts) for parts in itertools.product(*choices)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed node list, in order.

    ``"node[01-04,07],gpu-a[1-2],login"`` -> ``node01 .. node04, node07, gpu-a1, gpu-a2, login``. Zero padding
    follows each range's first number; several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as a
    product, the leftmost group slowest. Raises :class:`NodelistError` saying what is wrong and where.
    """
    if not nodelist.strip():
        raise NodelistError("the node list is empty; Slurm sets SLURM_JOB_NODELIST inside an allocation")
    nodes: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        nodes.extend(_expand_item(nodelist, item))
        if len(nodes) > MAX_NODES:
            raise NodelistError(f"node list {nodelist!r} names more than {MAX_NODES} nodes")
    return nodes


def _nodelist(env: Mapping[str, str]) -> str:
    for name in NODELIST_VARS:
        if env.get(name, "").strip():
            return env[name]
    raise ConfigError(f"none of {', '.join(NODELIST_VARS)} is set; run this inside a Slurm allocation (srun)")


def _need(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name]
    raise ConfigError(f"{' or '.join(names)} is not set; start each task with srun")


def is_coordinator_task(env: Mapping[str, str]) -> bool:
    """True for the task that also starts the coordinator: Slurm task 0 (``SLURM_PROCID=0``)."""
    name, value = _need(env, "SLURM_PROCID")
    return parse_int(name, value, 0) == 0


def slurm_roles(env: Mapping[str, str], num_servers: int, port: int = DEFAULT_PORT) -> dict[str, str]:
    """The ``ZPS_*`` variables for this Slurm task (see the module docstring for the layout).

    Reads ``SLURM_PROCID``, ``SLURM_NTASKS`` (or ``SLURM_NPROCS``), the node list
    (``SLURM_STEP_NODELIST``, ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``), ``SLURM_LOCALID`` and
    ``SLURMD_NODENAME``. A ``ZPS_COORDINATOR`` or ``ZPS_HOST`` already in ``env`` is kept as it is.
    """
    if num_servers < 1:
        raise ConfigError(f"num_servers={num_servers} must be >= 1")
    port = parse_port("port", port)
    procid = parse_int(*_need(env, "SLURM_PROCID"), 0)
    ntasks = parse_int(*_need(env, "SLURM_NTASKS", "SLURM_NPROCS"), 1)
    if procid >= ntasks:
        raise ConfigError(f"SLURM_PROCID={procid} must be < SLURM_NTASKS={ntasks}")
    num_workers = ntasks - num_servers
    if num_workers < 1:
        raise ConfigError(f"{ntasks} Slurm tasks leave no worker after {num_servers} servers; "
                             f"start at least {num_servers + 1} tasks (srun -n {num_servers + 1}) "
                             f"or use fewer servers")
    out = {ZPS_NUM_SERVERS: str(num_servers), ZPS_NUM_WORKERS: str(num_workers)}
    if procid < num_servers:
        out.update({ZPS_ROLE: "server", ZPS_RANK: str(procid)})
    else:
        out.update({ZPS_ROLE: "worker", ZPS_RANK: str(procid - num_servers)})

    node = env.get("SLURMD_NODENAME", "").strip()
    explicit_coordinator = env_value(env, ZPS_COORDINATOR)
    if explicit_coordinator is not None:
        out[ZPS_COORDINATOR] = explicit_coordinator
    else:
        first = expand_nodelist(_nodelist(env))[0]
        if procid == 0 and node and node != first:
            raise ConfigError(f"task 0 runs on {node}, not on the first node {first} where the others look "
                                 f"for the coordinator; use the default block distribution or set "
                                 f"{ZPS_COORDINATOR}=host:port")
        out[ZPS_COORDINATOR] = join_host_port(first, port)
    host = env_value(env, ZPS_HOST)
    if host is not None:
        out[ZPS_HOST] = host
    elif node:
        out[ZPS_HOST] = node
    if env.get("SLURM_LOCALID", "").strip():
        out[ZPS_LOCAL_RANK] = str(parse_int("SLURM_LOCALID", env["SLURM_LOCALID"], 0))
    return out
