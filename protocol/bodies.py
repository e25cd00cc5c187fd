"""The ``body`` maps of messages: one TypedDict per body, the one definition of its fields, and beside it the one
checked reader that every role calls (the pattern of :class:`zps.protocol.rendezvous.Topology`'s
``to_body``/``from_body``).

A reader takes a body as it came off the wire and returns it typed: every field it keeps has the type and range
documented here. A body that cannot be read raises :class:`ProtocolError` naming the field (BAD_HEADER unless
said otherwise), except the coordinator's NOTICE, whose reader keeps what is well-formed and drops the rest (a
member never refuses its coordinator's news). The per-key fields of data messages are
:class:`zps.protocol.messages.KeyEntry`'s.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Any, NamedTuple, TypedDict

from . import replicas
from .fields import UNBOUNDED, is_int, is_number
from .messages import ErrorCode, ProtocolError
from .peers import ROLES
from .progress import clean_report
from .replicas import FailoverNotice

MAX_LR = 3.0e38  # a learning rate above float32's range cannot be applied (torch refuses it mid-step)
MAX_GROUPS = 1024  # optimizer param groups of a job


def _bad(reason: str, code: ErrorCode = ErrorCode.BAD_HEADER) -> ProtocolError:
    return ProtocolError(code, reason)


# -- worker -> server ---------------------------------------------------------------------------------------------
class InitBody(TypedDict, total=False):
    """The body of an INIT request (a worker declares keys; rank 0 also sets their values).

    - ``optimizer``: the server optimizer's name (a torch.optim class; rank 0, with values)
    - ``groups``: its hyper-parameters, one map per param group (a key's ``group`` indexes it)
    - ``shm``: the worker's shared segment on this host (:meth:`zps.protocol.shm.Segment.describe`), when it offers
      one; the keys' areas in it are their ``shm`` entries
    - ``model``: what the worker declares as a whole (:func:`model_signature`): ``[tensors, digest]``, the number
      of its tensors and a digest of their names, shapes and groups; a server refuses a worker whose model is not
      the one the first declared (an extra layer would otherwise wait for values rank 0 never sends)
    """

    optimizer: str
    groups: list[Any]
    shm: dict[str, Any]
    model: list[Any]


def model_signature(params: list[tuple[str, tuple[int, ...], int]]) -> list[Any]:
    """``[number of tensors, digest]`` of a model declared as (name, shape, group) per tensor, in order."""
    text = json.dumps([[name, list(shape), group] for name, shape, group in params], separators=(",", ":"))
    return [len(params), hashlib.sha256(text.encode()).hexdigest()[:16]]


def read_init(body: dict[str, Any]) -> InitBody:
    """An INIT body, checked (a named optimizer comes with a non-empty list of groups: BAD_OPTIMIZER)."""
    out: InitBody = {}
    optimizer, groups = body.get("optimizer"), body.get("groups", [])
    if optimizer is not None:
        if not isinstance(optimizer, str):
            raise _bad(f"'optimizer' must be a name, got {str(optimizer)[:40]!r}", ErrorCode.BAD_OPTIMIZER)
        if not isinstance(groups, list) or not groups:
            raise _bad("'groups' must be a non-empty list of hyper-parameter maps", ErrorCode.BAD_OPTIMIZER)
        out["optimizer"], out["groups"] = optimizer, groups
    shm = body.get("shm")
    if shm is not None:
        if not isinstance(shm, dict):
            raise _bad("'shm' must be a map")
        out["shm"] = shm
    model = body.get("model")
    if model is not None:
        if not (isinstance(model, list) and len(model) == 2 and is_int(model[0], 0, UNBOUNDED)
                and isinstance(model[1], str) and len(model[1]) <= 64):
            raise _bad("'model' must be [number of tensors, digest]")
        out["model"] = model
    return out


Hyperparameters = list[dict[str, Any]]  # per param group: hyper-parameter name -> value


def _finite(value: Any) -> bool:
    return is_number(value, -sys.float_info.max, sys.float_info.max)


MAX_HP = 64  # hyper-parameters of one group
MAX_FACTORS = 8  # factors of a commit


class PushBody(TypedDict, total=False):
    """The body of a PUSH or PUSH_PULL request.

    - ``hp``: per param group, the hyper-parameters that differ from those the servers' optimizer was built with
      (one map per group; one map for every group when there is one); absent while nothing differs. In a plain push
      they are the step's (ASP/SSP: this push's); read by :func:`read_hp`
    - ``hold``: 1 -- BSP: the aggregate of this step of these keys is kept, not applied, until a commit for the step
      arrives with a pull (:class:`Commit`)
    - ``ckpt``: worker 0 only: asks for checkpoint ``ckpt`` (:mod:`zps.protocol.checkpoint`); a positive integer
    """

    hp: Hyperparameters
    hold: int
    ckpt: int


def read_hp(value: Any) -> Hyperparameters | None:
    """A checked ``hp``: a list of 1 to :data:`MAX_GROUPS` maps of short names to finite numbers, booleans, None or
    short lists of numbers (which names and values an optimizer takes is the server's to check: ps/optim.py)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_GROUPS:
        raise _bad(f"'hp' must be a list of 1 to {MAX_GROUPS} maps (one per param group)")
    for group in value:
        if not isinstance(group, dict) or len(group) > MAX_HP:
            raise _bad(f"'hp' must hold maps of at most {MAX_HP} hyper-parameters")
        for name, v in group.items():
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                raise _bad("'hp' names must be strings of 1 to 64 characters")
            fine = (v is None or type(v) is bool or _finite(v)
                    or (isinstance(v, list) and len(v) <= 8 and all(_finite(x) for x in v)))
            if not fine:
                raise _bad(f"'hp' {name!r} must be a finite number, a boolean, or a short list of numbers")
    return value


def read_push(body: dict[str, Any]) -> PushBody:
    """A PUSH body, checked (a ``ckpt`` that is not a positive integer is ignored, as it always was)."""
    out: PushBody = {}
    hp = read_hp(body.get("hp"))
    if hp is not None:
        out["hp"] = hp
    if body.get("hold") == 1:
        out["hold"] = 1
    checkpoint = body.get("ckpt")
    if is_int(checkpoint, 1, UNBOUNDED):
        out["ckpt"] = checkpoint
    return out


class Commit(TypedDict):
    """How a held BSP step is applied (a PULL body's ``commit``; every worker sends the same, the first to arrive
    counts): ``skip`` -- not at all (an inf or NaN in the aggregate: a GradScaler's verdict); otherwise the
    aggregate is multiplied by each factor of ``mul`` in turn (a clip coefficient, a GradScaler's 1/scale, in the
    order DDP applies them) and stepped with ``hp``. A key no worker had a gradient for is never stepped."""

    step: int
    skip: bool
    mul: list[float]
    hp: Hyperparameters | None


class PullBody(TypedDict, total=False):
    """The body of a PULL request: ``commit`` (:class:`Commit`), how the held step ``step - 1`` is applied."""

    commit: Commit


def read_commit(value: Any) -> Commit | None:
    """A checked ``commit`` (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("'commit' must be a map")
    step, skip, factors = value.get("step"), value.get("skip", False), value.get("mul", [])
    if not is_int(step):
        raise _bad("'commit' needs a non-negative integer 'step'")
    if type(skip) is not bool:
        raise _bad("'commit' 'skip' must be a boolean")
    if not isinstance(factors, list) or len(factors) > MAX_FACTORS or not all(_finite(f) for f in factors):
        raise _bad(f"'commit' 'mul' must be a list of at most {MAX_FACTORS} finite numbers")
    return Commit(step=step, skip=skip, mul=[float(f) for f in factors], hp=read_hp(value.get("hp")))


def read_pull(body: dict[str, Any]) -> PullBody:
    out: PullBody = {}
    commit = read_commit(body.get("commit"))
    if commit is not None:
        out["commit"] = commit
    return out


class InspectBody(TypedDict, total=False):
    """The body of an INSPECT request (its keys: ``key``, ``step``, one step for all): ``norm``, the order of the
    p-norm asked for (a positive number, inf: the largest magnitude); absent: finiteness only. The OK reply, once
    every key's aggregate of that step is complete (held), is an :class:`InspectReply`."""

    norm: float


def read_inspect(body: dict[str, Any]) -> InspectBody:
    out: InspectBody = {}
    norm = body.get("norm")
    if norm is not None:
        if not is_number(norm, 0, math.inf) or not norm > 0:
            raise _bad("'norm' must be a positive number (inf: the largest magnitude)")
        out["norm"] = float(norm)
    return out


class KeyStat(NamedTuple):
    """What an INSPECT says of one key's held aggregate: its norm (None: no norm asked, or no worker produced a
    gradient) and whether every element is finite."""

    norm: float | None
    finite: bool


class InspectReply(TypedDict):
    """The body of an INSPECT's OK reply: ``keys``, ``[[key, norm or None, finite], ...]``."""

    keys: list[list[Any]]


def inspect_reply(stats: dict[int, KeyStat]) -> InspectReply:
    return {"keys": [[key, s.norm, s.finite] for key, s in stats.items()]}


def read_inspect_reply(body: dict[str, Any], asked: set[int]) -> dict[int, KeyStat]:
    """A checked INSPECT reply: a stat for exactly the keys ``asked``."""
    found: dict[int, KeyStat] = {}
    rows = body.get("keys")
    if not isinstance(rows, list):
        raise _bad("an INSPECT reply needs 'keys'")
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and is_int(row[0], 0, UNBOUNDED) and type(row[2]) is bool
                and (row[1] is None or type(row[1]) in (int, float))):  # (inf or NaN: a non-finite aggregate)
            raise _bad("an INSPECT reply's rows are [key, norm or None, finite]")
        found[row[0]] = KeyStat(None if row[1] is None else float(row[1]), row[2])
    if set(found) != asked:
        raise _bad(f"an INSPECT reply names keys {sorted(set(found) ^ asked)[:5]} it was not asked, or misses them")
    return found


