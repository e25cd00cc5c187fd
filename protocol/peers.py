"""Peer names on the wire (the ``src`` of every message): ``"<role>:<rank>"``, e.g. ``"worker:3"``.

The one place they are written (:func:`peer_name`) and read (:func:`parse_peer`). A rank is a non-negative
integer of at most :data:`MAX_RANK_DIGITS` ASCII digits (``"worker:²"`` and a 4,000-digit rank are refused).
"""
from __future__ import annotations

# the roles a process of a job can have (ZPS_ROLE's values)
ROLES = ("coordinator", "server", "worker")
MAX_RANK_DIGITS = 9
COORDINATOR = "coordinator"  # the coordinator's own src (it has no rank)


def peer_name(role: str, rank: int) -> str:
    """``"worker:3"``; an unassigned rank (``-1``) is written ``"?"`` (before registration)."""
    return f"{role}:{rank if rank >= 0 else '?'}"


def parse_peer(src: object, role: str | None = None) -> tuple[str, int] | None:
    """``(role, rank)`` of a well-formed peer name (of ``role`` when given), else None."""
    if not isinstance(src, str) or len(src) > 32:
        return None
    name, sep, rank = src.partition(":")
    if not sep or name not in ROLES or (role is not None and name != role):
        return None
    if not (0 < len(rank) <= MAX_RANK_DIGITS and rank.isascii() and rank.isdigit()):
        return None
    return name, int(rank)
