"""``zps experiment SPEC.toml``: every configuration of a spec's matrix (:mod:`.experiment_spec`) as a fresh
``zps run``, one after another, each writing ``--metrics-out OUT/runs/<run-id>.jsonl``; then the results.

OUT/runs/<run-id>.jsonl, .log (the run's output) and .status.json (its exit code, written when it ends). A run
whose status says it succeeded and whose records are whole is not run again; a failed one is kept as failed
(``--retry-failed`` runs it again); one stopped half-way (no status) runs again. Then OUT/results.csv and
results.json (one row per run), summary.md (the table over seeds, :mod:`.experiment_summary`) and the plots
(:mod:`.experiment_plots`).
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zps.process import die_with_parent

from .experiment_spec import SEED, Run, Spec, SpecError, check_specs, expand, varying
from .experiment_summary import (
    BREAKDOWN,
    BYTES,
    OUTCOME,
    curve,
    group_rows,
    is_complete,
    markdown_table,
    per_seed_table,
    read_records,
    setting_cell,
    setting_title,
    summarize_run,
)
from .stats import CONFIDENCE, t_quantile

# the settings every results row names, whether they vary or not (JobConfig field names)
ROW_SETTINGS = ("num_servers", "num_workers", "codec", "pull_codec", "error_feedback", "mode", "staleness", "net",
                "straggler", "jitter")
LOG_TAIL = 20
TERM_GRACE = 15.0  # seconds a timed-out run's launcher gets to end its processes before SIGKILL


class RunFiles:
    """Where one run's files live in OUT/runs."""

    def __init__(self, out: Path, run: Run) -> None:
        base = out / "runs" / run.run_id
        self.metrics = base.with_suffix(".jsonl")
        self.log = base.with_suffix(".log")
        self.status = base.with_suffix(".status.json")

    def read_status(self) -> dict[str, Any] | None:
        try:
            status = json.loads(self.status.read_text())
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def clear(self) -> None:
        for path in (self.metrics, self.log, self.status):
            path.unlink(missing_ok=True)

    def log_tail(self, lines: int = LOG_TAIL) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


def _die_with_us() -> None:  # in the child: SIGTERM (the launcher's own teardown) when the sweep dies
    die_with_parent(signal.SIGTERM)


def execute(run: Run, files: RunFiles, timeout: float | None) -> dict[str, Any]:
    """Run one configuration to its end (or past ``timeout``: SIGTERM, then SIGKILL); its status, also written
    to its status file. Ctrl-C ends the run and leaves no status (it runs again next time)."""
    files.clear()
    files.metrics.parent.mkdir(parents=True, exist_ok=True)
    command = run.command(files.metrics)
    started = time.monotonic()
    timed_out = False
    with open(files.log, "wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_us)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(proc)
        except BaseException:
            _stop(proc)
            raise
    status: dict[str, Any] = {"run_id": run.run_id, "rc": rc, "seconds": round(time.monotonic() - started, 3),
                              "timed_out": timed_out, "command": command}
    status["error"] = _failure(status, files)
    files.status.write_text(json.dumps(status, indent=1) + "\n")
    return status


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)  # zps run ends its servers and workers
    try:
        return proc.wait(timeout=TERM_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()  # its children die with it (they ask the kernel to)
        return proc.wait()


def _failure(status: dict[str, Any], files: RunFiles) -> str:
    """Why the run failed, in one line ("" when it did not)."""
    if status["timed_out"]:
        return f"timed out after {status['seconds']:.0f} s"
    if status["rc"] != 0:
        last = next((line for line in reversed(files.log_tail()) if line.strip()), "")
        return f"exit code {status['rc']}: {last.strip()}"
    if not files.metrics.exists() or not is_complete(read_records(files.metrics)):
        return f"no complete --metrics-out records in {files.metrics.name}"
    return ""


def result_row(spec: Spec, run: Run, files: RunFiles, status: dict[str, Any] | None) -> dict[str, Any]:
    """One run's row of results.csv: its id, status, settings, seed and numbers (the numbers only if it
    succeeded)."""
    config = run.config
    row: dict[str, Any] = {"run_id": run.run_id}
    if status is None:
        row["status"] = "not run"
    else:
        row["status"] = "ok" if not status.get("error") else ("timeout" if status.get("timed_out") else "failed")
        row["rc"], row["seconds"] = status.get("rc"), status.get("seconds")
    for name in (*ROW_SETTINGS, *(k for k in spec.matrix if k not in ROW_SETTINGS and k != SEED)):
        if name in config:  # (an axis of tables is not a setting: its settings are columns of their own)
            row[name] = config[name]
    for name, _ in run.settings:  # every setting the run was given (those of an axis of tables too)
        row.setdefault(name, config[name])
    row["seed"] = run.seed
    if row["status"] == "ok":
        row.update(summarize_run(read_records(files.metrics), spec.target_accuracy))
    elif status is not None:
        row["error"] = status.get("error", "")
    return row


def write_results(spec: Spec, runs: Sequence[Run], rows: Sequence[dict[str, Any]], spec_path: str) -> list[Path]:
    """results.csv, results.json, summary.md and the plots in ``spec.out``; the paths written."""
    out = spec.out
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k != "log_tail"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(list(rows), indent=1) + "\n")
    keys = varying(runs)
    written = [out / "results.csv", out / "results.json"]
    common = shared_settings(runs, keys)
    plots = _plots(spec, runs, rows, keys, common)
    (out / "summary.md").write_text(summary_markdown(spec, rows, keys, spec_path, plots, common))
    return [*written, out / "summary.md", *plots]


