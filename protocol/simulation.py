"""What a simulated run injects: the specs of ``--net``, ``--straggler``, ``--jitter`` and ``--kill``.

One parser per option, used by the settings' checks (:mod:`zps.protocol.config`), by the launcher's network
emulator (``--net``) and by the roles that act on the others; ``--kill``'s rule of when a process dies is
:func:`kill_due`, the same for every role.

``--net "bw=100mbit,latency=2ms,jitter=0.5ms;worker:3=bw=10mbit;server=latency=5ms"``: every role's link to the
emulated switch gets the first part; each part after a ``;`` overrides some fields for a role kind (``server``) or
one process (``worker:3``; a rank's override wins over its kind's). ``bw`` is each direction's rate (``kbit``,
``mbit``, ``gbit``, or ``kb``/``mb``/``gb`` for bytes, per second); ``latency`` and ``jitter`` are one way (``us``,
``ms``, ``s``). A worker's message to a server crosses the worker's link, then the server's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

ROLE_KINDS = ("server", "worker")
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "bps": 1 / 8}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class SpecError(ValueError):
    """A simulation spec is malformed; the message says what was expected."""


def _quantity(text: str, units: dict[str, float], what: str) -> float:
    match = _NUMBER.match(text)
    if not match or match.group(2).lower() not in units:
        raise SpecError(f"{what} {text!r}: expected a number with one of the units {', '.join(units)}")
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_rate(text: str) -> float:
    """``100mbit`` -> bytes per second."""
    rate = _quantity(text, _RATE_UNITS, "bandwidth")
    if rate <= 0:
        raise SpecError(f"bandwidth {text!r} must be > 0")
    return rate


def parse_duration(text: str) -> float:
    """``2ms`` -> seconds."""
    return _quantity(text, _TIME_UNITS, "time")


@dataclass(frozen=True)
class Link:
    """One role's link to the emulated switch: ``rate`` bytes/s each way (None: unlimited), one-way ``latency``
    and ``jitter`` (each chunk's extra delay is uniform in [0, jitter]; the byte stream keeps its order)."""

    rate: float | None = None
    latency: float = 0.0
    jitter: float = 0.0

    def shaped(self) -> bool:
        return self.rate is not None or self.latency > 0 or self.jitter > 0


def _link_fields(text: str, base: Link) -> Link:
    out = base
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq:
            raise SpecError(f"{part!r}: expected name=value (bw, latency or jitter)")
        if name in ("bw", "rate", "bandwidth"):
            out = replace(out, rate=parse_rate(value))
        elif name in ("latency", "delay"):
            out = replace(out, latency=parse_duration(value))
        elif name == "jitter":
            out = replace(out, jitter=parse_duration(value))
        else:
            raise SpecError(f"{name!r} is not a link setting: expected bw, latency or jitter")
    return out


@dataclass(frozen=True)
class NetSpec:
    """The parsed ``--net``: a default link and overrides by role kind and by (kind, rank)."""

    default: Link
    by_kind: dict[str, str]
    by_rank: dict[tuple[str, int], str]

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        parts = [p.strip() for p in text.split(";")]
        by_kind: dict[str, str] = {}
        by_rank: dict[tuple[str, int], str] = {}
        default = Link()
        for i, part in enumerate(parts):
            who, eq, rest = part.partition("=")
            target = who.strip().lower()
            if eq and (target in ROLE_KINDS or re.fullmatch(r"(server|worker):\d+", target)):
                _link_fields(rest, Link())  # checked now
                if ":" in target:
                    kind, rank = target.split(":")
                    by_rank[(kind, int(rank))] = rest
                else:
                    by_kind[target] = rest
            elif i == 0:
                default = _link_fields(part, Link())
            else:
                raise SpecError(f"{part!r}: an override is ROLE=FIELDS or ROLE:RANK=FIELDS, e.g. worker:3=bw=10mbit")
        return cls(default, by_kind, by_rank)

    def link(self, role: str, rank: int) -> Link:
        """The link of ``role`` ``rank``: the default, then its kind's override, then its own."""
        out = self.default
        if role in self.by_kind:
            out = _link_fields(self.by_kind[role], out)
        if (role, rank) in self.by_rank:
            out = _link_fields(self.by_rank[(role, rank)], out)
        return out


def parse_stragglers(text: str) -> dict[int, float]:
    """``--straggler "1:2,3:1.5"`` -> {worker rank: factor by which its compute is slowed}."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        rank, colon, factor = part.partition(":")
        try:
            r, f = int(rank), float(factor)
        except ValueError:
            r, f = -1, 0.0
        if not colon or r < 0 or not f >= 1.0:
            raise SpecError(f"{part!r}: expected RANK:FACTOR, a worker rank and a factor >= 1 (2: twice as slow)")
        out[r] = f
    return out


def parse_jitter(text: str) -> tuple[float, float]:
    """``--jitter "0.1:0.05"`` -> (probability per step, seconds of the pause)."""
    p, colon, seconds = text.partition(":")
    try:
        prob, pause = float(p), parse_duration(seconds) if seconds and seconds[-1].isalpha() else float(seconds)
    except (ValueError, SpecError):
        prob, pause = -1.0, -1.0
    if not colon or not 0 <= prob <= 1 or not pause >= 0:
        raise SpecError(f"{text!r}: expected P:SECONDS, a probability per step in [0, 1] and a pause >= 0")
    return prob, pause


def parse_kills(text: str) -> dict[tuple[str, int], int]:
    """``--kill "worker:1@50,server:0@80"`` -> {(role, rank): the step at which it is killed}."""
    out: dict[tuple[str, int], int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(server|worker):(\d+)@(\d+)", part)
        if not match:
            raise SpecError(f"{part!r}: expected ROLE:RANK@STEP, e.g. worker:1@50")
        out[(match.group(1), int(match.group(2)))] = int(match.group(3))
    return out


def kill_step(spec: str, role: str, rank: int) -> int | None:
    """The step ``--kill`` (``spec``) kills process ``role`` ``rank`` at, or None."""
    return parse_kills(spec).get((role, rank)) if spec else None


def kill_due(at: int | None, before: int | None, now: int) -> bool:
    """``--kill ROLE:RANK@STEP``'s one rule, for every role: the process is killed when its count of steps done
    crosses STEP, from ``before`` (the count when it last looked) below STEP to ``now`` at or past it. ``before``
    is None until the process has looked once: one that starts at or past STEP (resumed from a checkpoint, a
    replacement) is never killed. A worker looks after each step (``before = now - 1``), a server as its loop
    turns (``before``: the step it saw last)."""
    return at is not None and before is not None and before < at <= now