class JoinBody(TypedDict):
    """The body of a JOIN request (a worker beyond ``--workers`` asks to be counted from a step).

    - ``step``: the step it asks to count from (the reply's ``step``: the one it is counted from)
    """

    step: int


def read_join(body: dict[str, Any]) -> JoinBody:
    step = body.get("step")
    if not is_int(step):
        raise _bad("a join's 'step' must be a non-negative integer")
    return {"step": step}


# -- server -> server (--replicas) ----------------------------------------------------------------------------------
class SeedBody(TypedDict):
    """The body of a SEED request (``--replicas``, a primary to a backup).

    - ``optimizer``, ``groups``: the server optimizer and its hyper-parameters per group, as rank 0 declared them
      (a backup new to a group builds its optimizer from them)
    - ``failover``: the topology the primary seeds for (:class:`FailoverNotice`): the backup takes it as news if
      the coordinator's notice has not reached it yet, and refuses updates from servers it names dead
    """

    optimizer: str
    groups: list[dict[str, Any]]
    failover: FailoverNotice


def read_seed(body: dict[str, Any], num_servers: int) -> tuple[SeedBody, tuple[int, frozenset[int]]]:
    """A SEED body, checked, and its failover as (topology version, dead servers)."""
    try:
        topology = replicas.parse_notice(body, num_servers)
        if topology is None:
            raise ValueError("it names no 'failover'")
    except ValueError as exc:
        raise _bad(f"a seed's failover: {exc}") from None
    optimizer, groups = body.get("optimizer"), body.get("groups")
    if not isinstance(optimizer, str) or not isinstance(groups, list) or not groups:
        raise _bad("a seed names its 'optimizer' and a non-empty list of 'groups'", ErrorCode.BAD_OPTIMIZER)
    seed: SeedBody = {"optimizer": optimizer, "groups": groups,
                      "failover": {"version": topology[0], "dead": sorted(topology[1])}}
    return seed, topology


