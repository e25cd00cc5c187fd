"""The wire of a step's application: the hyper-parameters it is applied with, and the coordinated BSP step.

Hyper-parameters. A worker sends, per optimizer param group, the hyper-parameters that differ from those the servers'
optimizer was built with (``hp``: ``[{name: value}, ...]``, one map per group; absent while nothing differs). In a
plain push they ride with the push (ASP/SSP: each push is applied with its own; BSP: with the step's); in a
coordinated step, with the commit.

The coordinated BSP step (DDP's clipping and GradScaler, docs/fidelity.md):

- PUSH / PUSH_PULL body ``hold``: 1 -- the step's aggregate of these keys is kept, not applied, until a commit for
  that step arrives;
- INSPECT request: keys (``key``, ``step``) and body ``norm`` (a p-norm's order, optional): the reply (OK, once
  every key's aggregate of that step is complete) says per key its norm and whether every element is finite
  (:func:`inspect_body` / :func:`read_inspect`);
- PULL body ``commit`` (:class:`Commit`): how the held step is applied -- skipped (an inf or NaN in the aggregate),
  or multiplied by each factor of ``mul`` in turn (a clip coefficient, a GradScaler's 1/scale, in the order DDP
  applies them) and stepped with ``hp``. Every worker sends the same commit; the first to arrive applies it.

A key whose step got no gradient from any worker (every push said ``ng``) is not stepped, whatever the commit says.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, TypedDict

from .messages import ErrorCode, ProtocolError

MAX_GROUPS = 1024  # param groups of one optimizer
MAX_HP = 64  # hyper-parameters of one group
MAX_FACTORS = 8  # factors of a commit
Hyperparameters = list[dict[str, Any]]


class Commit(TypedDict):
    """A PULL body's ``commit``: ``step`` (the held step), ``skip``, ``mul`` (factors in order), ``hp``."""

    step: int
    skip: bool
    mul: list[float]
    hp: Hyperparameters | None


class KeyStat(NamedTuple):
    """What INSPECT says of one key's aggregate: its norm (None: no worker produced a gradient, or no norm was
    asked for) and whether every element is finite."""

    norm: float | None
    finite: bool


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, reason)


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def read_hp(value: Any) -> Hyperparameters | None:
    """A checked ``hp``: a list of at most :data:`MAX_GROUPS` maps of short names to numbers, booleans, None or
    short lists of numbers (what each name may be is the optimizer's to say: ps/optim.py)."""
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
            fine = (v is None or type(v) is bool or (_number(v) and math.isfinite(v))
                    or (isinstance(v, list) and len(v) <= 8 and all(_number(x) and math.isfinite(x) for x in v)))
            if not fine:
                raise _bad(f"'hp' {name!r} must be a finite number, a boolean, or a short list of numbers")
    return value


def read_commit(value: Any) -> Commit | None:
    """A checked ``commit`` (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("'commit' must be a map")
    step, skip, factors = value.get("step"), value.get("skip", False), value.get("mul", [])
    if type(step) is not int or not 0 <= step < 1 << 62:
        raise _bad("'commit' needs a non-negative integer 'step'")
    if type(skip) is not bool:
        raise _bad("'commit' 'skip' must be a boolean")
    if (not isinstance(factors, list) or len(factors) > MAX_FACTORS
            or not all(_number(f) and math.isfinite(f) for f in factors)):
        raise _bad(f"'commit' 'mul' must be a list of at most {MAX_FACTORS} finite numbers")
    return Commit(step=step, skip=skip, mul=[float(f) for f in factors], hp=read_hp(value.get("hp")))


def read_norm(value: Any) -> float | None:
    """An INSPECT body's ``norm``: a p-norm's order (p > 0, or inf), or None for none."""
    if value is None:
        return None
    if not _number(value) or not (value > 0):
        raise _bad("'norm' must be a positive number (inf: the largest magnitude)")
    return float(value)


def inspect_body(stats: dict[int, KeyStat]) -> dict[str, Any]:
    """The body of an INSPECT reply."""
    return {"keys": [[key, s.norm, s.finite] for key, s in stats.items()]}


def read_inspect(body: dict[str, Any], asked: set[int]) -> dict[int, KeyStat]:
    """A checked INSPECT reply: a stat for exactly the keys ``asked``."""
    found: dict[int, KeyStat] = {}
    rows = body.get("keys")
    if not isinstance(rows, list):
        raise _bad("an INSPECT reply needs 'keys'")
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and type(row[0]) is int and type(row[2]) is bool
                and (row[1] is None or _number(row[1]))):
            raise _bad("an INSPECT reply's rows are [key, norm or None, finite]")
        found[row[0]] = KeyStat(None if row[1] is None else float(row[1]), row[2])
    if set(found) != asked:
        raise _bad(f"an INSPECT reply names keys {sorted(set(found) ^ asked)[:5]} it was not asked, or misses them")
    return found
