"""A server's side of ``--replicas R``: forwarding its updates to the backups of the chunks it serves, tracking
their acknowledgements, seeding new backups after a failover, and taking over the chunks of dead servers
(:mod:`zps.protocol.replicas` says where copies live).

A primary applies an update, then sends the same gradient, learning rate and push identity to each live backup
(one REPLICATE per backup and optimizer step); the backup steps its own torch.optim copy the same way. A key's
*acknowledged* version is the lowest version every live backup confirmed; the server answers a push (and a BSP
pull) only once it is acknowledged, so whatever a worker saw acknowledged survives the primary's death.

After a failover a primary *seeds* (:mod:`._seeds`) every backup that is new to a key (re-replication: the copy
sets grow by the next live server) and, when it was just promoted, every backup of the keys it took over (they
may have missed the dead primary's last update); a backup that refuses an update (it missed one) is seeded again.
Until a seed is acknowledged, that backup's acknowledged version is 0: pushes wait for it, so no acknowledged
update exists only on the primary. A backup that refuses a seed is dropped as a copy of those keys, loudly.

Embedding tables' partitions are tracked here too, by their handles (negative keys; :mod:`._table_replicas` sends
their forwards and seeds through :meth:`Replication.track` and :meth:`Replication.seeding`).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from zps.protocol import replicas, transport
from zps.protocol.bodies import SeedBody, read_hp
from zps.protocol.codecs import make_codec
from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError
from zps.protocol.peers import parse_peer
from zps.protocol.tensors import encode_entry

from ._metrics import ServerMetrics
from ._seeds import Decode, Seed, SeedKey, seed_messages
from .store import KeyState, Update

Forward = tuple[KeyState, int, dict[str, Any] | None, torch.Tensor | None]  # key, version, hp, gradient
CheckHp = Callable[[int, dict[str, Any]], None]  # (group, hp): ProtocolError unless the optimizer takes them

log = logging.getLogger("zps.server")


class Replication:
    """The replication state of server ``rank`` of ``num_servers`` (``peers``: every server's address by rank)."""

    def __init__(self, rank: int, num_servers: int, count: int, name: str, send: Callable[[int, Message], None],
                 metrics: ServerMetrics) -> None:
        """``send(server, message)``: to another server (the loop's socket to it); ``metrics``: what it counts."""
        self.rank, self.num_servers, self.count, self.name = rank, num_servers, count, name
        self.send = send
        self.counters = metrics.replication
        self.dead: frozenset[int] = frozenset()
        self.version = 0  # the topology version of the newest failover notice
        self._ids = itertools.count(1)
        self._acked: dict[tuple[int, int], int] = {}  # (key, backup) -> the version it confirmed
        self._dropped: set[tuple[int, int]] = set()  # (key, backup): a backup that refused a seed of the key
        # id -> (backup, [(key, version it holds once applied)], a seed?)
        self._inflight: dict[int, tuple[int, list[tuple[int, int]], bool]] = {}
        self._backups: dict[int, list[int]] = {}  # key -> its live backups while this server is its primary
        self._seeding: dict[tuple[int, int], int] = {}  # (key, backup) -> the newest seed, until answered
        self._seeded: dict[tuple[int, int], int] = {}  # (key, backup) -> the id of the newest seed sent
        self.reseed: dict[int, set[int]] = {}  # backup -> keys to seed it with (Server sends them: it has the state)
        self.fenced: str | None = None  # a backup answered that this server was declared dead
        self._plain = make_codec("none")  # updates travel uncompressed

    # -- who may send what: the coordinator's topology, never a peer's word ----------------------------------
    def sender(self, src: str, what: str) -> int:
        """The rank of the server that sent a replicate request or a seed (``src``: its peer name, bound to its key
        under --secure): BAD_HEADER unless it names one of the job's servers, DEAD when the coordinator's notices
        say it was failed over (a paused primary that resumed is fenced off: the copies that took its place serve
        its chunks now)."""
        peer = parse_peer(src, "server")
        if peer is None or peer[1] >= self.num_servers:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"'src' of {what} must be server:N with N < {self.num_servers}, "
                                                      f"got {str(src)[:40]!r}")
        if peer[1] in self.dead:
            raise ProtocolError(ErrorCode.DEAD, f"{src} was failed over (topology version {self.version}): it serves "
                                                "nothing any more")
        return peer[1]

    def check_primary(self, home: int, sender: int, what: str) -> None:
        """CONFLICT unless, in the topology the coordinator announced to this server, ``sender`` is the primary of
        the chunks of ``home`` and this server one of their live copies: only that server may replicate to or seed
        this one (a server that has not heard of a failover yet refuses the new primary: it is seeded again once
        it has)."""
        live = replicas.live_copies(home, self.count, self.num_servers, self.dead)
        if not live or live[0] != sender or self.rank not in live[1:]:
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: server {sender} is not the primary of its chunks with "
                                                    f"this server as a backup (topology version {self.version})")

    @property
    def enabled(self) -> bool:
        return self.count > 0

    # -- who holds what --------------------------------------------------------------------------------
    def backups(self, state: KeyState) -> list[int]:
        """The live backups of ``state`` when this server is its primary (else none)."""
        if not self.count:
            return []
        found = self._backups.get(state.key)  # (asked for every key of every waiting request: kept until it changes)
        if found is None:
            live = replicas.live_copies(state.home, self.count, self.num_servers, self.dead)
            found = [] if not live or live[0] != self.rank else [b for b in live[1:]
                                                                   if (state.key, b) not in self._dropped]
            self._backups[state.key] = found
        return found

    def acked(self, state: KeyState) -> int:
        """The version of ``state`` every live backup holds (its own version when it has none)."""
        return min([state.version, *(self._acked.get((state.key, b), 0) for b in self.backups(state))])

    def holds(self, targets: list[tuple[KeyState, int]]) -> bool:
        """Every live backup holds each (key, version) of ``targets``."""
        return all(self.acked(s) >= version for s, version in targets)

    def missing(self, targets: list[tuple[KeyState, int]]) -> str:
        """What a request waiting for ``targets`` (:meth:`holds`) still waits for."""
        state, version = next(((s, v) for s, v in targets if self.acked(s) < v), targets[0])
        return (f"{state.label()} at version {state.version}: its backups (servers {self.backups(state)}) have "
                f"acknowledged version {self.acked(state)}, the request waits for {version}")

    def early(self, seed: Seed) -> bool:
        """``seed`` follows a failover this server has not heard of from the coordinator yet: it waits for that
        notice (a peer's word on who is dead is never taken)."""
        return seed.topology[0] > self.version

    def check_seed(self, seed: Seed, homes: Callable[[SeedKey], int]) -> None:
        """ProtocolError unless the coordinator's topology, as this server heard it, names the seed's sender the
        primary of every key it carries (``homes``: each key's home, as declared here or else as the seed says) with
        this server as a live copy. DEAD: the sender was failed over; CONFLICT: the seed names another topology, or
        its sender does not serve those keys."""
        self.check_topology(seed.src, seed.topology)
        for item in seed.keys:
            self.check_primary(homes(item), seed.sender, f"seed of key {item.entry['key']}")

    def check_topology(self, src: str, topology: tuple[int, frozenset[int]]) -> None:
        """DEAD unless the seed's sender ``src`` lives; CONFLICT when ``topology`` (version, dead servers) is the
        version this server heard of with other dead servers."""
        self.sender(src, "a seed")
        version, dead = topology
        if version == self.version and dead != self.dead:
            raise ProtocolError(ErrorCode.CONFLICT, f"a seed of topology version {version} names dead servers "
                                                    f"{sorted(dead)}; the coordinator named {sorted(self.dead)}")

    def serves(self, home: int) -> bool:
        """This server is the live primary of the chunks (and table rows) of ``home``, as it heard the topology."""
        live = replicas.live_copies(home, self.count, self.num_servers, self.dead)
        return bool(live) and live[0] == self.rank

    def copy_of(self, home: int) -> bool:
        """This server is one of the live copies of ``home`` (its primary or a backup)."""
        return self.rank in replicas.live_copies(home, self.count, self.num_servers, self.dead)

    def track(self, backup: int, msg: Message, record: list[tuple[int, int]], seed: bool = False) -> None:
        """Send ``msg`` (an update or a seed) to ``backup`` under a new id; its answer acknowledges ``record``
        ((key, version it holds once applied); an empty record: an answer that acknowledges nothing, the
        first parts of a seed sent in several)."""
        msg.id = next(self._ids)
        self._inflight[msg.id] = (backup, record, seed)
        self.send(backup, msg)  # (one that cannot be sent is never acknowledged: the push times out naming it)

    def seeding(self, backup: int, key: int, version: int, parts: list[Message]) -> None:
        """Send ``backup`` the seed of ``key`` (its state at ``version``) in ``parts``: only the last part's answer
        acknowledges it; until then the backup's acknowledged version of the key is 0."""
        for i, msg in enumerate(parts):
            self.track(backup, msg, [(key, version)] if i == len(parts) - 1 else [], seed=True)
            self.counters["seed_bytes"] += transport.size_of(msg.frames)
        self._seeding[(key, backup)] = self._seeded[(key, backup)] = parts[-1].id
        self._acked.pop((key, backup), None)
        self.counters["seeded_keys"] += 1

    # -- forwarding ------------------------------------------------------------------------------------
    def snapshot(self, updates: list[Update]) -> list[Forward] | None:
        """Before the primary applies ``updates``: what to forward (each key with backups: its version, its
        hyper-parameters and a copy of the gradient, which the optimizer may not change in place meanwhile; None:
        a step without a gradient, which only versions the key); None when nothing is."""
        if not self.count:
            return None
        out = [(s, s.version, s.hp, None if g is None else g.detach().clone()) for s, g in updates if self.backups(s)]
        return out or None

    def forward(self, taken: list[Forward], origin: dict[int, tuple[int, int]] | None) -> None:
        """Send the updates of ``taken`` (about to be applied here) to each backup (``origin``: key -> (worker,
        step) of the push each came from, ASP/SSP; BSP: None)."""
        by_backup: dict[int, list[Forward]] = {}
        for item in taken:
            for backup in self.backups(item[0]):
                by_backup.setdefault(backup, []).append(item)
        for backup, items in by_backup.items():
            keys: list[KeyEntry] = []
            frames: list[Any] = []
            record = []
            for state, version, hp, grad in items:
                entry: KeyEntry
                bufs: list[Any]
                if grad is None:
                    entry, bufs = {"nf": 0, "ng": 1}, []
                else:
                    entry, bufs = encode_entry(self._plain, grad)
                entry.update({"key": state.key, "version": version, "hp": hp, "step": version})
                if origin is not None and state.key in origin:
                    entry["worker"], entry["step"] = origin[state.key]
                keys.append(entry)
                frames.extend(bufs)
                record.append((state.key, version + 1))
            self.counters["replicated"] += len(items)
            self.track(backup, Message(Kind.REPLICATE, src=self.name, keys=keys, frames=frames), record)

    def answered(self, backup: int, msg: Message) -> set[int]:
        """A backup's answer: the keys whose acknowledged version may have moved. Keys a backup refused an update of
        go to :attr:`reseed`; a refused seed drops that backup as a copy of its keys."""
        found = self._inflight.pop(msg.id, None)
        if found is None:
            return set()
        _, record, seed = found
        changed = {key for key, _ in record}
        if msg.kind is not Kind.ERROR:
            for key, version in record:
                self._acked[(key, backup)] = max(self._acked.get((key, backup), 0), version)
                if seed and self._seeding.get((key, backup)) == msg.id:
                    del self._seeding[(key, backup)]
            return changed
        reason = str(msg.body.get("reason", "?"))[:300]
        if msg.body.get("code") == ErrorCode.DEAD.value:
            self.fenced = f"server {backup} refused its updates: {reason}"
            return changed
        keys = [key for key, _ in record]
        if seed:
            for key in keys:
                self._dropped.add((key, backup))
                self._backups.pop(key, None)
                self._seeding.pop((key, backup), None)
            log.error("FAILOVER: %s: server %d refused the seed of keys %s (%s); it is no longer a copy of them: "
                      "they have one copy fewer", self.name, backup, keys_text(keys), reason)
            return changed
        stale = [k for k in keys if self._seeded.get((k, backup), 0) > msg.id]  # sent before its newest seed
        missed = [k for k in keys if k not in stale and (k, backup) not in self._dropped]
        if missed:
            log.warning("%s: server %d refused updates of keys %s (%s): it is seeded with them again", self.name,
                        backup, keys_text(missed), reason)
            self.reseed.setdefault(backup, set()).update(missed)
        return changed

    def seed(self, keys: dict[int, KeyState], optimizer_state: Callable[[KeyState], dict[str, torch.Tensor]],
             optimizer: tuple[str, list[dict[str, Any]]] | None, max_bytes: int) -> None:
        """Send the seeds :attr:`reseed` asks for (each key's whole state, as it is now)."""
        wanted, self.reseed = self.reseed, {}
        if optimizer is None:  # (rank 0 has not declared yet: no key has values, nothing to copy)
            return
        body: SeedBody = {"optimizer": optimizer[0], "groups": optimizer[1],
                          "failover": {"version": self.version, "dead": sorted(self.dead)}}
        for backup, asked in sorted(wanted.items()):
            if backup in self.dead:
                continue
            states = [keys[k] for k in sorted(asked) if k in keys and keys[k].initialized
                      and backup in self.backups(keys[k])]
            for msg, carried in seed_messages(states, optimizer_state, body, self.name, self._ids, max_bytes):
                self._inflight[msg.id] = (backup, [(k, keys[k].version) for k in carried], True)
                for k in carried:
                    self._seeding[(k, backup)] = self._seeded[(k, backup)] = msg.id
                    self._acked.pop((k, backup), None)
                self.counters["seeded_keys"] += len(carried)
                self.counters["seed_bytes"] += transport.size_of(msg.frames)
                self.send(backup, msg)  # (never acknowledged if it cannot be sent: the pushes time out naming it)
            if states:
                log.warning("FAILOVER: %s: seeding server %d with %d keys (%s)", self.name, backup, len(states),
                            keys_text([s.key for s in states]))

    @property
    def replicated(self) -> int | None:
        """The topology version after which every key this server serves has all its copies complete (seeds
        acknowledged, none refused); None while some are not."""
        if self._seeding or self.reseed or self._dropped:
            return None
        return self.version

    def failover(self, version: int, dead: frozenset[int], keys: Iterable[KeyState]) -> list[KeyState] | None:
        """A failover notice: ``dead`` servers. The keys this server now serves as their new primary, or None for a
        notice seen already. Every backup new to a key this server serves, and every backup of a key it was just
        promoted for, is put in :attr:`reseed`."""
        if version <= self.version:
            return None
        before = self.dead
        self.version, self.dead = version, dead
        self._backups.clear()
        for msg_id in [i for i, (b, _, _) in self._inflight.items() if b in dead]:
            del self._inflight[msg_id]
        for pair in [p for p in self._seeding if p[1] in dead]:
            del self._seeding[pair]
        for pair in [p for p in self._dropped if p[1] in dead]:
            self._dropped.discard(pair)
        self.reseed = {b: ks for b, ks in self.reseed.items() if b not in dead}
        promoted = []
        for state in keys:
            old = replicas.live_copies(state.home, self.count, self.num_servers, before)
            new = replicas.live_copies(state.home, self.count, self.num_servers, dead)
            if not new or new[0] != self.rank:
                continue
            was_primary = bool(old) and old[0] == self.rank
            if not was_primary:
                promoted.append(state)
            for b in new[1:]:
                if not (was_primary and b in old[1:]):
                    self.reseed.setdefault(b, set()).add(state.key)
                    self._dropped.discard((state.key, b))
        return promoted


