"""What ``zps experiment`` makes of the records of ``--metrics-out`` (format: docs/experiments.md): one run's
numbers (:func:`summarize_run`), its accuracy curve (:func:`curve`), and the markdown table over seeds
(:func:`markdown_table`). Pure functions of the records: nothing here runs or reads anything but a file.

Every per-step number is per *worker step* (one push and pull of the whole model by one worker). Time is counted
from the start of the job's first step (the processes' start-up and the script's data loading are not in it).
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = Mapping[str, Any]
_STEP_TIME = ("compute", "encode", "wait", "decode")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``--metrics-out`` file; a line that is not a JSON object (a torn last line) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def is_complete(records: Sequence[Record]) -> bool:
    """Whether a job's records are whole: its launcher's "meta" and an "end" of every process that wrote one."""
    roles = {(r.get("role"), r.get("rank")) for r in records if r.get("kind") in ("step", "server", "end")}
    ended = {(r.get("role"), r.get("rank")) for r in records if r.get("kind") == "end"}
    return any(r.get("kind") == "meta" for r in records) and bool(ended) and roles <= ended


def _of(records: Iterable[Record], kind: str) -> list[Record]:
    return [r for r in records if r.get("kind") == kind]


def _num(record: Record, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def training_start(records: Sequence[Record]) -> float | None:
    """When the first step began: the earliest step record's "t" less its own duration."""
    steps = _of(records, "step")
    if not steps:
        return None
    return min(_num(r, "t") - sum(_num(r, k) for k in _STEP_TIME) for r in steps)


@dataclass(frozen=True)
class Curve:
    """An accuracy (or loss) curve: seconds since the start of training, cumulative wire bytes (both directions,
    every worker) at each point, and the value."""

    metric: str
    seconds: list[float]
    wire_bytes: list[float]
    values: list[float]


def curve(records: Sequence[Record], metric: str = "accuracy") -> Curve:
    """The curve of ``metric``: "accuracy" from the "eval" records of the lowest rank that reports one; "loss"
    from the step records of the lowest worker rank."""
    start = training_start(records)
    steps = sorted(_of(records, "step"), key=lambda r: _num(r, "t"))
    kind = "eval" if metric == "accuracy" else "step"
    points = [r for r in _of(records, kind) if isinstance(r.get(metric), (int, float))]
    if start is None or not points:
        return Curve(metric, [], [], [])
    rank = min(r.get("rank", 0) for r in points)
    points = sorted((r for r in points if r.get("rank", 0) == rank), key=lambda r: _num(r, "t"))
    seconds, wire, values = [], [], []
    total, i = 0.0, 0
    for p in points:
        while i < len(steps) and _num(steps[i], "t") <= _num(p, "t"):
            total += _num(steps[i], "sent") + _num(steps[i], "recv")
            i += 1
        seconds.append(_num(p, "t") - start)
        wire.append(total)
        values.append(float(p[metric]))
    return Curve(metric, seconds, wire, values)


def time_to_target(c: Curve, target: float | None) -> float | None:
    """Seconds until the curve first reaches ``target`` (None: never, or no target)."""
    if target is None:
        return None
    return next((s for s, v in zip(c.seconds, c.values, strict=True) if v >= target), None)


def _median_step_seconds(steps: Sequence[Record]) -> float | None:
    """The median time between a worker's consecutive steps (each worker's first step has no predecessor: its
    own compute, encode, wait and decode stand in when no worker has two)."""
    by_rank: dict[Any, list[float]] = defaultdict(list)
    for r in steps:
        by_rank[r.get("rank")].append(_num(r, "t"))
    gaps = [b - a for ts in map(sorted, by_rank.values()) for a, b in itertools.pairwise(ts)]
    if gaps:
        return statistics.median(gaps)
    return statistics.median(sum(_num(r, k) for k in _STEP_TIME) for r in steps) if steps else None


def _ratio(raw: float, wire: float) -> float | None:
    return raw / wire if wire > 0 else None


