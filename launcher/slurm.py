"""Slurm: the roles of the tasks of an ``srun`` step, read from the variables Slurm sets, and a batch script for a
whole job (:func:`render_sbatch`, ``zps sbatch``). Nothing is started here.

One step for the whole job (``srun -n S+W zps slurm --servers S train.py``): tasks ``0..S-1`` are servers
``0..S-1``, tasks ``S..S+W-1`` are workers ``0..W-1``. Task 0 also starts the coordinator
(:func:`is_coordinator_task`); every task finds it on the first node of the step's node list at ``port``, by default
one derived from the job's id (:func:`job_port`: two jobs that share a first node do not collide). That holds for
Slurm's default block distribution, which puts task 0 on the first node; with another distribution set
``ZPS_COORDINATOR`` yourself. ``ZPS_HOST`` (the bind address) is the node name, ``SLURMD_NODENAME``.

One step per role (``zps slurm --role server|worker``, what :func:`render_sbatch`'s script runs): the task's role is
given, its rank is its ``SLURM_PROCID`` in its step, and ``ZPS_COORDINATOR`` and the job's size come from the
environment (the batch script runs the coordinator and exports them).
"""
from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from zps.protocol.config import JobConfig
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
# the ports job_port picks from: below Linux's ephemeral range (32768-60999), which outgoing connections draw on
JOB_PORTS = range(20000, 32000)
# a node list that expands to more names than this is a typo (node[1-1000000]), not a cluster
MAX_NODES = 100_000

NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")

_SHELL_WORD = re.compile(r"[A-Za-z0-9_./${}-]+")
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


def job_port(env: Mapping[str, str]) -> int:
    """The coordinator's port of this Slurm job: one of :data:`JOB_PORTS` chosen by ``SLURM_JOB_ID`` (so two jobs
    whose first node is the same pick different ports), :data:`DEFAULT_PORT` outside a job."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return DEFAULT_PORT
    return JOB_PORTS.start + parse_int("SLURM_JOB_ID", job_id, 0) % len(JOB_PORTS)


def slurm_roles(env: Mapping[str, str], num_servers: int, port: int | None = None,
                role: str | None = None) -> dict[str, str]:
    """The ``ZPS_*`` variables for this Slurm task (see the module docstring for the layouts).

    Reads ``SLURM_PROCID``, ``SLURM_NTASKS`` (or ``SLURM_NPROCS``), the node list
    (``SLURM_STEP_NODELIST``, ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``), ``SLURM_LOCALID``, ``SLURMD_NODENAME``
    and ``SLURM_JOB_ID`` (the default port: :func:`job_port`). A ``ZPS_COORDINATOR`` or ``ZPS_HOST`` already in
    ``env`` is kept as it is. With ``role`` the step runs that role alone: rank ``SLURM_PROCID``, the job's size from
    ``env``.
    """
    if num_servers < 1:
        raise ConfigError(f"num_servers={num_servers} must be >= 1")
    port = parse_port("port", job_port(env) if port is None else port)
    procid = parse_int(*_need(env, "SLURM_PROCID"), 0)
    ntasks = parse_int(*_need(env, "SLURM_NTASKS", "SLURM_NPROCS"), 1)
    if procid >= ntasks:
        raise ConfigError(f"SLURM_PROCID={procid} must be < SLURM_NTASKS={ntasks}")
    if role is not None:
        if role not in ("server", "worker"):
            raise ConfigError(f"--role {role!r}: a step runs servers or workers (the coordinator runs beside them)")
        out = {ZPS_ROLE: role, ZPS_RANK: str(procid)}
    else:
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
        if role is None and procid == 0 and node and node != first:
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


# --- the batch script (zps sbatch) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SbatchOptions:
    """What ``zps sbatch`` writes into the batch script beyond the job's own options (``zps sbatch --help``)."""

    job_name: str = "zps"
    time: str | None = None
    account: str | None = None
    partition: str | None = None  # both components, unless the next two say otherwise
    server_partition: str | None = None
    worker_partition: str | None = None
    server_cpus: int = 2
    worker_cpus: int = 4
    server_mem: str | None = None
    worker_mem: str | None = None
    gpus_per_worker: int = 0
    keys_dir: str = "$HOME/.zps/keys"  # on a file system every node shares; one 0700 directory per job inside
    zps: str = "zps"  # how the nodes run zps (e.g. /shared/venv/bin/zps)
    python: str = "python3"  # for the free-port probe on the first node
    extra: tuple[str, ...] = ()  # more #SBATCH lines, for both components