# -- coordinator <-> members ----------------------------------------------------------------------------------------
class RegisterBody(TypedDict, total=False):
    """The body of a REGISTER request (a server or worker joins the job): the one definition of its fields.

    - ``role``: ``"server"`` or ``"worker"``
    - ``rank``: the rank asked for (-1: the coordinator assigns one)
    - ``host``, ``pid``: where the process runs (for logs and ``zps top``; a rejoining member must match itself)
    - ``address``: a server's bound address, ``tcp://host:port`` (servers only)
    - ``rejoin``: True -- the process is a member of a running job re-registering with a coordinator that
      restarted (it answered :attr:`ErrorCode.UNKNOWN_MEMBER`); ``rank`` is then the one it holds. The reply is an
      OK (the member keeps its topology), not a TOPOLOGY. Absent: False.
    """

    role: str
    rank: int
    host: str
    pid: int
    address: str
    rejoin: bool


_MEMBER_ROLES = tuple(r for r in ROLES if r != "coordinator")


def read_register(body: dict[str, Any]) -> RegisterBody:
    """A REGISTER body, checked, with every field present (``rank`` -1, ``pid`` 0, ``host`` ``"?"`` and ``rejoin``
    False where absent; ``address`` a server's only)."""
    role, rank, pid, host = body.get("role"), body.get("rank", -1), body.get("pid", 0), body.get("host", "?")
    if not isinstance(role, str) or role not in _MEMBER_ROLES:
        raise _bad(f"cannot register role {str(role)[:40]!r}: expected server or worker")
    if not is_int(rank, -1, 1 << 31):
        raise _bad(f"rank must be an integer >= -1, got {str(rank)[:40]}")
    if not is_int(pid, 0, 1 << 31) or not isinstance(host, str) or len(host) > 255:
        raise _bad("'pid' must be a process id and 'host' a host name")
    rejoin = body.get("rejoin", False)
    if type(rejoin) is not bool:
        raise _bad("'rejoin' must be true or false")
    out: RegisterBody = {"role": role, "rank": rank, "host": host, "pid": pid, "rejoin": rejoin}
    if role == "server":
        address = body.get("address")
        if not (isinstance(address, str) and address.startswith("tcp://") and len(address) < 300):
            raise _bad("a server must register with its 'address' (tcp://host:port)")
        out["address"] = address
    return out


