"""One message format: a msgpack header frame plus raw buffer frames, with an explicit ``kind`` field.

Header fields (a msgpack map, validated before anything is touched):

- ``v``      protocol version (int; must equal :data:`PROTOCOL_VERSION`)
- ``kind``   one of :class:`Kind`
- ``id``     request id chosen by the sender (int >= 0); replies carry the request's id
- ``src``    sender, ``"<role>:<rank>"`` (:mod:`zps.protocol.peers`)
- ``keys``   per-key entries of data messages, each a :class:`KeyEntry` (its fields are documented there)
- ``body``   kind-specific small map (optimizer config, error reason, topology, ...)
- ``fz``     optional: float32 elements in the fused frame (see below)

Frames 1..n are the raw buffers of the keys in order (``nf`` frames each). Small uncompressed float32 keys may
instead share one fused frame, the last one: such a key has ``nf`` 0 and ``fz``, its element offset in that frame
(tensor fusion: one frame, not one per bias or norm; written by :class:`zps.protocol.tensors.FusedWriter`, read by
:class:`zps.protocol.tensors.FusedReader`). Nothing is ever unpickled.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import msgpack

from .fields import UNBOUNDED, is_int, show

# 2: fused frames of small keys; 3: a step's hyper-parameters (hp), held steps, keys without a gradient
PROTOCOL_VERSION = 3


class Kind(str, enum.Enum):
    """Message kinds. Control and data share one format; the kind says which."""

    # rendezvous (worker/server <-> coordinator)
    REGISTER = "register"
    TOPOLOGY = "topology"
    BARRIER = "barrier"
    HEARTBEAT = "heartbeat"
    DONE = "done"
    SHUTDOWN = "shutdown"
    SAVED = "saved"  # a server or worker wrote its part of a checkpoint
    NOTICE = "notice"  # the coordinator tells a member about the job (a worker gone, replaced)
    STATUS = "status"  # anyone with access asks the coordinator for the job's live view (zps top)
    # data (worker <-> server)
    INIT = "init"
    PUSH = "push"
    PULL = "pull"
    PUSH_PULL = "push_pull"
    LEAVE = "leave"
    JOIN = "join"  # a worker that joined the running job (--max-workers) asks to be counted from a step
    STATS = "stats"
    PUT = "put"  # a worker hands tensors to every other through server 0 (zps.protocol.board)
    GET = "get"
    INSPECT = "inspect"  # a worker asks for the norms and finiteness of a held BSP step's aggregate (protocol.bodies)
    # server -> server (--replicas): a primary's updates, for its backups to apply the same way
    REPLICATE = "replicate"
    # server -> server (--replicas): a primary's whole state of keys, for a backup new to them (re-replication) or
    # one that missed updates; the body names the optimizer and the failover it follows
    # (:class:`zps.protocol.bodies.SeedBody`)
    SEED = "seed"
    # embedding tables (zps.protocol.tables): declare a table; pull rows by id; push gradient rows by id
    TABLE = "table"
    ROWS_PULL = "rows_pull"
    ROWS_PUSH = "rows_push"
    # server -> server (--replicas): a primary's update of a table's rows of one home, for its backups to apply the
    # same way; a primary's whole partition of a table, in parts, for a backup new to it (zps.protocol.tables)
    TABLE_REPLICATE = "table_replicate"
    TABLE_SEED = "table_seed"
    # replies
    OK = "ok"
    VALUES = "values"
    ERROR = "error"


class KeyEntry(TypedDict, total=False):
    """One key of a data message (``keys`` in the header): the one definition of every per-key field.

    Every data message:

    - ``key``: the chunk key, its index in the sharding plan (:mod:`zps.protocol.plan`)
    - ``nf``: how many of the message's frames are this key's (0: none, or it is in the fused frame)
    - ``fz``: its element offset in the message's fused frame (then ``nf`` is 0)

    Frames that carry a tensor (INIT values, PUSH gradients, VALUES replies), as :func:`encode_entry` writes them:

    - ``codec``: the canonical codec spec of the buffers (``"none"``: the raw tensor)
    - ``meta``: the codec's small parameters for decoding (scales, seeds, shapes)
    - ``bufs``: per frame, ``[dtype name, elements]``

    PUSH / PUSH_PULL / PULL requests:

    - ``step``: the worker's step: the gradient's (push) or the version wanted (pull: BSP waits for it)
    - ``shm``: 1 -- the gradient is in the worker's shared push area of this key, not in a frame
    - ``pshm``: 1 -- answer with the values in the worker's shared pull area (the VALUES entry says 1 back)
    - ``pc``: answer with the change since this worker's last pull, encoded with this codec spec
    - ``ng``: 1 -- (a push) this worker produced no gradient for the key in this step (no frames, no codec): a key
      no worker produced one for is not stepped (torch skips a parameter whose gradient is None)

    VALUES replies:

    - ``version``: how many updates the server has applied to the key
    - ``delta``: True -- the buffers are the change to add to what the worker holds; False -- the full values
      (only with ``pc``)

    INIT requests (declare the key; rank 0 also sends its values):

    - ``name``, ``offset``, ``numel``: the parameter, and the chunk's slice of it (in elements)
    - ``dtype``: the parameter's dtype name; ``group``: the optimizer param group
    - ``shm``: ``[push offset, pull offset]`` of the key's areas in the worker's shared segment (bytes)
    - ``home``: the server the sharding plan gives the chunk (with ``--replicas``: its copies live on the servers
      :func:`zps.protocol.replicas.copies` names, and the receiver may be a backup)

    REPLICATE requests (a primary to a backup: one update it applied, to apply the same way; the gradient as
    uncompressed frames, ``codec`` ``"none"``):

    - ``version``: the key's version before the update (a backup already past it answers OK and changes nothing)
    - ``hp``: the hyper-parameters the primary applied it with: those of the key's group that differ from how its
      optimizer was built (:mod:`zps.protocol.bodies`; None: none differ)
    - ``ng``: 1 -- a step no worker had a gradient for: no frames, the key is only versioned
    - ``step``, ``worker``: the push it came from (ASP/SSP: ``worker``'s push of ``step``, recorded so that a retry
      of that push reaching this server once it is primary is applied once; BSP: ``step`` is the version)

    One REPLICATE carries the keys one optimizer step of the primary updated, and the backup steps them together
    too: every copy holds the same bits, optimizer state included.

    SEED requests (a primary to a backup: its whole state of the key; the values as uncompressed frames, then one
    frame per optimizer state tensor):

    - ``name``, ``offset``, ``numel``, ``group``, ``home``: as in INIT (a backup new to the key declares it so)
    - ``version``, ``hp``: the key's version and the hyper-parameters it was last applied with
    - ``ostate``: the torch.optim state of the key, ``[[name, dtype name, shape], ...]``, one frame each after the
      values' frames (each at most ``numel`` elements)
    - ``last``: ASP/SSP, ``[[worker, step], ...]``: the last push of each worker applied (dedupe)

    Table messages (:mod:`zps.protocol.tables`; ``key`` is the table's key): ``home`` (ROWS_PULL, ROWS_PUSH,
    TABLE_REPLICATE, TABLE_SEED) is the server whose rows they are (:func:`zps.protocol.tables.server_of`; absent:
    the receiver's own); with ``--replicas`` the receiver serves that home as its primary or holds a copy of it.
    TABLE_REPLICATE also carries ``version``, ``step``, ``worker`` and ``hp`` as REPLICATE does, and:

    - ``sightings``: True -- a frame of each row's sightings (int64: how many workers' gradients it sums) follows
      the gradient rows (BSP's aggregate of several workers)
    """

    key: int
    nf: int
    fz: int
    codec: str
    meta: dict[str, Any]
    bufs: list[list[Any]]
    step: int
    shm: int | list[int]
    pshm: int
    pc: str
    ng: int
    version: int
    delta: bool
    name: str
    offset: int
    numel: int
    dtype: str
    group: int
    home: int
    hp: dict[str, Any] | None
    worker: int
    ostate: list[list[Any]]
    last: list[list[int]]
    before: bool  # a seed: the values one version back follow the values (zps.ps.store.KeyState.before)
    sightings: bool


class ErrorCode(str, enum.Enum):
    """Why a request failed. Callers branch on the code, never on the message text."""

    BAD_HEADER = "bad_header"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    UNKNOWN_KEY = "unknown_key"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    FRAME_COUNT = "frame_count"
    FRAME_SIZE = "frame_size"
    NOT_INITIALIZED = "not_initialized"
    CONFLICT = "conflict"
    STEP_AHEAD = "step_ahead"
    BAD_OPTIMIZER = "bad_optimizer"
    BAD_CODEC = "bad_codec"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"  # over a cap (the reason names it and the setting that raises it)
    MISSING = "missing"
    DEAD = "dead"
    # --replicas: the server was failed over while the request waited there (it stops serving): not an answer. The
    # worker sends the request again to the new primary of its keys, which the coordinator's failover notice names
    # (each update is still applied once: pushes are de-duplicated on every copy)
    MOVED = "moved"
    INTERNAL = "internal"
    # the coordinator does not know the sender, a member of a running job (it restarted): the member registers
    # again with ``rejoin`` (:class:`zps.protocol.bodies.RegisterBody`) and sends its request again
    UNKNOWN_MEMBER = "unknown_member"
    # the coordinator restarted and waits for the members of the running job to rejoin: nothing new can join
    RECOVERING = "recovering"


class ProtocolError(Exception):
    """A message or request was rejected; ``code`` is an :class:`ErrorCode`. ``reason`` goes to the peer;
    ``detail`` only into the refusing role's log (what the peer must not learn: a key's version or size)."""

    def __init__(self, code: ErrorCode, reason: str, detail: str = "") -> None:
        super().__init__(f"[{code.value}] {reason}")
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    """A decoded message: header fields plus raw frames (``memoryview``-able buffers)."""

    kind: Kind
    id: int = 0
    src: str = ""
    keys: list[KeyEntry] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    frames: list[Any] = field(default_factory=list)
    fused: int = 0  # float32 elements in the fused frame, which is then the last of ``frames``

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": self.kind.value, "id": self.id, "src": self.src}
        if self.keys:
            head["keys"] = self.keys
        if self.body:
            head["body"] = self.body
        if self.fused:
            head["fz"] = self.fused
        return head

    def entries(self) -> Iterator[tuple[KeyEntry, list[Any]]]:
        """Each key entry with its own frames, in order (``nf`` of them; none for a key in the fused frame): the one
        place a message's frames are cut per key (:func:`parse_frames` checked that the counts add up)."""
        offset = 0
        for entry in self.keys:
            nf = entry.get("nf", 0)
            yield entry, self.frames[offset : offset + nf]
            offset += nf

    def to_frames(self) -> list[Any]:
        """Frame 0 the packed header, then the raw buffers as they are (no copy here)."""
        return [msgpack.packb(self.header(), use_bin_type=True), *self.frames]

    def describe(self) -> str:
        """A short one-line form for logs."""
        keys = f" keys={len(self.keys)}" if self.keys else ""
        return f"<{self.kind.value} id={self.id} src={self.src}{keys} frames={len(self.frames)}>"