def keys_text(keys: list[int]) -> str:
    """Keys for a log line: the first 20 in order, and how many more."""
    keys = sorted(keys)
    return ", ".join(map(str, keys[:20])) + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")


@dataclass
class Incoming:
    """One update of a REPLICATE request, checked: the key, how the primary applied it, and where it came from."""

    state: KeyState
    version: int  # the key's version before it, on the primary
    hp: dict[str, Any] | None
    worker: int | None  # ASP/SSP: the push's worker and step; BSP: None (the step is the version)
    step: int
    grad: torch.Tensor | None  # None: a step no worker had a gradient for (it only versions the key)

    def held(self) -> bool:
        """This copy applied it already (a late or repeated forward): acknowledged, not applied again."""
        if self.worker is not None:
            return self.step <= self.state.last_step.get(self.worker, -1)
        return self.state.version > self.version


@dataclass
class Replicate:
    """A REPLICATE request, checked whole: its id, the sending server (name, rank) and its updates."""

    request_id: int
    src: str
    sender: int
    updates: list[Incoming]


def read_replicate(msg: Message, replication: Replication, num_workers: int, check_hp: CheckHp,
                   state_of: Callable[[KeyEntry], KeyState], decode: Decode) -> Replicate:
    """Check a whole REPLICATE request before anything changes (ProtocolError naming the problem): from the server
    the coordinator's topology makes the primary of each key, keys held here, well-typed fields, uncompressed
    gradients of the keys' sizes, and no update a BSP copy would have to skip others to apply. A refusal names no
    key's version or size (they are logged here): a peer learns nothing it could forge an update with."""
    sender = replication.sender(msg.src, "a replicate request")
    if msg.fused:
        raise ProtocolError(ErrorCode.BAD_HEADER, "a replicate request carries no fused frame")
    out: list[Incoming] = []
    seen: set[int] = set()
    for entry, frames in msg.entries():
        state = state_of(entry)
        what = f"replicate of key {state.key}"  # (not its name or size: a refusal tells a forger nothing)
        if state.key in seen:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: the key appears twice in one replicate request")
        seen.add(state.key)
        replication.check_primary(state.home, sender, what)
        version, hp, worker, step = entry.get("version"), entry.get("hp"), entry.get("worker"), entry.get("step", 0)
        if not is_int(version, 0, UNBOUNDED):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'version' must be a non-negative integer")
        if hp is not None:
            checked = read_hp([hp])
            assert checked is not None
            hp = checked[0]
            check_hp(state.group, hp)
        if worker is not None and not is_int(worker, 0, num_workers):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'worker' must be a worker rank")
        if entry.get("codec", "none") != "none":
            raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: updates travel uncompressed")
        if entry.get("ng"):
            if frames:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: an update without a gradient has no frames")
            grad = None
        else:
            grad = decode(entry, frames, state.numel, torch.float32, what)
        update = Incoming(state, version, hp, worker, step, grad)
        if not update.held() and state.version < version:  # (a copy applies its primary's updates in order)
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: this copy missed updates before it",
                                detail=f"an update of version {version}, this copy is at {state.version}")
        out.append(update)
    return Replicate(msg.id, msg.src, sender, out)
