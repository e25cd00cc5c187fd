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

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load when a part is written or read: the launcher never imports them
    import torch

FORMAT = 1
MANIFEST = "MANIFEST.json"
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


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
    path.parent.mkdir(parents=True, exist_ok=True)
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
        path.parent.mkdir(parents=True, exist_ok=True)
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
            actual = path.stat().st_size
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


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The checkpoint in directory ``path``; CheckpointError naming the file when it is incomplete or damaged.
    Every part's file must exist with the size the manifest recorded."""
    path = Path(path)
    manifest = path / MANIFEST
    try:
        body = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest} does not exist: {path} is not a complete checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest}: unreadable ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{manifest}: format {body.get('format') if isinstance(body, dict) else '?'!r}, "
                              f"this zps reads format {FORMAT}")
    for role in ("server", "worker"):
        for entry in body.get(f"{role}s", []):
            file = path / str(entry.get("file"))
            try:
                size = file.stat().st_size
            except OSError:
                raise CheckpointError(f"{file} is missing (listed in {manifest})") from None
            if size != entry.get("size"):
                raise CheckpointError(f"{file}: {size} bytes, {manifest} says {entry.get('size')}: truncated or "
                                      "replaced")
    return Manifest(path, body)


def manifest_body(checkpoint: int, settings: Mapping[str, Any], servers: list[dict[str, Any]],
                  workers: list[dict[str, Any]]) -> dict[str, Any]:
    """MANIFEST.json (the coordinator writes it once every part is on disk): the checkpoint's step, the job's
    settings that matter to a resume, and one entry per part -- ``rank``, ``file``, ``size``, and what the part
    said of itself (servers: ``keys`` as [name, offset, numel], ``optimizer``, ``versions``; worker 0 also
    ``params`` as [name, shape])."""
    return {"format": FORMAT, "checkpoint": checkpoint, "settings": dict(settings),
            "servers": sorted(servers, key=lambda p: p["rank"]), "workers": sorted(workers, key=lambda p: p["rank"])}


def complete(root: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _DIR.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def resolve(path: str | os.PathLike[str]) -> Manifest:
    """``path`` is a checkpoint directory, or a ``--checkpoint-dir`` holding checkpoints: the (newest) complete one."""
    path = Path(path)
    if (path / MANIFEST).exists() or _DIR.match(path.name):
        return read_manifest(path)
    found = complete(path)
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

