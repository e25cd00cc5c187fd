"""Replicated shards (``--replicas R``): where each chunk's copies live, and the coordinator's failover notice.

Placement is a pure function of (home server, R, number of servers), so every process computes it alike: the chunks
the sharding plan gives server ``s`` (their *home*) have copies on ``s, s+1, ..., s+R`` (mod S), R + 1 distinct
servers. While every server lives, the home serves them (the primary) and the others are backups. The first live
server of that chain is the primary; the live ones after it are its backups. When servers die, the coordinator
tells every process which ones are dead (:class:`zps.protocol.messages.FailoverNotice`); each derives the new
primaries from that alone.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .messages import FailoverNotice


def check_replicas(replicas: int, num_servers: int) -> None:
    """ValueError unless ``0 <= replicas < num_servers`` (two copies of a chunk never share a server)."""
    if not 0 <= replicas < num_servers:
        raise ValueError(f"{replicas} replicas need at least {replicas + 1} servers (each copy of a chunk on its own "
                         f"server), the job has {num_servers}: --replicas must be in [0, {num_servers - 1}]")


def copies(home: int, replicas: int, num_servers: int) -> list[int]:
    """The servers that hold the chunks of ``home``, primary first: ``home, home+1, ..., home+replicas`` (mod S)."""
    check_replicas(replicas, num_servers)
    return [(home + i) % num_servers for i in range(replicas + 1)]


def live_copies(home: int, replicas: int, num_servers: int, dead: Collection[int]) -> list[int]:
    """The live servers holding the chunks of ``home``, primary first (empty: every copy is lost)."""
    return [s for s in copies(home, replicas, num_servers) if s not in dead]


def routes(replicas: int, num_servers: int, dead: Collection[int]) -> list[int]:
    """Home -> the server that now serves its chunks (-1 where every copy is lost)."""
    out = []
    for home in range(num_servers):
        live = live_copies(home, replicas, num_servers, dead)
        out.append(live[0] if live else -1)
    return out


def notice_body(version: int, dead: Collection[int]) -> dict[str, Any]:
    """The NOTICE body that announces topology ``version`` with the servers ``dead`` (the one writer)."""
    notice: FailoverNotice = {"version": version, "dead": sorted(dead)}
    return {"failover": notice}


def parse_notice(body: dict[str, Any], num_servers: int) -> tuple[int, frozenset[int]] | None:
    """(topology version, dead servers) of a failover NOTICE body; None when it is not one (the one reader).
    A malformed one raises ValueError."""
    notice = body.get("failover")
    if notice is None:
        return None
    if not isinstance(notice, dict):
        raise ValueError("'failover' must be a map")
    version, dead = notice.get("version"), notice.get("dead")
    if type(version) is not int or version < 0:
        raise ValueError(f"failover 'version' must be a non-negative integer, got {version!r}")
    if not isinstance(dead, list) or not all(type(s) is int and 0 <= s < num_servers for s in dead):
        raise ValueError(f"failover 'dead' must be a list of server ranks below {num_servers}")
    return version, frozenset(dead)
