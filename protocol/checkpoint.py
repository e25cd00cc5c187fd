"""Checkpoints on disk: one directory per checkpoint, a safetensors file per server and per worker, a manifest last.

::

    DIR/ckpt-000000040/
        server-0.safetensors   each key's values and torch.optim state; metadata "zps": JSON (versions, scalars)
        server-1.safetensors
        worker-0.safetensors   the worker's error-feedback residuals and its script's tensors; metadata "zps": JSON
        worker-1.safetensors
        MANIFEST.json          written last: a directory without it is an incomplete checkpoint, never loaded

A checkpoint's id is the step it was taken at (BSP: every server holds exactly that many updates of every key; ASP
and SSP: each part records its own versions and steps). Every file is written under a temporary name, fsynced and
renamed, then the directory is fsynced, so a crash at any moment leaves the previous checkpoint intact. Nothing is
ever unpickled: tensors are safetensors, everything else JSON. The coordinator writes the manifest once every part
is on disk, then keeps the newest ``keep`` checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fields import UNBOUNDED, is_int, show
from .files import UntrustedFile, check_directory, check_entry, open_trusted, read_trusted
from .messages import MAX_STEP

if TYPE_CHECKING:  # torch and safetensors load when a part is written or read: the launcher never imports them
    import torch

FORMAT = 1
MANIFEST = "MANIFEST.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_PARTS = 1 << 16  # parts of one role in a checkpoint (one per server or worker rank)
MAX_PART_HEADER = 100 << 20  # a part's safetensors header (safetensors itself refuses larger)
_DIR = re.compile(r"^ckpt-(\d{9})$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or does not fit this job; the message names the file."""


def directory(root: str | os.PathLike[str], checkpoint: int) -> Path:
    """The directory of checkpoint ``checkpoint`` (its step) under ``root``."""
    return Path(root) / f"ckpt-{checkpoint:09d}"


def number(path: str | os.PathLike[str]) -> int | None:
    """The step of the checkpoint directory ``path`` names (``.../ckpt-000000040``: 40); None for another name."""
    found = _DIR.match(Path(path).name)
    return int(found.group(1)) if found else None