def render_sbatch(job: JobConfig, script: Sequence[str], options: SbatchOptions | None = None) -> str:
    """A batch script for ``sbatch`` that runs ``job`` as a heterogeneous Slurm job (see docs/launch.md):

    * component 0, the servers: ``--ntasks=S``, CPUs and memory, no GPU, on ``--server-partition``;
    * component 1, the workers: ``--ntasks=W``, CPUs, memory and ``--gpus-per-task`` on ``--worker-partition``;
    * the coordinator runs in the batch script itself (on the first node of component 0) at a port it finds free
      there; with ``--secure`` (the default) ``zps secrets`` writes the job's keys into a fresh 0700 directory under
      ``--keys-dir``, removed when the job ends;
    * one ``srun --kill-on-bad-exit=1`` step per component; the first to fail ends the others, and the script exits
      with the workers' code (or the first failure's).
    """
    options = options or SbatchOptions()
    if not script or not script[0]:
        raise ValueError("a batch script runs a training script: zps sbatch [OPTIONS] SCRIPT [ARGS...]")
    for what, value in (("server_cpus", options.server_cpus), ("worker_cpus", options.worker_cpus)):
        if value < 1:
            raise ValueError(f"--{what.replace('_', '-')} {value}: at least 1")
    if options.gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker {options.gpus_per_worker}: at least 0")
    if not _SHELL_WORD.fullmatch(options.keys_dir):
        raise ValueError(f"--keys-dir {options.keys_dir!r}: a path of letters, digits and _ . / - $ {{ }} "
                         "($HOME and other variables expand on the node)")
    for line in options.extra:
        if "\n" in line or not line.startswith("--"):
            raise ValueError(f"--sbatch {line!r}: one sbatch option, e.g. --sbatch=--qos=high")
    q = shlex.quote
    defaults = JobConfig().to_env()
    settings = {k: v for k, v in job.to_env().items() if v != defaults[k] or k in (ZPS_NUM_SERVERS, ZPS_NUM_WORKERS)}

    def component(ntasks: int, cpus: int, mem: str | None, partition: str | None, gpus: int) -> list[str]:
        lines = [f"#SBATCH --ntasks={ntasks}", f"#SBATCH --cpus-per-task={cpus}"]
        if mem:
            lines.append(f"#SBATCH --mem={mem}")
        if partition or options.partition:
            lines.append(f"#SBATCH --partition={partition or options.partition}")
        if gpus:
            lines.append(f"#SBATCH --gpus-per-task={gpus}")
        return lines

    head = ["#!/bin/bash", f"# zps sbatch: {job.num_servers} servers and {job.num_workers} workers "
            "as a heterogeneous job (component 0: servers, without GPUs; component 1: workers)",
            f"#SBATCH --job-name={options.job_name}"]
    if options.time:
        head.append(f"#SBATCH --time={options.time}")
    if options.account:
        head.append(f"#SBATCH --account={options.account}")
    head += [f"#SBATCH {line}" for line in options.extra]
    head += component(job.num_servers, options.server_cpus, options.server_mem, options.server_partition, 0)
    head += ["#SBATCH hetjob"]
    head += component(job.num_workers, options.worker_cpus, options.worker_mem, options.worker_partition,
                      options.gpus_per_worker)
    exports = " ".join(f"{k}={q(v)}" for k, v in settings.items())
    zps = options.zps
    command = " ".join(q(a) for a in script)
    body = f'''
set -uo pipefail
ZPS={q(zps)}
# the coordinator: here, on the first node, at a port free here now (two jobs on one node never share it)
NODE="${{SLURMD_NODENAME:-$(hostname)}}"
PORT=$({q(options.python)} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export {exports}
export ZPS_COORDINATOR="$NODE:$PORT"
'''
    if job.secure:
        body += f'''# --secure: the job's keys (a 0600 file per process) in a 0700 directory, removed at the end
mkdir -p -m 0700 {options.keys_dir}
KEYS=$(mktemp -d {options.keys_dir}/job-"${{SLURM_JOB_ID:-0}}".XXXXXX)
trap 'rm -rf "$KEYS"' EXIT
"$ZPS" secrets "$KEYS" --servers {job.num_servers} --workers {job.num_workers} >/dev/null || exit 1
export ZPS_SECURE=1 ZPS_SECRETS_DIR="$KEYS"
'''
    body += f'''
ZPS_ROLE=coordinator ZPS_HOST="$NODE" "$ZPS" node &
COORDINATOR=$!
srun --het-group=0 --ntasks={job.num_servers} --kill-on-bad-exit=1 "$ZPS" slurm --role server &
SERVERS=$!
srun --het-group=1 --ntasks={job.num_workers} --kill-on-bad-exit=1 "$ZPS" slurm --role worker {command} &
WORKERS=$!

# the workers decide: when they fail, the servers and the coordinator go; when a server or the coordinator fails,
# the workers fail too (the coordinator tells them, or their heartbeats go unanswered)
wait "$WORKERS"; code=$?
[ "$code" -ne 0 ] && kill "$SERVERS" "$COORDINATOR" 2>/dev/null
wait "$SERVERS"; servers=$?
wait "$COORDINATOR"; coordinator=$?
[ "$code" -eq 0 ] && code=$servers
[ "$code" -eq 0 ] && code=$coordinator
exit "$code"
'''
    return "\n".join(head) + "\n" + body
