"""``--metrics-out FILE``: per-step records of every worker and server, as JSON lines (format: docs/experiments.md).

Each process appends its records to a part of its own (``FILE.parts/<role>-<rank>.jsonl``, line-buffered, so a
process killed mid-run leaves every record it finished); at the end of the job the launcher puts a ``meta`` line
first and merges every part into FILE, sorted by time (:func:`merge`). Every record has ``kind``, ``role``,
``rank`` and ``t`` (wall-clock seconds).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any


def parts_dir(path: str) -> Path:
    return Path(path + ".parts")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile:
    """One process's records (a no-op without a path)."""

    def __init__(self, path: str, role: str, rank: int) -> None:
        self.role, self.rank = role, rank
        self._file = None
        if path:
            folder = parts_dir(path)
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(folder / f"{role}-{rank}.jsonl", "a", buffering=1)  # noqa: SIM115  (closed in close)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"kind": kind, "role": self.role, "rank": self.rank, "t": time.time(),
                  **{k: _clean(v) for k, v in fields.items()}}
        with contextlib.suppress(OSError, ValueError):
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def start(path: str, settings: dict[str, Any]) -> float:
    """A job begins: FILE and any parts left by an earlier job with the same FILE go; the ``meta`` record (the
    launcher's, with the job's ``settings``) is written. Returns the start time."""
    began = time.time()
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "meta", "role": "launcher", "rank": 0, "t": began, "start": began, "settings": settings}
    Path(path).write_text(json.dumps(meta) + "\n")
    return began


def merge(path: str) -> int:
    """Merge the parts into FILE (after what it holds: the meta line, an earlier attempt's records), sorted by
    time; the parts go. Returns the number of records in FILE."""
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        lines = Path(path).read_text().splitlines()
    folder = parts_dir(path)
    for part in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        lines += part.read_text(errors="replace").splitlines()
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("t"), (int, float)):
                records.append(record)
    records.sort(key=lambda r: (r.get("kind") != "meta", r["t"]))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
    shutil.rmtree(folder, ignore_errors=True)
    return len(records)