def part_name(role: str, rank: int) -> str:
    return f"{role}-{rank}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory: all or nothing, even across a power loss."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def make_directory(path: Path) -> None:
    """Make the checkpoint directory ``path`` (and ``--checkpoint-dir`` above it) unless it exists, and refuse
    (UntrustedFile) one that another user made or could write, or a link: a job never writes where another user's
    link points (issue 22: ``ckpt-000000050 -> /root/.ssh`` planted in a 1777 directory)."""
    path.mkdir(parents=True, exist_ok=True)
    check_directory(path.parent)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedFile(f"{path} is a link")
    check_directory(path)
    if info.st_uid != os.getuid():
        raise UntrustedFile(f"{path} belongs to another user (uid {info.st_uid})")


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically."""
    make_directory(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    _commit(Path(tmp), path)


# torch dtype name -> the safetensors dtype of a part's tensors
_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_part(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """Write one part of a checkpoint (tensors, plus ``meta`` as JSON in the file's metadata) atomically; its size.
    A crash mid-write leaves a ``.tmp`` file that nothing reads.

    The file is the safetensors format (read back by ``safetensors.safe_open``), written here by streaming each
    CPU tensor's own memory to the file: no serialised copy of the whole part in memory (``save_file`` makes
    one), and the interpreter lock is free while the bytes go to disk, so a server writing a part in a thread
    keeps serving."""
    import torch

    header: dict[str, Any] = {}
    offset = 0
    flat = {}
    for name, tensor in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"checkpoint tensor {name!r} has dtype {tensor.dtype}, which a part cannot hold")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        flat[name] = data
        size = data.numel() * data.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"zps": json.dumps(meta)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    make_directory(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for data in flat.values():
                if data.numel():
                    f.write(data.view(torch.uint8).numpy().data)
        _commit(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


class PartWriter:
    """A part written while its tensors are still being taken: ``layout`` (every tensor's name, dtype and shape, in
    file order) fixes each tensor's place up front, :meth:`write` puts one there as soon as it exists (the copying
    and the writing overlap), :meth:`finish` writes the header with ``meta`` (known only at the end, so
    ``meta_reserve`` bytes are kept for it), fsyncs and renames. The file is the same safetensors file
    :func:`save_part` writes."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], meta_reserve: int) -> None:
        self.path = path
        self._places: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._entries: dict[str, Any] = {}
        offset = 0
        for name, dtype, shape in layout:
            kind = _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
            if kind is None:
                raise ValueError(f"checkpoint tensor {name!r} has dtype {dtype}, which a part cannot hold")
            size = math.prod(shape) * dtype.itemsize
            self._places[name] = (offset, size, dtype, shape)
            self._entries[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.data_size = offset
        self._head_size = len(self._header("x" * meta_reserve)) + 8
        self._head_size += -self._head_size % 8
        self._written: set[str] = set()
        make_directory(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self._fd, self._tmp = fd, Path(tmp)

    def _header(self, meta: str) -> bytes:
        return json.dumps({**self._entries, "__metadata__": {"zps": meta}}, separators=(",", ":")).encode()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (a CPU tensor of the layout's dtype and shape) at its place; the lock of the
        interpreter is free while the bytes go to the file."""
        import torch

        offset, size, dtype, shape = self._places[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the layout said "
                             f"{dtype} {shape}")
        data: memoryview = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
        position = 8 + self._head_size + offset
        while data:
            done = os.pwrite(self._fd, data, position)
            data, position = data[done:], position + done
        self._written.add(name)

    def finish(self, meta: Mapping[str, Any]) -> int:
        """Write the header with ``meta``, fsync, rename into place; the file's size. ValueError when a tensor of
        the layout was never written or ``meta`` does not fit the space kept for it."""
        try:
            missing = set(self._places) - self._written
            if missing:
                raise ValueError(f"checkpoint part {self.path.name}: {len(missing)} tensors never written")
            head = self._header(json.dumps(meta))
            if len(head) > self._head_size:
                raise ValueError(f"checkpoint part {self.path.name}: its metadata outgrew the {self._head_size} "
                                 "bytes kept for it")
            head += b" " * (self._head_size - len(head))
            os.pwrite(self._fd, self._head_size.to_bytes(8, "little") + head, 0)
            os.close(self._fd)
            self._fd = -1
            _commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path.stat().st_size

    def abort(self) -> None:
        """Throw the unfinished file away."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


class Part:
    """One part of a checkpoint, opened for reading: its JSON ``meta`` and its tensors, read on demand (slices
    read only the bytes they need)."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            actual = _trusted_part(path).st_size
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read it ({exc.strerror})") from None
        if size is not None and actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, the manifest says {size}: truncated or replaced")
        try:
            self._file = safe_open(str(path), framework="pt")
            meta = self._file.metadata() or {}
            self.meta: dict[str, Any] = json.loads(meta["zps"])
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{path}: not a readable zps checkpoint part ({type(exc).__name__}: {exc})") from None
        self.names = set(self._file.keys())

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (1-D), or its elements ``[start:stop]``."""
        if name not in self.names:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        try:
            if start is None:
                return self._file.get_tensor(name)
            return self._file.get_slice(name)[start:stop]
        except Exception as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({exc})") from None


@dataclass(frozen=True)
class Manifest:
    """A complete checkpoint: its directory and what MANIFEST.json says (see :func:`manifest_body`)."""

    path: Path
    body: dict[str, Any]

    @property
    def checkpoint(self) -> int:
        return int(self.body["checkpoint"])

    def part(self, role: str, rank: int) -> Part:
        """The part written by ``role`` ``rank``, checked against the size the manifest recorded."""
        for entry in self.body[f"{role}s"]:
            if entry["rank"] == rank:
                return Part(self.path / entry["file"], entry["size"])
        raise CheckpointError(f"{self.path / MANIFEST}: no {role} {rank} in this checkpoint "
                              f"(it has {len(self.body[f'{role}s'])} {role}s)")


def _trusted_part(path: Path) -> os.stat_result:
    """The ``lstat`` of a part: a regular file of this user (or root), not a link (UntrustedFile otherwise)."""
    info = check_entry(path)
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedFile(f"{path} is not a regular file")
    return info


def check_checkpoint_directory(path: Path) -> None:
    """UntrustedFile unless checkpoint directory ``path`` is a directory (not a link) of this user or root that no
    other user can write, in a ``--checkpoint-dir`` no other user can write (sticky, like /tmp, allowed)."""
    info = check_entry(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedFile(f"{path} is a link")
    check_directory(path)


def _read_manifest_body(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    try:
        check_checkpoint_directory(path)
        body = json.loads(read_trusted(manifest, limit=MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise CheckpointError(f"{manifest} does not exist: {path} is not a complete checkpoint") from None
    except UntrustedFile as exc:
        raise CheckpointError(f"{exc}: a checkpoint another user could have written is never loaded") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest}: unreadable ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{manifest}: format {body.get('format') if isinstance(body, dict) else '?'!r}, "
                              f"this zps reads format {FORMAT}")
    if not is_int(body.get("checkpoint"), 0, MAX_STEP + 1) or not isinstance(body.get("settings", {}), dict):
        raise CheckpointError(f"{manifest}: 'checkpoint' must be a step in [0, {MAX_STEP}] and 'settings' a map")
    for role in ("server", "worker"):
        entries = body.get(f"{role}s", [])
        if not isinstance(entries, list) or len(entries) > MAX_PARTS:
            raise CheckpointError(f"{manifest}: '{role}s' must be a list of at most {MAX_PARTS} parts")
        for entry in entries:
            if not isinstance(entry, dict) or not is_int(entry.get("rank"), 0, MAX_PARTS):
                raise CheckpointError(f"{manifest}: every part of '{role}s' is a map with its 'rank'")
            if entry.get("file") != part_name(role, entry["rank"]):  # a plain name: no path, no other file
                raise CheckpointError(f"{manifest}: the part of {role} {entry['rank']} must be the file "
                                      f"{part_name(role, entry['rank'])!r}, it names {show(entry.get('file'))}")
            if not is_int(entry.get("size"), 0, UNBOUNDED):
                raise CheckpointError(f"{manifest}: the part of {role} {entry['rank']} has no 'size'")
            digest = entry.get("sha256")
            if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise CheckpointError(f"{manifest}: the part of {role} {entry['rank']}: 'sha256' is not a digest")
    return body


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The checkpoint in directory ``path``; CheckpointError naming the file when it is incomplete, damaged, or
    another user could have written it (:mod:`.files`). Every part must be a plain file named as the manifest's
    writer names it, of this user, with the size the manifest recorded."""
    path = Path(path)
    body = _read_manifest_body(path)
    manifest = path / MANIFEST
    for role in ("server", "worker"):
        for entry in body.get(f"{role}s", []):
            file = path / entry["file"]
            try:
                size = _trusted_part(file).st_size
            except FileNotFoundError:
                raise CheckpointError(f"{file} is missing (listed in {manifest})") from None
            except OSError as exc:
                raise CheckpointError(f"{file}: {exc.strerror}; a part another user could have written is never "
                                      "loaded") from None
            if size != entry["size"]:
                raise CheckpointError(f"{file}: {size} bytes, {manifest} says {entry['size']}: truncated or "
                                      "replaced")
    return Manifest(path, body)


def digest(path: Path) -> str:
    """The SHA-256 of a part, as the manifest records it (read through :func:`.files.open_trusted`)."""
    sha = hashlib.sha256()
    with os.fdopen(open_trusted(path), "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


# safetensors dtype -> bytes per element
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _step(value: Any) -> bool:
    return is_int(value, 0, MAX_STEP + 1)


def _check_layout(header: Any, data_size: int, where: str) -> dict[str, int]:
    """A part's safetensors header: each tensor's dtype, shape and bytes, packed in order in exactly the data there
    is. The elements of each tensor, by name; CheckpointError naming the problem."""
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{where}: its header is not a safetensors header")
    numels: dict[str, int] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in _ITEMSIZE and isinstance(info.get("shape"), list)
                and all(is_int(d, 0, UNBOUNDED) for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2 and all(is_int(o, 0, UNBOUNDED) for o in info["data_offsets"])):
            raise CheckpointError(f"{where}: tensor {show(name)} has no dtype, shape and data offsets")
        begin, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if end - begin != numel * _ITEMSIZE[info["dtype"]]:
            raise CheckpointError(f"{where}: tensor {show(name)} takes {end - begin} bytes, its shape "
                                  f"{info['shape']} {info['dtype']} needs {numel * _ITEMSIZE[info['dtype']]}")
        numels[name] = numel
        spans.append((begin, end))
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{where}: its tensors overlap or leave gaps (at byte {at})")
        at = end
    if at != data_size:
        raise CheckpointError(f"{where}: its tensors take {at} bytes, the file holds {data_size} after the header")
    return numels


def _check_server_meta(meta: dict[str, Any], numels: dict[str, int], where: str) -> None:
    keys = meta.get("keys")
    if not isinstance(keys, list) or not isinstance(meta.get("clocks", {}), dict):
        raise CheckpointError(f"{where}: its metadata has no 'keys'")
    for worker, clock in meta.get("clocks", {}).items():
        if not (isinstance(worker, str) and worker.isdecimal() and len(worker) < 10 and _step(clock)):
            raise CheckpointError(f"{where}: 'clocks' must map worker ranks to steps in [0, {MAX_STEP}]")
    for k in keys:
        if not (isinstance(k, dict) and is_int(k.get("key"), 0, UNBOUNDED) and isinstance(k.get("name"), str)
                and is_int(k.get("offset"), 0, UNBOUNDED) and is_int(k.get("numel"), 0, UNBOUNDED)
                and is_int(k.get("group", 0), 0, 1 << 10) and _step(k.get("version"))
                and isinstance(k.get("state", []), list) and isinstance(k.get("last_step", {}), dict)
                and (k.get("hp") is None or isinstance(k.get("hp"), dict))):
            raise CheckpointError(f"{where}: a key's record must hold its key, name, offset, numel, group, and a "
                                  f"'version' in [0, {MAX_STEP}], got {show(k)}")
        if numels.get(f"{k['key']}.param") != k["numel"]:
            raise CheckpointError(f"{where}: key {k['key']}: its values are not the {k['numel']} elements recorded")
        for name in k.get("state", []):
            if not isinstance(name, str) or f"{k['key']}.state.{name}" not in numels:
                raise CheckpointError(f"{where}: key {k['key']}: optimizer state {show(name)} is not in the part")
        for worker, step in k.get("last_step", {}).items():
            if not (isinstance(worker, str) and worker.isdecimal() and len(worker) < 10 and _step(step)):
                raise CheckpointError(f"{where}: key {k['key']}: 'last_step' must map worker ranks to steps in "
                                      f"[0, {MAX_STEP}]")


def verify(manifest: Manifest) -> None:
    """Check every part of ``manifest`` before anything starts (the launcher does): its content hash where the
    manifest records one, its safetensors header (each tensor's dtype, shape and bytes, in exactly the file's size)
    and its metadata (steps, versions and clocks within [0, 2^53], each key's values and optimizer state present).
    CheckpointError names the file and what is wrong."""
    for role in ("server", "worker"):
        for entry in manifest.body.get(f"{role}s", []):
            path = manifest.path / entry["file"]
            sha = hashlib.sha256()
            try:
                with os.fdopen(open_trusted(path), "rb") as f:
                    prefix = f.read(8)
                    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
                    if not 0 < length <= min(MAX_PART_HEADER, entry["size"] - 8):
                        raise CheckpointError(f"{path}: not a safetensors file (a header of {length} bytes)")
                    raw = f.read(length)
                    sha.update(prefix)
                    sha.update(raw)
                    while chunk := f.read(1 << 22):
                        sha.update(chunk)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read it ({exc.strerror})") from None
            if entry.get("sha256") is not None and sha.hexdigest() != entry["sha256"]:
                raise CheckpointError(f"{path}: its content is not what {manifest.path / MANIFEST} recorded "
                                      "(SHA-256): damaged or replaced")
            try:
                header = json.loads(raw)
                meta = json.loads(header["__metadata__"]["zps"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: its header is damaged ({type(exc).__name__}: {exc})") from None
            numels = _check_layout(header, entry["size"] - 8 - length, str(path))
            if not isinstance(meta, dict) or meta.get("checkpoint") != manifest.checkpoint:
                raise CheckpointError(f"{path}: its metadata is not that of checkpoint {manifest.checkpoint}")
            if role == "server":
                _check_server_meta(meta, numels, str(path))
            elif not _step(meta.get("steps", 0)):
                raise CheckpointError(f"{path}: 'steps' must be in [0, {MAX_STEP}]")


def manifest_body(checkpoint: int, settings: Mapping[str, Any], servers: list[dict[str, Any]],
                  workers: list[dict[str, Any]]) -> dict[str, Any]:
    """MANIFEST.json (the coordinator writes it once every part is on disk): the checkpoint's step, the job's
    settings that matter to a resume, and one entry per part -- ``rank``, ``file``, ``size``, and what the part
    said of itself (servers: ``keys`` as [name, offset, numel], ``optimizer``, ``versions``; worker 0 also
    ``params`` as [name, shape])."""
    return {"format": FORMAT, "checkpoint": checkpoint, "settings": dict(settings),
            "servers": sorted(servers, key=lambda p: p["rank"]), "workers": sorted(workers, key=lambda p: p["rank"])}


def _candidates(root: Path) -> list[Path]:
    """The directories under ``root`` that look like complete checkpoints, oldest first (trusted or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _DIR.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def _trusted(path: Path) -> bool:
    try:
        check_checkpoint_directory(path)
        return True
    except OSError:
        return False


def complete(root: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first: only directories of this user (or root) that no other
    user can write (:func:`check_checkpoint_directory`); what another user planted there is not one."""
    return [p for p in _candidates(Path(root)) if _trusted(p)]


def resolve(path: str | os.PathLike[str]) -> Manifest:
    """``path`` is a checkpoint directory, or a ``--checkpoint-dir`` holding checkpoints: the (newest) complete one.
    A checkpoint directory another user could have written, newer than the newest of this user's, is refused by
    name rather than passed over in silence."""
    path = Path(path)
    if (path / MANIFEST).exists() or _DIR.match(path.name):
        return read_manifest(path)
    try:
        check_directory(path)
    except OSError as exc:
        raise CheckpointError(f"{exc.strerror}: checkpoints there could be another user's") from None
    found = _candidates(path)
    if not found:
        raise CheckpointError(f"{path} holds no complete checkpoint (a ckpt-NNNNNNNNN directory with {MANIFEST})")
    return read_manifest(found[-1])


def prune(root: str | os.PathLike[str], keep: int, newest: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; remove older ones and incomplete ones older than ``newest``."""
    root = Path(root)
    done = complete(root)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        m = _DIR.match(p.name)
        if m and int(m.group(1)) < newest and not (p / MANIFEST).exists():
            shutil.rmtree(p, ignore_errors=True)