def _label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{setting_title(k)}={setting_cell(k, row.get(k))}" for k in keys) or "all runs"


def shared_settings(runs: Sequence[Run], keys: Sequence[str]) -> str:
    """What every run has in common and the tables do not say: its mode and the settings it sets (servers, workers,
    a network...), e.g. "mode bsp, servers 2, workers 2, net bw=10mbit,latency=1ms"."""
    if not runs:
        return ""
    config = runs[0].config
    names = ["mode", *(name for name, _ in runs[0].settings if name != "mode")]
    return ", ".join(f"{setting_title(n)} {setting_cell(n, config[n])}" for n in names if n not in keys)


def _plots(spec: Spec, runs: Sequence[Run], rows: Sequence[dict[str, Any]], keys: Sequence[str],
           common: str = "") -> list[Path]:
    try:
        from .experiment_plots import plot_curves
    except ImportError:  # pragma: no cover
        return []
    files = {r.run_id: RunFiles(spec.out, r) for r in runs}
    ok = [r for r in rows if r["status"] == "ok"]
    records = {r["run_id"]: read_records(files[r["run_id"]].metrics) for r in ok}
    metric = "accuracy" if any(curve(rs).values for rs in records.values()) else "loss"
    groups = [(_label(group[0], keys), [curve(records[r["run_id"]], metric) for r in group])
              for group in group_rows(ok, keys).values()]
    try:
        return plot_curves(groups, spec.out, title=f"{Path(spec.script).name}" + (f": {common}" if common else ""),
                           target=spec.target_accuracy if metric == "accuracy" else None)
    except ImportError:
        return []


