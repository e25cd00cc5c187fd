"""What ``zps experiment`` makes of the records of ``--metrics-out`` (format: docs/experiments.md): one run's
numbers (:func:`summarize_run`), its accuracy curve (:func:`curve`), and the markdown tables over seeds
(:func:`markdown_table`: means with their 95% intervals, :func:`per_seed_table`). Pure functions of the records:
nothing here runs or reads anything but a file.

Every per-step number is per *worker step* (one push and pull of the whole model by one worker). Time is counted
from the start of the job's first step (the processes' start-up and the script's data loading are not in it).
"""
from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import estimate, numbers

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
    """An accuracy (or loss) curve: at each point, seconds since the start of training, the reporting worker's
    steps done, the cumulative wire bytes of every worker pushed (``sent``) and pulled (``recv``), and the value."""

    metric: str
    seconds: list[float]
    wire_bytes: list[float]  # sent + recv
    values: list[float]
    steps: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    recv: list[float] = field(default_factory=list)


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
    out: Curve = Curve(metric, [], [], [])
    sent = recv = 0.0
    i = 0
    for p in points:
        while i < len(steps) and _num(steps[i], "t") <= _num(p, "t"):
            sent += _num(steps[i], "sent")
            recv += _num(steps[i], "recv")
            i += 1
        out.seconds.append(_num(p, "t") - start)
        out.sent.append(sent)
        out.recv.append(recv)
        out.wire_bytes.append(sent + recv)
        # an eval's step is the steps done; a step record's, its index (steps done: one more)
        out.steps.append(_num(p, "step") + (1 if kind == "step" else 0))
        out.values.append(float(p[metric]))
    return out


def reached(c: Curve, target: float | None) -> int | None:
    """The index of the curve's first point at or above ``target`` (None: never, or no target)."""
    if target is None:
        return None
    return next((i for i, v in enumerate(c.values) if v >= target), None)


def time_to_target(c: Curve, target: float | None) -> float | None:
    """Seconds until the curve first reaches ``target`` (None: never, or no target)."""
    i = reached(c, target)
    return None if i is None else c.seconds[i]


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
    """One run's numbers (the columns of results.csv; None where the records do not say). Per step: per worker step;
    bytes: wire bytes (headers included), of every worker together where it says "to target" or "per sample"; the
    servers' times: the busiest server's, per step of the job (one step of every worker)."""
    steps = _of(records, "step")
    servers = _of(records, "server")
    n = len(steps)
    job_steps = n / len({r.get("rank") for r in steps}) if n else 0

    def total(key: str, among: Sequence[Record] = steps) -> float:
        return sum(_num(r, key) for r in among)

    def per_step(key: str, among: Sequence[Record] = steps, scale: float = 1.0) -> float | None:
        return total(key, among) * scale / n if n else None

    def busiest_server_ms(key: str) -> float | None:
        ranks = {r.get("rank") for r in servers}
        if not ranks or not job_steps:
            return None
        return max(total(key, [r for r in servers if r.get("rank") == rank]) for rank in ranks) * 1e3 / job_steps

    acc = curve(records, "accuracy")
    loss = curve(records, "loss")
    times = sorted(_num(r, "t") for r in steps)
    t0 = times[0] if times else 0.0
    later = [r for r in steps if _num(r, "t") > t0]
    span = times[-1] - t0 if times else 0.0
    rss = [_num(r, "rss") for r in _of(records, "end") if "rss" in r]
    samples = total("samples")
    hit = reached(acc, target)
    return {
        "steps": n,
        "samples": int(samples),
        "push_bytes_per_step": per_step("sent"),
        "pull_bytes_per_step": per_step("recv"),
        "push_logical_bytes_per_step": per_step("logical_sent"),
        "pull_logical_bytes_per_step": per_step("logical_recv"),
        "push_raw_bytes_per_step": per_step("raw_sent"),
        "pull_raw_bytes_per_step": per_step("raw_recv"),
        "push_ratio": _ratio(total("raw_sent"), total("sent")),
        "pull_ratio": _ratio(total("raw_recv"), total("recv")),
        "wire_ratio": _ratio(total("raw_sent") + total("raw_recv"), total("sent") + total("recv")),
        "push_bytes_per_sample": total("sent") / samples if samples else None,
        "pull_bytes_per_sample": total("recv") / samples if samples else None,
        "compute_ms": per_step("compute", scale=1e3),
        "encode_ms": per_step("encode", scale=1e3),
        "wait_ms": per_step("wait", scale=1e3),
        "decode_ms": per_step("decode", scale=1e3),
        "pause_ms": per_step("pause", scale=1e3),
        "server_apply_ms": busiest_server_ms("apply"),
        "server_decode_ms": busiest_server_ms("decode"),
        "server_encode_ms": busiest_server_ms("encode"),
        "step_ms": None if (m := _median_step_seconds(steps)) is None else m * 1e3,
        "samples_per_s": total("samples", later) / span if span > 0 else None,
        "train_seconds": None if (s := training_start(records)) is None or not times else times[-1] - s,
        "time_to_target_s": None if hit is None else acc.seconds[hit],
        "steps_to_target": None if hit is None else acc.steps[hit],
        "push_bytes_to_target": None if hit is None else acc.sent[hit],
        "pull_bytes_to_target": None if hit is None else acc.recv[hit],
        "final_accuracy": acc.values[-1] if acc.values else None,
        "final_loss": loss.values[-1] if loss.values else None,
        "max_rss_bytes": max(rss) if rss else None,
    }