class HeartbeatBody(TypedDict, total=False):
    """The body of a HEARTBEAT (a member to the coordinator, every ``--heartbeat-interval``).

    - ``stats``: the member's progress report (:mod:`zps.protocol.progress`)
    - ``suspect``: ``--replicas``, a worker's: the ranks of servers its connection to was lost; the coordinator fails
      such a server over once its own heartbeats are late too (without waiting for ``--heartbeat-timeout``)
    - ``replicated``: ``--replicas``, a server's: the newest topology version after which every chunk it serves has
      its R + 1 copies complete again (its seeds all acknowledged): the coordinator counts those copies as holders
    """

    stats: dict[str, Any]
    suspect: list[int]
    replicated: int


def read_heartbeat(body: dict[str, Any], num_servers: int) -> HeartbeatBody:
    """A HEARTBEAT body with what is well-formed: the report cleaned (:func:`zps.protocol.progress.clean_report`),
    the suspects that are server ranks (at most one per server), ``replicated`` when an integer; the rest dropped."""
    out: HeartbeatBody = {}
    if "stats" in body:
        out["stats"] = clean_report(body["stats"])
    suspect = body.get("suspect")
    if isinstance(suspect, list):
        out["suspect"] = [s for s in suspect[:num_servers] if is_int(s, 0, num_servers)]
    if is_int(body.get("replicated")):
        out["replicated"] = body["replicated"]
    return out


class NoticeBody(TypedDict, total=False):
    """The body of a NOTICE (the coordinator tells members about the job, on their heartbeat channel).

    - ``gone``: a worker rank that failed (``--on-worker-failure shrink`` goes on without it); ``why``: the reason
    - ``replaced``: a worker rank a new process took (what the old one held on a server is forgotten)
    - ``workers``: worker rank (a decimal string) -> the pid it registered with (for same-host shared memory)
    - ``failover``: ``--replicas``: servers died (:class:`FailoverNotice`)
    """

    gone: int
    why: str
    replaced: int
    workers: dict[str, int]
    failover: FailoverNotice


def read_notice(body: dict[str, Any]) -> NoticeBody:
    """A NOTICE body with its well-formed fields (the coordinator's: what is malformed is dropped, not refused).
    ``failover`` is kept as it came: :func:`zps.protocol.replicas.parse_notice` reads it (and may refuse it)."""
    out: NoticeBody = {}
    for name in ("gone", "replaced"):
        if is_int(body.get(name)):
            out[name] = body[name]
    why = body.get("why")
    if isinstance(why, str):
        out["why"] = why
    pids = body.get("workers")
    if isinstance(pids, dict):
        out["workers"] = {w: p for w, p in pids.items()
                          if isinstance(w, str) and w.isascii() and w.isdigit() and len(w) <= 9 and is_int(p, 0)}
    if "failover" in body:
        out["failover"] = body["failover"]
    return out