def _intervals_note(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    sizes = sorted({sum(r["status"] == "ok" for r in g) for g in group_rows(rows, keys).values()} - {0, 1})
    ts = ", ".join(f"t = {t_quantile((1 + CONFIDENCE) / 2, n - 1):.2f} for n = {n}" for n in sizes)
    return (f"Each cell of the first two tables is the mean over the n seeds that succeeded and, in brackets, its "
            f"{CONFIDENCE:.0%} confidence interval: mean ± t × s / √n, with s the seeds' sample standard deviation and "
            f"t Student's for n - 1 degrees of freedom{f' ({ts})' if ts else ''}. A single value: n = 1, or every "
            "seed gave the same. `(k/n)`: only k of the n seeds reached the target; the cell is over those k.")


def summary_markdown(spec: Spec, rows: Sequence[dict[str, Any]], keys: Sequence[str], spec_path: str,
                     plots: Sequence[Path] = (), common: str = "") -> str:
    ok = sum(r["status"] == "ok" for r in rows)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    target = spec.target_accuracy
    to = f"{target:.3g}" if target is not None else ""
    lines = [f"# zps experiment {Path(spec_path).name}", "",
             f"{len(rows)} runs ({ok} ok) of `{shlex.join([spec.script, *spec.args])}`"
             + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + (f"; every run: {common}" if common else "")
             + f". Regenerate: `zps experiment "
             f"{spec_path}`. The columns: docs/experiments.md.", "", _intervals_note(rows, keys), "",
             "## Outcome", "", markdown_table(rows, keys, target, OUTCOME),
             "## Bytes", "",
             "Wire bytes: what crossed the sockets and the shared-memory path, message headers included. Per step: "
             "one worker's push (or pull) of one step; per sample: every worker's bytes over every sample it "
             "trained on" + (f"; to {to}: every worker's bytes together, from the first step to the first "
                             f"evaluation at or above {to}" if target is not None else "") + ".", "",
             markdown_table(rows, keys, target, BYTES),
             "## Where a step's time goes", "",
             "Milliseconds per worker step, the mean over seeds: compute (outside zps: data, forward, backward), "
             "encode, wait (sending, and waiting for the servers and the network) and decode add up to a worker's "
             "mean step time. The servers': the busiest server's optimizer (apply), push decoding and pull "
             "encoding per step of the job.", "",
             markdown_table(rows, keys, target, BREAKDOWN, interval=False),
             "## Per seed", "", per_seed_table(rows, keys, target)]
    failed = [r for r in rows if r["status"] not in ("ok", "not run")]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run_id']}`: {r.get('error', '')}" for r in failed] + [""]
    if plots:
        lines += ["## Plots", "", "A line per configuration: the mean over its seeds; the band: the seeds' range "
                  "(lowest to highest)" + (f"; dashed: the target, {to}" if target is not None else "") + ".", ""]
    for path in plots:
        lines += [f"![{path.stem.replace('_', ' ')}]({path.name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def run_experiment(spec: Spec, spec_path: str, *, dry_run: bool = False, retry_failed: bool = False,
                   summary_only: bool = False, console: Console | None = None) -> int:
    """Run what is left of the sweep, then write the results; 0 when every run succeeded, 1 otherwise."""
    console = console or Console(stderr=True)
    runs = expand(spec)
    if not os.path.exists(spec.script):
        raise SpecError(f"script {spec.script!r} not found (a spec's script is relative to the spec file's folder)")
    check_specs(runs)
    files = {r.run_id: RunFiles(spec.out, r) for r in runs}
    if dry_run:
        for run in runs:
            print(f"{run.run_id}: {shlex.join(run.command(files[run.run_id].metrics))}")
        return 0
    (spec.out / "runs").mkdir(parents=True, exist_ok=True)
    statuses = {r.run_id: _done(files[r.run_id]) for r in runs}
    todo = [] if summary_only else [r for r in runs if _needs_run(statuses[r.run_id], retry_failed)]
    if len(todo) < len(runs) and not summary_only:
        console.print(f"zps experiment: {len(runs) - len(todo)} of {len(runs)} runs already done in {spec.out}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not todo) as progress:
        task = progress.add_task("runs", total=len(todo))
        for run in todo:
            progress.update(task, description=run.run_id)
            status = execute(run, files[run.run_id], spec.timeout)
            statuses[run.run_id] = status
            mark = "[green]ok[/]" if not status["error"] else f"[red]failed[/]: {status['error']}"
            progress.console.print(f"{run.run_id} ({status['seconds']:.1f} s) {mark}", highlight=False)
            progress.advance(task)
    rows = [result_row(spec, r, files[r.run_id], statuses[r.run_id]) for r in runs]
    for row in rows:
        if row["status"] not in ("ok", "not run"):
            row["log_tail"] = files[row["run_id"]].log_tail()
    written = write_results(spec, runs, rows, spec_path)
    console.print(f"zps experiment: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} runs ok; "
                  f"{', '.join(str(p) for p in written)}", highlight=False)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _done(files: RunFiles) -> dict[str, Any] | None:
    """A run's status where it ended (None: it never did, or its records have gone since)."""
    status = files.read_status()
    if status is not None and not status.get("error"):
        if not files.metrics.exists() or not is_complete(read_records(files.metrics)):
            return None
    return status


def _needs_run(status: dict[str, Any] | None, retry_failed: bool) -> bool:
    if status is None:
        return True
    return bool(status.get("error")) and retry_failed