# -- over seeds ------------------------------------------------------------------------------------------------
def si_bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} B"


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _sig(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _times(v: float) -> str:
    return f"{v:.3g}x"


def format_estimate(values: Iterable[float | None], fmt: Callable[[float], str], of: int | None = None,
                    interval: bool = True) -> str:
    """``mean [low, high]``, the 95% Student-t interval (:func:`zps.lab.stats.estimate`; ``interval`` false: the
    mean alone); one value, or values all equal: the value alone; "—" when none; ``(k/n)`` after it when only k of the
    n runs have one."""
    got = estimate(values)
    if got is None:
        return "—"
    plain = got.n == 1 or got.std == 0 or not interval
    text = fmt(got.mean) if plain else f"{fmt(got.mean)} [{fmt(got.low)}, {fmt(got.high)}]"
    return text + (f" ({got.n}/{of})" if of is not None and got.n < of else "")


Column = tuple[str, str, Callable[[float], str]]  # (title, field of summarize_run, format)
# "T" in a title is the target accuracy; a column of a field that says "target" exists only with a target
OUTCOME: tuple[Column, ...] = (
    ("time to T (s)", "time_to_target_s", _sig),
    ("steps to T", "steps_to_target", _sig),
    ("final accuracy", "final_accuracy", _fixed(3)),
    ("step ms", "step_ms", _sig),
    ("samples/s", "samples_per_s", _sig),
)
BYTES: tuple[Column, ...] = (
    ("push/step", "push_bytes_per_step", si_bytes),
    ("pull/step", "pull_bytes_per_step", si_bytes),
    ("push ratio", "push_ratio", _times),
    ("pull ratio", "pull_ratio", _times),
    ("push/sample", "push_bytes_per_sample", si_bytes),
    ("pull/sample", "pull_bytes_per_sample", si_bytes),
    ("push to T", "push_bytes_to_target", si_bytes),
    ("pull to T", "pull_bytes_to_target", si_bytes),
)
BREAKDOWN: tuple[Column, ...] = (
    ("compute", "compute_ms", _sig),
    ("encode", "encode_ms", _sig),
    ("wait", "wait_ms", _sig),
    ("decode", "decode_ms", _sig),
    ("servers' apply", "server_apply_ms", _sig),
    ("servers' decode", "server_decode_ms", _sig),
    ("servers' encode", "server_encode_ms", _sig),
)
PER_SEED: tuple[Column, ...] = (
    ("time to T (s)", "time_to_target_s", _sig),
    ("steps to T", "steps_to_target", _sig),
    ("final accuracy", "final_accuracy", _fixed(3)),
    ("step ms", "step_ms", _sig),
    ("push to T", "push_bytes_to_target", si_bytes),
    ("pull to T", "pull_bytes_to_target", si_bytes),
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


def _columns(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], target: float | None) -> list[Column]:
    """``columns`` as this table shows them: "T" named, the target's columns only with a target, final loss where
    no run reported an accuracy."""
    out: list[Column] = []
    for title, name, fmt in columns:
        if "target" in name and target is None:
            continue
        if name == "final_accuracy" and not any(r.get(name) is not None for r in rows) \
                and any(r.get("final_loss") is not None for r in rows):
            title, name, fmt = "final loss", "final_loss", _sig
        out.append((title.replace("T", f"{target:.3g}") if target is not None and " T" in title else title,
                    name, fmt))
    return out


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], target: float | None = None,
                   columns: Sequence[Column] = OUTCOME, interval: bool = True) -> str:
    """One line per configuration (rows grouped over seeds by ``keys``): its settings, n (its runs that succeeded;
    "k of m" when some failed) and each of ``columns`` over those runs: the mean and its 95% interval
    (:func:`format_estimate`), or the mean alone (``interval`` false). A row's ``status`` is "ok" for a run that
    succeeded."""
    shown = _columns(columns, rows, target)
    lines = [_line([setting_title(k) for k in keys] + ["n"] + [title for title, _, _ in shown]),
             "|" + "---|" * (len(keys) + 1 + len(shown))]
    for group in group_rows(rows, keys).values():
        ok = [r for r in group if r.get("status") == "ok"]
        cells = [setting_cell(k, group[0].get(k)) for k in keys]
        cells.append(str(len(ok)) if len(ok) == len(group) else f"{len(ok)} of {len(group)}")
        for _, name, fmt in shown:
            of = len(ok) if "target" in name else None  # "(2/3)": only two seeds reached it
            cells.append(format_estimate([r.get(name) for r in ok], fmt, of, interval))
        lines.append(_line(cells))
    return "\n".join(lines) + "\n"


def per_seed_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], target: float | None = None) -> str:
    """One line per run: its settings, seed, and :data:`PER_SEED` (a run that failed: its status)."""
    shown = _columns(PER_SEED, rows, target)
    lines = [_line([setting_title(k) for k in keys] + ["seed"] + [title for title, _, _ in shown]),
             "|" + "---|" * (len(keys) + 1 + len(shown))]
    for group in group_rows(rows, keys).values():
        for r in group:
            cells = [setting_cell(k, r.get(k)) for k in keys] + [setting_cell("seed", r.get("seed"))]
            if r.get("status") != "ok":
                cells += [str(r.get("status"))] + ["—"] * (len(shown) - 1)
            else:
                cells += ["—" if (v := numbers([r.get(name)])) == [] else fmt(v[0]) for _, name, fmt in shown]
            lines.append(_line(cells))
    return "\n".join(lines) + "\n"