MAX_REASON = 2000  # characters of an error reply's reason (it may quote what a peer sent)


def error_reply(request_id: int, src: str, code: ErrorCode, reason: str) -> Message:
    return Message(Kind.ERROR, id=request_id, src=src, body={"code": code.value, "reason": reason[:MAX_REASON]})


def raise_if_error(msg: Message) -> Message:
    """Turn an ERROR reply into a :class:`ProtocolError`; return other messages unchanged."""
    if msg.kind is Kind.ERROR:
        try:
            code = ErrorCode(msg.body.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        raise ProtocolError(code, str(msg.body.get("reason", "no reason given")))
    return msg


MAX_HEADER_BYTES = 4 << 20  # the default; servers and the coordinator take theirs from --max-header-bytes
MAX_STEP = 1 << 53  # steps are counts of updates: beyond this a step is not one a worker took
# msgpack's own limits while a header is unpacked: no header of a real message comes near them, and a small header
# cannot expand into millions of objects (a "msgpack bomb"); the longest array a real header holds is the keys of
# one message (a few thousand: zps.ps.server.MAX_KEYS_SERVED) or a per-key list under --max-keys (2^16 by default)
_UNPACK_LIMITS = {"max_str_len": 1 << 16, "max_bin_len": 1 << 16, "max_array_len": 1 << 16, "max_map_len": 1 << 16,
                  "max_ext_len": 0}


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, reason)


