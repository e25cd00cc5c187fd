"""A server's side of checkpoints: taking its keys' state at a checkpoint's step, writing it in the background,
and restoring keys from a checkpoint (also one written by another number of servers).

When worker 0 asks for checkpoint V (with its push of step V - 1, see :mod:`zps.protocol.checkpoint`):

* BSP: each key's values and torch.optim state are copied the moment the key reaches version V (no key can move
  on to V + 1 before every key reached V, so the copies form a consistent cut), then written in a thread;
* ASP / SSP: every key is copied at once, at that message, and its version recorded.

A restored key gets its values, its optimizer state (element-wise tensors sliced to the range it now covers,
scalar ones such as Adam's step copied), its version, learning rate and the push record that keeps each push
applied once.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.messages import ErrorCode, ProtocolError

from .store import KeyState, Optimizers

log = logging.getLogger("zps.server")

Report = Callable[[int, str, int, dict[str, Any]], None]  # (checkpoint, file, size, info) -> the coordinator


_DONE = object()  # the end of a streamed part's tensors


@dataclass
class _Pending:
    """A checkpoint being taken: the copies so far (or, streamed, a writer that has them), by key."""

    checkpoint: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, dict[str, Any]] = field(default_factory=dict)
    stream: queue.Queue[Any] | None = None  # streamed: (name, tensor) items for the writer thread, then _DONE, meta
    writer: threading.Thread | None = None


class Checkpoints:
    """The checkpoints of one server. ``report`` tells the coordinator a part is on disk.

    Once every key has its optimizer state (after the first step), a part is streamed: its layout is fixed when the
    first key is copied, and a thread writes each copy into the file as soon as it is taken, so the copying (at the
    step) and the writing overlap, and each copy is freed once written. Before that (checkpoint 1 of a fresh job) the
    copies are gathered and written at the end."""

    def __init__(self, root: str, rank: int, mode: str, report: Report,
                 observe: Callable[[float], None] | None = None) -> None:
        """``observe(seconds)``: how long each part took to write (the server's metrics)."""
        self.root = root
        self.observe = observe
        self.rank = rank
        self.mode = mode
        self.report = report
        self.latest = 0  # the newest checkpoint asked for (sent back in VALUES replies, so every worker saves too)
        self.optimizer: tuple[str, list[dict[str, Any]]] | None = None  # as rank 0 declared it
        self._pending: _Pending | None = None
        self._writers: list[threading.Thread] = []

    def request(self, checkpoint: int) -> None:
        """Worker 0 asks for checkpoint ``checkpoint`` (taken by :meth:`after_apply`)."""
        if checkpoint <= self.latest:
            return
        if self._pending is not None:
            log.warning("server:%d: checkpoint %d was not complete when %d was asked for; dropping it",
                        self.rank, self._pending.checkpoint, checkpoint)
            if self._pending.stream is not None:
                self._pending.stream.put(None)  # the writer throws its file away
        self.latest = checkpoint
        self._pending = _Pending(checkpoint)

    def after_apply(self, updated: list[KeyState], keys: dict[int, KeyState], optimizers: Optimizers,
                    clocks: dict[int, int]) -> None:
        """After updates were applied: BSP copies the keys that just reached the pending checkpoint's version (the
        cut is complete once every key did); ASP and SSP copy every key at once."""
        pending = self._pending
        if pending is None:
            return
        if pending.stream is None and not pending.keys:
            self._start_stream(pending, keys, optimizers)
        if self.mode == "bsp":
            self._copy([s for s in updated if s.version == pending.checkpoint and s.key not in pending.keys],
                       optimizers)
        else:
            self._copy(list(keys.values()), optimizers)
        if len(pending.keys) == len(keys):
            self._finish(keys, clocks)

    def _path(self, checkpoint: int) -> Path:
        return ckpt.directory(self.root, checkpoint) / ckpt.part_name("server", self.rank)

    def _start_stream(self, pending: _Pending, keys: dict[int, KeyState], optimizers: Optimizers) -> None:
        """Fix the part's layout from every key's current state and start its writer (when every key has its
        optimizer state; the shapes and dtypes of torch.optim's state do not change from step to step)."""
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for s in sorted(keys.values(), key=lambda s: s.key):
            state = optimizers.by_group[s.group].state.get(s.param, {}) if s.param is not None else {}
            if s.param is None or not state:
                return
            layout.append((f"{s.key}.param", s.param.dtype, tuple(s.param.shape)))
            layout += [(f"{s.key}.state.{name}", v.dtype, tuple(v.shape)) for name, v in state.items()
                       if isinstance(v, torch.Tensor)]
        # the metadata is known at the end: keep room for it (per key: its record, and a step per worker)
        workers = max((len(s.last_step) for s in keys.values()), default=0)
        reserve = 4096 + len(keys) * (400 + 40 * workers) + sum(len(json.dumps(s.name)) for s in keys.values())
        try:
            writer = ckpt.PartWriter(self._path(pending.checkpoint), layout, reserve)
        except (OSError, ValueError) as exc:
            log.error("server:%d: checkpoint %d cannot be written (%s); it is skipped", self.rank,
                      pending.checkpoint, exc)
            return
        pending.stream = queue.Queue()
        pending.writer = threading.Thread(target=self._stream, args=(pending.checkpoint, writer, pending.stream),
                                          name=f"zps-ckpt-{pending.checkpoint}", daemon=True)
        self._writers = [t for t in self._writers if t.is_alive()] + [pending.writer]
        pending.writer.start()

    def _copy(self, states: list[KeyState], optimizers: Optimizers) -> None:
        pending = self._pending
        assert pending is not None
        for s in states:
            assert s.param is not None
            copies = {f"{s.key}.param": s.param.detach().clone()}
            state = optimizers.by_group[s.group].state.get(s.param, {})
            names = []
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    copies[f"{s.key}.state.{name}"] = value.detach().clone()
                    names.append(name)
            if pending.stream is not None:
                for item in copies.items():
                    pending.stream.put(item)
            else:
                pending.tensors.update(copies)
            pending.keys[s.key] = {"key": s.key, "name": s.name, "offset": s.offset, "numel": s.numel,
                                   "group": s.group, "version": s.version, "hp": s.hp, "state": names,
                                   "last_step": {str(w): step for w, step in s.last_step.items()}}

    def _finish(self, keys: dict[int, KeyState], clocks: dict[int, int]) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        meta = {"checkpoint": pending.checkpoint, "server": self.rank, "mode": self.mode,
                "optimizer": list(self.optimizer) if self.optimizer else None,
                "keys": [pending.keys[k] for k in sorted(pending.keys)],
                "clocks": {str(w): c for w, c in clocks.items()}}
        if pending.stream is not None:
            pending.stream.put(_DONE)
            pending.stream.put(meta)
            return
        thread = threading.Thread(target=self._write, args=(pending, meta), name=f"zps-ckpt-{pending.checkpoint}")
        self._writers = [t for t in self._writers if t.is_alive()] + [thread]
        thread.start()

    def _stream(self, checkpoint: int, writer: ckpt.PartWriter, items: queue.Queue[Any]) -> None:
        """The writer thread of a streamed part: each copy into its place as it comes, then the header."""
        started = time.monotonic()
        try:
            while (item := items.get()) is not _DONE:
                if item is None:  # dropped: a newer checkpoint was asked for first
                    writer.abort()
                    return
                writer.write(*item)
            meta = items.get()
            size = writer.finish(meta)
        except (OSError, ValueError) as exc:  # a full disk: this checkpoint stays incomplete, the previous one
            writer.abort()  # stays loadable
            log.error("server:%d: checkpoint %d could not be written to %s: %s", self.rank, checkpoint, writer.path,
                      exc)
            return
        if self.observe is not None:
            self.observe(time.monotonic() - started)
        self.report(checkpoint, writer.path.name, size, self._info(meta))

    @staticmethod
    def _info(meta: dict[str, Any]) -> dict[str, Any]:
        versions = [k["version"] for k in meta["keys"]]
        return {"keys": [[k["name"], k["offset"], k["numel"]] for k in meta["keys"]], "optimizer": meta["optimizer"],
                "versions": [min(versions, default=0), max(versions, default=0)]}

    def _write(self, pending: _Pending, meta: dict[str, Any]) -> None:
        path = self._path(pending.checkpoint)
        started = time.monotonic()
        try:
            size = ckpt.save_part(path, pending.tensors, meta)
            if self.observe is not None:
                self.observe(time.monotonic() - started)
        except (OSError, ValueError) as exc:  # a full disk: this checkpoint stays incomplete, the previous one stays
            log.error("server:%d: checkpoint %d could not be written to %s: %s", self.rank,  # loadable
                      pending.checkpoint, path, exc)
            return
        self.report(pending.checkpoint, path.name, size, self._info(meta))

    def wait(self, timeout: float) -> None:
        """Let the writes in progress finish (at exit: a checkpoint being written is not thrown away; one still
        being taken is, since its cut will never be complete)."""
        if self._pending is not None and self._pending.stream is not None:
            self._pending.stream.put(None)
        self._pending = None
        for thread in self._writers:
            thread.join(timeout)


class Restore:
    """Keys restored from checkpoint ``manifest`` (any number of servers wrote it): each range is assembled from the
    pieces that hold it."""

    def __init__(self, manifest: ckpt.Manifest) -> None:
        self.manifest = manifest
        self._parts: dict[int, ckpt.Part] = {}
        self.pieces: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # name -> (server, key meta), by offset
        for entry in manifest.body["servers"]:
            part = self._part(entry["rank"])
            for meta in part.meta["keys"]:
                self.pieces.setdefault(meta["name"], []).append((entry["rank"], meta))
        for found in self.pieces.values():
            found.sort(key=lambda p: p[1]["offset"])
        self.optimizer = next((s["optimizer"] for s in manifest.body["servers"] if s.get("optimizer")), None)
        self.clocks: dict[int, int] = {}
        for entry in manifest.body["servers"]:
            for worker, clock in self._part(entry["rank"]).meta.get("clocks", {}).items():
                self.clocks[int(worker)] = max(self.clocks.get(int(worker), 0), int(clock))

    def _part(self, server: int) -> ckpt.Part:
        part = self._parts.get(server)
        if part is None:
            part = self._parts[server] = self.manifest.part("server", server)
        return part

    def _refuse(self, reason: str) -> ProtocolError:
        return ProtocolError(ErrorCode.CONFLICT, f"checkpoint {self.manifest.path}: {reason}")

    def check_optimizer(self, name: str) -> None:
        saved = self.optimizer[0] if self.optimizer else None
        if saved is not None and saved.lower() != name.lower():
            raise self._refuse(f"it was written with the server optimizer {saved}, this job declares {name}: "
                               "resume with the optimizer the checkpoint was written with")

    def load(self, name: str, offset: int, numel: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """The values, optimizer state and bookkeeping of parameter ``name``'s elements [offset, offset + numel)."""
        found = self.pieces.get(name)
        if not found:
            held = ", ".join(sorted(self.pieces)[:5]) or "nothing"
            raise self._refuse(f"it holds no parameter {name!r} (it holds {held}...): a checkpoint of another model?")
        end = offset + numel
        values: list[torch.Tensor] = []
        states: dict[str, list[torch.Tensor]] = {}
        bookkeeping: dict[str, Any] = {}
        at = offset
        for server, meta in found:
            lo, hi = meta["offset"], meta["offset"] + meta["numel"]
            if hi <= at or lo >= end:
                continue
            if lo > at:
                break
            take = slice(at - lo, min(hi, end) - lo)
            part = self._part(server)
            values.append(part.tensor(f"{meta['key']}.param", take.start, take.stop))
            for state in meta["state"]:
                tensor_name = f"{meta['key']}.state.{state}"
                tensor = part.tensor(tensor_name)
                if tensor.dim() == 0:  # a scalar (a step count): the same in every piece of a parameter
                    states.setdefault(state, []).append(tensor)
                else:
                    states.setdefault(state, []).append(part.tensor(tensor_name, take.start, take.stop))
            for field_name in ("version", "group"):
                bookkeeping.setdefault(field_name, meta[field_name])
            # the hyper-parameters of the last update (a part written before 0.8 holds its learning rate only)
            bookkeeping.setdefault("hp", meta["hp"] if "hp" in meta else
                                   None if meta.get("lr") is None else {"lr": meta["lr"]})
            for worker, step in meta.get("last_step", {}).items():
                seen = bookkeeping.setdefault("last_step", {})
                seen[int(worker)] = min(seen.get(int(worker), step), step)
            at = min(hi, end)
            if at >= end:
                break
        if at < end:
            total = found[-1][1]["offset"] + found[-1][1]["numel"]
            raise self._refuse(f"it holds {name!r} with {total} elements, this job declares [{offset}:{end}]: a "
                               "checkpoint of another model?")
        state_out = {}
        for state, pieces in states.items():
            if pieces[0].dim() == 0:
                state_out[state] = pieces[0].clone()
            else:
                state_out[state] = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        value = torch.cat(values) if len(values) > 1 else values[0].clone()
        return value.to(torch.float32), state_out, bookkeeping

