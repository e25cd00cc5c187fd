"""Replicated shards (``--replicas R``): where each chunk's copies live, and the coordinator's failover notice.

Placement is a pure function of (home server, R, number of servers, dead servers), so every process computes it
alike: the chunks the sharding plan gives server ``s`` (their *home*) live on the first R + 1 live servers of the
chain ``s, s+1, ..., s+S-1`` (mod S), never two copies on one server. While every server lives, that is
``s, ..., s+R``: the home serves them (the primary) and the others are backups. When servers die, the coordinator
tells every process which ones are dead (:class:`FailoverNotice`); each derives the new
primaries (the first live server of each chain) from that alone, and the copy sets grow by the next live servers
of the chain: a primary *seeds* each backup new to a chunk with its whole state (re-replication), so R + 1 copies
exist again as long as R + 1 servers live. A copy that was still being seeded when its primary died holds nothing:
the coordinator counts a chunk lost when no complete copy lives.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypedDict

from .fields import UNBOUNDED, is_int


class FailoverNotice(TypedDict):
    """A NOTICE body's ``failover`` map (``--replicas``): the coordinator lost servers and promoted backups. Written
    by :func:`notice_body` and read by :func:`parse_notice` only.

    - ``version``: the topology version, bumped by each failover (1 after the first)
    - ``dead``: every server rank that has died so far; each home's chunks are served by its first live copy
    """

    version: int
    dead: list[int]


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
    """The live servers that hold (or are being seeded with) the chunks of ``home``, primary first: the first
    ``replicas + 1`` live servers of the chain ``home, home+1, ...`` (mod S); empty when every server is dead."""
    check_replicas(replicas, num_servers)
    chain = [(home + i) % num_servers for i in range(num_servers)]
    return [s for s in chain if s not in dead][: replicas + 1]


def routes(replicas: int, num_servers: int, dead: Collection[int]) -> list[int]:
    """Home -> the server that now serves its chunks (its first live copy; -1 when every server is dead)."""
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
    if not is_int(version, 0, UNBOUNDED):
        raise ValueError(f"failover 'version' must be a non-negative integer, got {version!r}")
    if not isinstance(dead, list) or not all(is_int(s, 0, num_servers) for s in dead):
        raise ValueError(f"failover 'dead' must be a list of server ranks below {num_servers}")
    return version, frozenset(dead)