def decode_header(frame: Any, limit: int = MAX_HEADER_BYTES) -> Any:
    """Unpack a header frame (msgpack, size- and shape-limited); the result is checked by :func:`parse_frames`."""
    size = len(frame)
    if size > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"a header of {size} bytes is over the cap of {limit} "
                                                 "(--max-header-bytes)")
    raw_bytes = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    try:
        return msgpack.unpackb(raw_bytes, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise _bad(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None


def parse_frames(frames: Sequence[Any], head: Any = None, header_limit: int = MAX_HEADER_BYTES,
                 max_keys: int | None = None) -> Message:
    """Decode and structurally validate a multipart message; raise :class:`ProtocolError` on any defect.

    Checks the header is a msgpack map of the right version and kind with well-typed fields, and that the
    frame count equals the sum of the keys' ``nf``. Per-key semantic checks (known key, sizes) are the
    receiver's, against its own declared state. ``head``: the header already unpacked by :func:`decode_header`;
    ``max_keys``: more key entries are refused (TOO_LARGE) before any is looked at.
    """
    if not frames:
        raise _bad("empty message")
    if head is None:
        head = decode_header(frames[0], header_limit)
    if not isinstance(head, dict):
        raise _bad(f"header must be a msgpack map, got {type(head).__name__}")
    version = head.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {show(version)} is not supported (this side speaks {PROTOCOL_VERSION})",
        )
    try:
        kind = Kind(head.get("kind"))
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_KIND, f"unknown message kind {show(head.get('kind'))}") from None
    request_id = head.get("id", 0)
    if not is_int(request_id, 0, UNBOUNDED):
        raise _bad(f"'id' must be a non-negative integer, got {show(request_id)}")
    src = head.get("src", "")
    if not isinstance(src, str):
        raise _bad(f"'src' must be a string, got {type(src).__name__}")
    body = head.get("body", {})
    if not isinstance(body, dict):
        raise _bad(f"'body' must be a map, got {type(body).__name__}")
    keys = head.get("keys", [])
    if not isinstance(keys, list):
        raise _bad(f"'keys' must be a list, got {type(keys).__name__}")
    if max_keys is not None and len(keys) > max_keys:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"a message of {len(keys)} keys is over the cap of {max_keys} keys "
                                                 "per message")
    fused = head.get("fz", 0)
    if not is_int(fused, 0, UNBOUNDED):
        raise _bad(f"'fz' must be a non-negative integer, got {show(fused)}")
    expected_frames = 1 if fused else 0
    for i, entry in enumerate(keys):  # on every message: plain type() checks (bool is not int here)
        if type(entry) is not dict:
            raise _bad(f"keys[{i}] must be a map")
        key, step, nf = entry.get("key"), entry.get("step", 0), entry.get("nf", 0)
        if not is_int(key, 0, UNBOUNDED):
            raise _bad(f"keys[{i}].key must be a non-negative integer, got {show(key)}")
        if not is_int(step, 0, MAX_STEP + 1):
            raise _bad(f"keys[{i}].step must be an integer in [0, {MAX_STEP}], got {show(step)}")
        if not is_int(nf, 0, UNBOUNDED):
            raise _bad(f"keys[{i}].nf must be a non-negative integer, got {show(nf)}")
        expected_frames += nf
        if "fz" in entry:
            offset = entry["fz"]
            if not is_int(offset, 0, UNBOUNDED):
                raise _bad(f"keys[{i}].fz must be a non-negative integer, got {show(offset)}")
            if nf or not fused:
                raise _bad(f"keys[{i}] is in the fused frame ('fz') but has frames of its own or the message has no "
                           "fused frame")
    if len(frames) - 1 != expected_frames:
        raise ProtocolError(
            ErrorCode.FRAME_COUNT,
            f"header announces {expected_frames} data frames but the message carries {len(frames) - 1}",
        )
    return Message(kind, id=request_id, src=src, keys=keys, body=body, frames=list(frames[1:]), fused=fused)