def summarize_run(records: Sequence[Record], target: float | None = None) -> dict[str, float | int | None]:
    """One run's numbers (the columns of results.csv; None where the records do not say)."""
    steps = _of(records, "step")
    servers = _of(records, "server")
    n = len(steps)

    def total(key: str, among: Sequence[Record] = steps) -> float:
        return sum(_num(r, key) for r in among)

    def per_step(key: str, among: Sequence[Record] = steps, scale: float = 1.0) -> float | None:
        return total(key, among) * scale / n if n else None

    acc = curve(records, "accuracy")
    loss = curve(records, "loss")
    times = sorted(_num(r, "t") for r in steps)
    t0 = times[0] if times else 0.0
    later = [r for r in steps if _num(r, "t") > t0]
    span = times[-1] - t0 if times else 0.0
    rss = [_num(r, "rss") for r in _of(records, "end") if "rss" in r]
    return {
        "steps": n,
        "samples": int(total("samples")),
        "push_bytes_per_step": per_step("sent"),
        "pull_bytes_per_step": per_step("recv"),
        "push_logical_bytes_per_step": per_step("logical_sent"),
        "pull_logical_bytes_per_step": per_step("logical_recv"),
        "push_raw_bytes_per_step": per_step("raw_sent"),
        "pull_raw_bytes_per_step": per_step("raw_recv"),
        "push_ratio": _ratio(total("raw_sent"), total("sent")),
        "pull_ratio": _ratio(total("raw_recv"), total("recv")),
        "wire_ratio": _ratio(total("raw_sent") + total("raw_recv"), total("sent") + total("recv")),
        "compute_ms": per_step("compute", scale=1e3),
        "encode_ms": per_step("encode", scale=1e3),
        "wait_ms": per_step("wait", scale=1e3),
        "decode_ms": per_step("decode", scale=1e3),
        "pause_ms": per_step("pause", scale=1e3),
        "server_apply_ms": per_step("apply", servers, 1e3),
        "server_decode_ms": per_step("decode", servers, 1e3),
        "server_encode_ms": per_step("encode", servers, 1e3),
        "step_ms": None if (m := _median_step_seconds(steps)) is None else m * 1e3,
        "samples_per_s": total("samples", later) / span if span > 0 else None,
        "train_seconds": None if (s := training_start(records)) is None or not times else times[-1] - s,
        "time_to_target_s": time_to_target(acc, target),
        "final_accuracy": acc.values[-1] if acc.values else None,
        "final_loss": loss.values[-1] if loss.values else None,
        "max_rss_bytes": max(rss) if rss else None,
    }


# -- over seeds ------------------------------------------------------------------------------------------------
def mean_std(values: Iterable[float | None]) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of the values that are numbers."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def si_bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _sig(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _times(v: float) -> str:
    return f"{v:.3g}x"


def format_mean_std(values: Iterable[float | None], fmt: Callable[[float], str], of: int | None = None) -> str:
    """``mean ± std`` (one value: itself); "—" when none; ``(k/n)`` after it when only k of the n runs have one."""
    got = mean_std(values)
    if got is None:
        return "—"
    mean, std, k = got
    text = fmt(mean) if k == 1 else f"{fmt(mean)} ± {fmt(std)}"
    return text + (f" ({k}/{of})" if of is not None and k < of else "")


# (column, field of summarize_run, format); the time to target's title names the target
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("push/step", "push_bytes_per_step", si_bytes),
    ("pull/step", "pull_bytes_per_step", si_bytes),
    ("push ratio", "push_ratio", _times),
    ("pull ratio", "pull_ratio", _times),
    ("encode ms", "encode_ms", _sig),
    ("decode ms", "decode_ms", _sig),
    ("step ms", "step_ms", _sig),
    ("samples/s", "samples_per_s", _fixed(0)),
    ("time to target (s)", "time_to_target_s", _sig),
    ("final accuracy", "final_accuracy", _fixed(3)),
)


def setting_cell(name: str, value: Any) -> str:
    """A setting as a table shows it: "none" for no codec, "—" for any other empty setting, yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value in ("", None):
        return "none" if name.endswith("codec") else "—"
    return str(value)


def setting_title(name: str) -> str:
    return name.removeprefix("num_")


def group_rows(rows: Sequence[Mapping[str, Any]],
               keys: Sequence[str]) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    """The rows by the values of ``keys`` (the settings that vary), in first-seen order."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row.get(k)) for k in keys), []).append(row)
    return groups


def markdown_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], target: float | None = None) -> str:
    """One line per configuration (rows grouped over seeds by ``keys``): its settings, how many of its runs
    succeeded, and each of :data:`COLUMNS` as mean ± std over the successful ones. A row's ``status`` is "ok" for
    a run that succeeded."""
    heads = [setting_title(k) for k in keys] + ["runs"] + [
        f"time to {target:.3g} (s)" if field == "time_to_target_s" and target is not None else title
        for title, field, _ in COLUMNS
    ]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for group in group_rows(rows, keys).values():
        ok = [r for r in group if r.get("status") == "ok"]
        cells = [setting_cell(k, group[0].get(k)) for k in keys] + [f"{len(ok)}/{len(group)}"]
        for _, field, fmt in COLUMNS:
            of = len(ok) if field == "time_to_target_s" else None  # "(2/3)": only two seeds reached it
            cells.append(format_mean_std((r.get(field) for r in ok), fmt, of))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
