"""A server's tables in checkpoints: their rows taken at the checkpoint's step, written beside the server's part,
and read back (re-spread by :func:`zps.protocol.tables.server_of` when the job resumes on another number of
servers).

Checkpoint V of a table is its state after V steps (BSP; ASP and SSP: when the request reaches it). The servers
hear of V from worker 0's dense push (:mod:`._checkpoint`) and from the table pushes of step V, which every worker
marks once the servers told it of V; a table is copied the moment it is at step V, all tables of the server then
written in a thread to ``server-<rank>.tables.safetensors`` (per table ``<name>.ids``, ``.values``, ``.touched``,
``.state.<name>``, ``.sketch``; its spec, version, step counts and push record in the JSON metadata). The server's
own part is reported to the coordinator only once that file is on disk, naming it (``tables``: file and size in
the manifest's entry), so a complete checkpoint always holds its tables; a server holding no dense key writes an
empty part of its own for the same reason.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.protocol.tables import TableSpec, read_table, server_of

from ._checkpoint import Checkpoints, Report
from ._tables import Table, Tables

log = logging.getLogger("zps.server")


def tables_file(rank: int) -> str:
    return f"server-{rank}.tables.safetensors"


class TableCheckpoints:
    """The table side of server ``rank``'s checkpoints (``checkpoints``: its dense side, whose part waits for this
    one's; ``timeout``: how long it waits)."""

    def __init__(self, root: str, rank: int, tables: Tables, checkpoints: Checkpoints, timeout: float,
                 dense_now: Callable[[], None]) -> None:
        self.root, self.rank, self.tables, self.checkpoints, self.timeout = root, rank, tables, checkpoints, timeout
        self.dense_now = dense_now  # let the dense side finish a part with no keys
        self.asked = 0  # the newest checkpoint asked for
        self._done = 0  # the newest checkpoint whose tables were all taken
        self._copies: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._written: dict[int, threading.Event] = {}
        self._files: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        report = checkpoints.report
        checkpoints.report = self._gate(report)
        tables.on_applied = self.after_apply

    def _event(self, checkpoint: int) -> threading.Event:
        with self._lock:
            found = self._written.get(checkpoint)
            if found is None:
                found = self._written[checkpoint] = threading.Event()
                for old in [c for c in self._written if c < checkpoint - 8]:
                    del self._written[old]
            return found

    def ask(self, checkpoint: int) -> None:
        """Checkpoint ``checkpoint`` was asked for (a dense push of worker 0, or a table push)."""
        if checkpoint <= self.asked:
            return
        if self._copies:
            log.warning("server:%d: the tables of checkpoint %d were not all at its step when %d was asked for; "
                        "dropping it", self.rank, self.asked, checkpoint)
        self.asked, self._copies = checkpoint, {}
        self.checkpoints.request(checkpoint)
        for table in self.tables:
            self._take(table)
        self._maybe_write()

    def after_apply(self, table: Table) -> None:
        if self.asked > self._done and table.name not in self._copies:
            self._take(table)
            self._maybe_write()

    def _take(self, table: Table) -> None:
        if table.name in self._copies or (table.mode == "bsp" and table.version != self.asked):
            if table.mode == "bsp" and table.version > self.asked and table.name not in self._copies:
                log.error("server:%d: table %r is at step %d, past checkpoint %d: it is not taken", self.rank,
                          table.name, table.version, self.asked)
            return
        tensors, meta = table.store.export()
        meta.update({"spec": table.spec.to_body(), "version": table.version,
                     "last_step": {str(w): s for w, s in table.last_step.items()}})
        self._copies[table.name] = (tensors, meta)

    def _maybe_write(self) -> None:
        if not self.asked or len(self._copies) < len(self.tables) or not self._copies:
            return
        checkpoint, copies, self._copies = self.asked, self._copies, {}
        self._done = checkpoint
        threading.Thread(target=self._write, args=(checkpoint, copies), name=f"zps-tables-{checkpoint}",
                         daemon=True).start()
        self.dense_now()

    def _write(self, checkpoint: int, copies: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
        path = ckpt.directory(self.root, checkpoint) / tables_file(self.rank)
        tensors = {f"{name}.{k}": v for name, (found, _) in copies.items() for k, v in found.items()}
        meta = {"checkpoint": checkpoint, "server": self.rank, "tables": {n: m for n, (_, m) in copies.items()}}
        try:
            size = ckpt.save_part(path, tensors, meta)
        except (OSError, ValueError) as exc:
            log.error("server:%d: the tables of checkpoint %d could not be written to %s: %s", self.rank, checkpoint,
                      path, exc)
            return
        self._files[checkpoint] = {"file": path.name, "size": size}
        self._event(checkpoint).set()

    def _gate(self, report: Report) -> Report:
        """The server's part is reported once its tables' file is on disk (none: at once)."""
        def gated(checkpoint: int, file: str, size: int, info: dict[str, Any]) -> None:
            if len(self.tables):
                if not self._event(checkpoint).wait(self.timeout):
                    log.error("server:%d: checkpoint %d: the tables were not written within %.0fs; the part is not "
                              "reported (the previous checkpoint stays the newest)", self.rank, checkpoint,
                              self.timeout)
                    return
                info = {**info, "tables": self._files[checkpoint]}
            report(checkpoint, file, size, info)
        return gated


def restore(resume: str, spec: TableSpec, rank: int, num_servers: int) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]] | None:
    """The rows of table ``spec`` this server holds in the checkpoint at ``resume`` (from every server that wrote
    some, whatever their number), merged; None when the checkpoint has no such table (one declared since)."""
    try:
        manifest = ckpt.resolve(resume)
        found: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
        for entry in manifest.body["servers"]:
            where = entry.get("tables")
            if where is None:
                continue
            part = ckpt.Part(manifest.path / where["file"], where["size"])
            meta = part.meta["tables"].get(spec.name)
            if meta is None:
                continue
            saved = read_table(meta["spec"])
            if not saved.same(spec):
                raise ProtocolError(ErrorCode.CONFLICT, f"checkpoint {manifest.path}: table {spec.name!r} was "
                                                        f"declared otherwise there ({meta['spec']})")
            ids = part.tensor(f"{spec.name}.ids")
            keep = server_of(ids, num_servers) == rank
            tensors = {name.removeprefix(f"{spec.name}."): part.tensor(name)
                       for name in part.names if name.startswith(f"{spec.name}.")}
            rows = {k: v[keep] for k, v in tensors.items() if k != "sketch"}
            if "sketch" in tensors and (entry["rank"] == rank or len(manifest.body["servers"]) != num_servers):
                rows["sketch"] = tensors["sketch"]
            found.append((rows, meta))
    except ckpt.CheckpointError as exc:
        raise ProtocolError(ErrorCode.CONFLICT, str(exc)) from None
    if not found:
        return None
    merged = {k: torch.cat([f[0][k] for f in found]) for k in found[0][0] if k != "sketch"}
    sketches = [f[0]["sketch"] for f in found if "sketch" in f[0]]
    if sketches:  # a sketch never undercounts: the sum of the old servers' still does not
        merged["sketch"] = torch.stack(sketches).sum(0).to(torch.int32)
    metas = [f[1] for f in found]
    last: dict[str, int] = {}
    for m in metas:
        for w, s in m.get("last_step", {}).items():
            last[w] = min(last.get(w, s), s)
    meta = {"version": min(m["version"] for m in metas), "steps": max(m["steps"] for m in metas),
            "clock": max(m["clock"] for m in metas), "last_step": last}
    log.info("server:%d: table %r resumed with %d rows from %s", rank, spec.name, merged["ids"].numel(),
             Path(manifest.path).name)
    return merged, meta
