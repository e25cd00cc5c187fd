"""zps experiment: the spec and its runs (experiment_spec), the numbers made of --metrics-out records
(experiment_summary, on synthetic records in the documented format), the sweep itself (resumable, failures kept)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from zps.lab import experiment
from zps.lab.experiment import result_row
from zps.lab.experiment_plots import mean_band, plot_curves
from zps.lab.experiment_spec import Run, SpecError, expand, load_spec, parse_spec, varying
from zps.lab.experiment_summary import (
    BREAKDOWN,
    BYTES,
    curve,
    format_estimate,
    is_complete,
    markdown_table,
    per_seed_table,
    read_records,
    summarize_run,
)
from zps.lab.stats import estimate, t_cdf, t_quantile
from zps.launcher.cli import main as zps_main

from .helpers import ROOT, finish, start

STEPS_SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")


# -- synthetic records, as docs/experiments.md describes them ---------------------------------------------------
def job_records(sent: int = 500, accuracies: tuple[float, ...] = (0.5, 0.8, 0.9)) -> list[dict[str, Any]]:
    """2 workers x 3 steps (a step every second, rank 1 0.1 s behind rank 0) and 1 server; rank 0 evaluates after
    each of its steps."""
    out: list[dict[str, Any]] = [{"kind": "meta", "role": "launcher", "rank": 0, "t": 100.0, "start": 100.0,
                                  "num_workers": 2, "num_servers": 1}]
    for step in (1, 2, 3):
        for rank in (0, 1):
            out.append({"kind": "step", "role": "worker", "rank": rank, "t": 110.0 + step + rank / 10, "step": step,
                        "compute": 0.5, "encode": 0.01, "wait": 0.2, "decode": 0.02, "pause": 0.0,
                        "raw_sent": 4000, "raw_recv": 4000, "logical_sent": sent - 100, "logical_recv": 4000,
                        "sent": sent, "recv": 4100, "samples": 32, "loss": 1.0 / step})
        if step <= len(accuracies):
            out.append({"kind": "eval", "role": "worker", "rank": 0, "t": 111.05 + step - 1, "step": step,
                        "accuracy": accuracies[step - 1], "loss": None})
    for t in (111.5, 113.5):
        out.append({"kind": "server", "role": "server", "rank": 0, "t": t, "step": 3, "apply": 0.03, "decode": 0.006,
                    "encode": 0.0, "requests": 6, "sent": 12300, "recv": 1500, "updates": 3})
    for role, rank, rss in (("worker", 0, 2e8), ("worker", 1, 3e8), ("server", 0, 1e8)):
        out.append({"kind": "end", "role": role, "rank": rank, "t": 114.0, "rss": rss})
    return sorted(out, key=lambda r: r["t"])


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.unit
def test_a_runs_numbers_come_from_its_records() -> None:
    got = summarize_run(job_records(), target=0.85)
    start = 111.0 - 0.73  # the first step's t less its compute, encode, wait and decode
    assert got["steps"] == 6 and got["samples"] == 192
    assert got["push_bytes_per_step"] == 500 and got["pull_bytes_per_step"] == 4100
    assert got["push_logical_bytes_per_step"] == 400 and got["push_raw_bytes_per_step"] == 4000
    assert got["push_ratio"] == 8.0 and got["pull_ratio"] == pytest.approx(4000 / 4100, rel=1e-12)
    assert got["wire_ratio"] == pytest.approx(8000 / 4600, rel=1e-12)
    assert got["encode_ms"] == pytest.approx(10.0, rel=1e-12)
    assert got["decode_ms"] == pytest.approx(20.0, rel=1e-12)
    assert got["compute_ms"] == pytest.approx(500.0, rel=1e-12)
    assert got["step_ms"] == pytest.approx(1000.0, rel=1e-9)  # each worker's steps are a second apart
    assert got["server_apply_ms"] == pytest.approx(60 / 3, rel=1e-12)  # 2 x 30 ms over 3 steps of the job
    assert got["server_decode_ms"] == pytest.approx(12 / 3, rel=1e-12)
    assert got["samples_per_s"] == pytest.approx(5 * 32 / 2.1, rel=1e-9)  # after the first step: 5 in 2.1 s
    assert got["time_to_target_s"] == pytest.approx(113.05 - start, rel=1e-12)  # the third eval reaches 0.85
    assert got["train_seconds"] == pytest.approx(113.1 - start, rel=1e-12)
    assert got["final_accuracy"] == 0.9 and got["final_loss"] == pytest.approx(1 / 3)
    assert got["max_rss_bytes"] == 3e8
    # every worker's bytes over every sample: 6 steps x 500 B pushed, 6 x 4100 B pulled, 6 x 32 samples
    assert got["push_bytes_per_sample"] == pytest.approx(3000 / 192) and got["pull_bytes_per_sample"] == 24600 / 192
    # to the target: the steps before the third eval (at 113.05): 111.0, 111.1, 112.0, 112.1, 113.0 (both workers)
    assert got["steps_to_target"] == 3
    assert got["push_bytes_to_target"] == 5 * 500 and got["pull_bytes_to_target"] == 5 * 4100


@pytest.mark.unit
def test_the_busiest_server_sets_the_servers_times() -> None:
    records = job_records() + [{"kind": "server", "role": "server", "rank": 1, "t": 112.5, "step": 3, "apply": 0.3,
                                "decode": 0.0, "encode": 0.09, "requests": 6, "sent": 0, "recv": 0, "updates": 3},
                               {"kind": "end", "role": "server", "rank": 1, "t": 114.0}]
    got = summarize_run(records)
    assert got["server_apply_ms"] == pytest.approx(300 / 3) and got["server_encode_ms"] == pytest.approx(90 / 3)
    assert got["server_decode_ms"] == pytest.approx(12 / 3)  # server 0's: server 1 decoded nothing


@pytest.mark.unit
def test_the_curve_counts_the_wire_bytes_sent_before_each_evaluation() -> None:
    c = curve(job_records())
    assert c.values == [0.5, 0.8, 0.9]
    assert c.wire_bytes == [4600, 3 * 4600, 5 * 4600]  # steps at 111.0 | 111.1 112.0 | 112.1 113.0
    assert c.sent == [500, 3 * 500, 5 * 500] and c.recv == [4100, 3 * 4100, 5 * 4100]
    assert c.steps == [1, 2, 3]  # an eval's step: the steps done
    assert c.seconds == pytest.approx([111.05 - 110.27, 112.05 - 110.27, 113.05 - 110.27], rel=1e-12)
    loss = curve(job_records(), "loss")
    assert loss.values == pytest.approx([1.0, 0.5, 1 / 3]) and loss.wire_bytes == [4600, 3 * 4600, 5 * 4600]


@pytest.mark.unit
def test_a_target_never_reached_or_no_evaluation_gives_none() -> None:
    assert summarize_run(job_records(accuracies=(0.1, 0.2, 0.3)), target=0.85)["time_to_target_s"] is None
    bare = summarize_run(job_records(accuracies=()), target=0.85)
    assert bare["time_to_target_s"] is None and bare["final_accuracy"] is None
    assert summarize_run([], target=0.85)["steps"] == 0


@pytest.mark.unit
def test_records_are_complete_with_meta_and_every_processes_end(tmp_path: Path) -> None:
    records = job_records()
    assert is_complete(records)
    assert not is_complete([r for r in records if r["kind"] != "meta"])
    assert not is_complete([r for r in records if not (r["kind"] == "end" and r["role"] == "server")])
    path = write_jsonl(tmp_path / "m.jsonl", records)
    with open(path, "a") as f:
        f.write('{"kind": "step", "ro')  # a torn last line
    assert read_records(path) == records


@pytest.mark.unit
def test_the_t_quantiles_are_the_published_ones() -> None:
    # Student's t, two-sided 95% (the 0.975 quantile), from any table of the distribution
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452), (120, 1.9799)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4), df
    assert t_quantile(0.995, 5) == pytest.approx(4.0321, abs=1e-4)
    assert t_quantile(0.025, 3) == pytest.approx(-3.1824, abs=1e-4)
    for t in (-3.0, -0.5, 0.0, 1.0, 7.0):  # one degree of freedom: the Cauchy distribution, CDF in closed form
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


@pytest.mark.unit
def test_the_interval_is_the_hand_computed_one() -> None:
    # 2, 4, 6, 9: mean 5.25; s^2 = (10.5625 + 1.5625 + 0.5625 + 14.0625) / 3 = 8.9167; s / sqrt(4) = 1.49304;
    # t(0.975, 3) = 3.18245: 5.25 ± 4.75152
    got = estimate([2.0, 4.0, None, 6.0, 9.0])
    assert got is not None and got.n == 4
    assert got.mean == 5.25 and got.std == pytest.approx(2.98608, abs=1e-5)
    assert got.low == pytest.approx(0.49848, abs=1e-4) and got.high == pytest.approx(10.00152, abs=1e-4)
    assert format_estimate([2.0, 4.0, 6.0, 9.0], lambda v: f"{v:.2f}") == "5.25 [0.50, 10.00]"
    assert format_estimate([7.0], lambda v: f"{v:.2f}") == "7.00"  # one value says nothing of its spread
    assert format_estimate([3.0, 3.0], lambda v: f"{v:.1f}") == "3.0"
    assert format_estimate([1.0, None, 3.0], lambda v: f"{v:.1f}", of=3) == "2.0 [-10.7, 14.7] (2/3)"
    assert format_estimate([None], str) == "—"


def table_rows() -> list[dict[str, Any]]:
    return [{"codec": "", "seed": 0, "status": "ok", "push_bytes_per_step": 1000.0, "time_to_target_s": 2.0,
             "steps_to_target": 20, "final_accuracy": 0.9, "compute_ms": 10.0, "wait_ms": 4.0,
             "push_bytes_to_target": 2e6, "pull_bytes_to_target": 3e6},
            {"codec": "", "seed": 1, "status": "ok", "push_bytes_per_step": 3000.0, "time_to_target_s": None,
             "final_accuracy": 0.8, "compute_ms": 20.0, "wait_ms": 6.0},
            {"codec": "topk:ratio=0.01", "seed": 0, "status": "failed"},
            {"codec": "topk:ratio=0.01", "seed": 1, "status": "ok", "push_bytes_per_step": 50.0,
             "final_accuracy": 0.85}]


@pytest.mark.unit
def test_the_tables_give_n_the_mean_and_its_interval() -> None:
    table = markdown_table(table_rows(), ["codec"], target=0.85).splitlines()
    assert table[0] == "| codec | n | time to 0.85 (s) | steps to 0.85 | final accuracy | step ms | samples/s |"
    # 0.9 and 0.8: mean 0.85, s = 0.0707, t(0.975, 1) = 12.706: ± 0.635
    assert table[2] == "| none | 2 | 2 (1/2) | 20 (1/2) | 0.850 [0.215, 1.485] | — | — |"
    assert table[3] == "| topk:ratio=0.01 | 1 of 2 | — | — | 0.850 | — | — |"
    assert len(table) == 4
    got = markdown_table(table_rows(), ["codec"], target=0.85, columns=BYTES).splitlines()
    assert got[0] == ("| codec | n | push/step | pull/step | push ratio | pull ratio | push/sample | pull/sample | "
                      "push to 0.85 | pull to 0.85 |")
    assert got[2].startswith("| none | 2 | 2 kB [-10.7 kB, 14.7 kB] | — |") and "| 2 MB (1/2) | 3 MB (1/2) |" in got[2]
    assert "to" not in markdown_table(table_rows(), ["codec"], columns=BYTES).splitlines()[0]  # no target
    breakdown = markdown_table(table_rows(), ["codec"], columns=BREAKDOWN, interval=False).splitlines()
    assert breakdown[2] == "| none | 2 | 15 | — | 5 | — | — | — | — |"  # the means alone


@pytest.mark.unit
def test_the_per_seed_table_has_a_line_per_run() -> None:
    lines = per_seed_table(table_rows(), ["codec"], target=0.85).splitlines()
    assert lines[0] == ("| codec | seed | time to 0.85 (s) | steps to 0.85 | final accuracy | step ms | push to 0.85 | "
                        "pull to 0.85 |")
    assert lines[2:] == ["| none | 0 | 2 | 20 | 0.900 | — | 2 MB | 3 MB |",
                         "| none | 1 | — | — | 0.800 | — | — | — |",
                         "| topk:ratio=0.01 | 0 | failed | — | — | — | — | — |",
                         "| topk:ratio=0.01 | 1 | — | — | 0.850 | — | — | — |"]


@pytest.mark.unit
def test_the_mean_band_covers_the_range_every_seed_reached() -> None:
    a = ([0.0, 1.0, 2.0], [0.0, 0.5, 1.0])
    b = ([0.5, 1.5, 3.0], [0.1, 0.3, 0.9])
    x, mean, low, high = mean_band([a, b])
    assert x[0] == 0.5 and x[-1] == 2.0 and len(x) == 200  # both seeds' curves exist from 0.5 to 2.0
    assert mean[0] == pytest.approx((0.25 + 0.1) / 2) and low[0] == 0.1 and high[0] == 0.25
    assert mean[-1] == pytest.approx((1.0 + 0.3 + 0.6 * 0.5 / 1.5) / 2)  # b at 2.0: 0.3 + 0.6 x 0.5 / 1.5
    assert all(lo <= m <= hi for m, lo, hi in zip(mean, low, high, strict=True))
    assert mean_band([a]) == (a[0], a[1], a[1], a[1])  # one seed: itself, no band
    logx, *_ = mean_band([([1.0, 100.0], [0, 1]), ([1.0, 100.0], [0, 1])], log=True)
    assert logx[1] == pytest.approx(100 ** (1 / 199))


@pytest.mark.unit
def test_the_plots_are_written_with_steps_too(tmp_path: Path) -> None:
    c = curve(job_records())
    written = plot_curves([("codec=none", [c, c]), ("codec=topk", [curve(job_records(sent=100))])], tmp_path,
                          title="t", target=0.85)
    assert [p.name for p in written] == ["accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_step.png"]
    assert all(p.stat().st_size > 1000 for p in written)


# -- the spec -------------------------------------------------------------------------------------------------
SWEEP = {"servers": 2, "workers": 2, "args": ["--epochs", "3"],
         "matrix": {"codec": ["", "topk:ratio=0.01"], "error_feedback": [False, True], "mode": ["bsp", "ssp"],
                    "staleness": 2, "seed": [0, 1]}}


@pytest.mark.unit
def test_the_matrix_expands_to_its_distinct_runs_seeds_outermost() -> None:
    runs = expand(parse_spec(SWEEP))
    # codec none x error feedback collapses to one; a staleness outside ssp is none: (1 + 2) x 2 modes x 2 seeds
    assert len(runs) == 12 and len({r.run_id for r in runs}) == 12
    assert [r.seed for r in runs] == [0] * 6 + [1] * 6
    assert [r.run_id for r in runs] == [r.run_id for r in expand(parse_spec(SWEEP))]  # stable
    assert runs[0].slug == "none-bsp-s2w2-seed0"
    assert varying(runs) == ["mode", "staleness", "codec", "error_feedback"]
    topk = next(r for r in runs if r.seed == 1 and r.config["error_feedback"] and r.config["mode"] == "ssp")
    assert topk.run_id.startswith("topk+ef-ssp2-s2w2-seed1-")
    cmd = topk.command(Path("out/runs/x.jsonl"), python="PY")
    assert cmd == ["PY", "-m", "zps.launcher.cli", "run", "--servers", "2", "--workers", "2", "--mode", "ssp",
                   "--staleness", "2", "--codec", "topk:ratio=0.01", "--error-feedback", "--metrics-out",
                   "out/runs/x.jsonl", "--progress", "off", "examples/digits.py", "--epochs", "3", "--seed", "1"]
    other = expand(parse_spec({**SWEEP, "args": ["--epochs", "4"]}))
    assert {r.run_id for r in other}.isdisjoint(r.run_id for r in runs)  # the script's arguments are in the id


@pytest.mark.unit
def test_an_axis_of_tables_sets_several_settings_together() -> None:
    runs = expand(parse_spec({"matrix": {"compression": [
        {"codec": ""}, {"codec": "topk:ratio=0.01", "error_feedback": True, "pull_codec": "int8"}],
        "mode": ["bsp", "asp"]}}))
    got = [(r.config["codec"], r.config["pull_codec"], r.config["error_feedback"], r.config["mode"]) for r in runs]
    assert got == [
        ("", "", False, "bsp"), ("", "", False, "asp"), ("topk:ratio=0.01", "int8", True, "bsp"),
        ("topk:ratio=0.01", "int8", True, "asp")]
    row = result_row(parse_spec({"matrix": {"compression": [{"codec": ""}]}}), runs[0], None, None)  # type: ignore[arg-type]
    assert row["codec"] == "" and "compression" not in row
    with pytest.raises(SpecError, match="'speed' is not a setting"):
        parse_spec({"matrix": {"compression": [{"speed": 1}]}})


@pytest.mark.unit
@pytest.mark.parametrize("data, says", [
    ({"matrix": {"codecs": ["topk"]}}, "'codecs' is not a setting"),
    ({"matrix": {"metrics_out": ["x"]}}, "'metrics_out' is not a setting"),
    ({"matrix": {"net": ["bw=fast"]}}, "bandwidth 'fast'"),
    ({"matrix": {"mode": ["bsp", "sync"]}}, "sync"),
    ({"matrix": {"seed": [0, "one"]}}, "seed: expected integers"),
    ({"matrix": {"codec": []}}, "empty list"),
    ({"target_accuracy": 95}, "target_accuracy"),
    ({"servers": 2, "matrix": {"servers": [1, 2]}}, "both at the top and in [matrix]"),
    ({"sript": "x.py"}, "unknown top-level key(s) sript"),
    # a value of the wrong type: one line naming the key
    ({"servers": "two"}, "servers: expected an integer, got 'two'"),
    ({"workers": 1.5}, "workers: expected an integer, got 1.5"),
    ({"out": 5}, "out: expected a folder's path (a string), got 5"),
    ({"matrix": {"codec": [1]}}, "[matrix] codec: expected a string, got 1"),
    ({"matrix": {"net": 5}}, "[matrix] net: expected a string, got 5"),
    ({"matrix": {"error_feedback": ["yes"]}}, "[matrix] error_feedback: expected true or false, got 'yes'"),
    ({"matrix": {"staleness": ["2"]}}, "[matrix] staleness: expected an integer, got '2'"),
    ({"matrix": {"servers": [True]}}, "[matrix] servers: expected an integer, got True"),
    ({"matrix": {"jitter": [0.5]}}, "[matrix] jitter: expected a string, got 0.5"),
    ({"matrix": {"heartbeat_interval": ["1"]}}, "[matrix] heartbeat_interval: expected a number, got '1'"),
    ({"matrix": {"codec": {"a": 1}}}, "[matrix] codec: expected a value or a list of values, got a table"),
    ({"matrix": {"compression": [{"codec": 1}]}}, "[matrix] compression: codec: expected a string, got 1"),
    ({"matrix": {"compression": [{"codec": ""}, "x"]}}, "a grouped axis is a list of tables of settings; value 2"),
])
def test_a_bad_spec_is_refused_before_anything_runs(data: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError, match=None) as info:
        parse_spec(data)
    assert says in str(info.value) and "\n" not in str(info.value)


@pytest.mark.unit
def test_a_wrong_type_in_a_spec_file_is_one_line_not_a_traceback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[matrix]\ncompression = [{codec = 3}]\n')
    assert zps_main(["experiment", str(spec_file), "--dry-run"]) == 2
    assert capsys.readouterr().err == "zps experiment: [matrix] compression: codec: expected a string, got 3\n"


@pytest.mark.unit
def test_the_script_is_relative_to_the_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "train.py").write_text("")
    spec_file = tmp_path / "specs" / "s.toml"
    spec_file.write_text('script = "../train.py"\n')
    monkeypatch.chdir(tmp_path)
    assert load_spec(spec_file).script == "train.py"  # from the current directory, which holds it
    monkeypatch.chdir(tmp_path / "specs")
    assert load_spec("s.toml").script == str(tmp_path / "train.py")  # outside it: absolute
    assert load_spec(spec_file, out="o").script == str(tmp_path / "train.py")
    spec_file.write_text('[matrix]\nseed = [0]\n')
    assert load_spec(spec_file).script == "examples/digits.py"  # the default: from the current directory


@pytest.mark.unit
def test_the_bundled_specs_are_valid() -> None:
    for path in sorted((ROOT / "examples" / "experiments").glob("*.toml")):
        assert len(expand(load_spec(path))) >= 9, path
    spec = load_spec(ROOT / "examples" / "experiments" / "compression.toml", out="elsewhere")
    assert spec.out == Path("elsewhere") and spec.target_accuracy is not None


# -- the sweep, with a stand-in for zps run ---------------------------------------------------------------------
FAKE = """import shutil, sys
open(sys.argv[3], "a").write("x")
if sys.argv[4] == "int8":
    print("starting"); print("boom: int8 is broken here"); sys.exit(3)
shutil.copy(sys.argv[2], sys.argv[1])
"""


@pytest.mark.cluster  # (processes: a stand-in for zps run)
def test_the_sweep_resumes_keeps_failures_and_writes_its_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    template = write_jsonl(tmp_path / "template.jsonl", job_records())
    counter = tmp_path / "count"

    def command(run: Run, metrics_out: Path, python: str = sys.executable) -> list[str]:
        return [python, "-c", FAKE, str(metrics_out), str(template), str(counter), run.config["codec"] or "none"]

    monkeypatch.setattr(Run, "command", command)
    out = tmp_path / "out"
    spec = parse_spec({"script": STEPS_SCRIPT, "target_accuracy": 0.85,
                       "matrix": {"codec": ["", "topk:ratio=0.01", "int8"], "seed": [0, 1]}}, default_out=out)
    quiet = Console(file=io.StringIO())
    assert experiment.run_experiment(spec, "sweep.toml", console=quiet) == 1  # the int8 runs failed
    assert counter.read_text() == "x" * 6
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"] * 2
    assert [r["seed"] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert rows[0]["push_bytes_per_step"] == "500.0" and rows[0]["time_to_target_s"] != ""
    assert rows[2]["error"] == "exit code 3: boom: int8 is broken here"
    listed = json.loads((out / "results.json").read_text())
    assert listed[2]["log_tail"][-2:] == ["starting", "boom: int8 is broken here"]
    summary = (out / "summary.md").read_text()
    assert "| none | 2 | 500 B | 4.1 kB | 8x | 0.976x | 15.6 B | 128 B | 2.5 kB | 20.5 kB |" in summary  # (seeds agree)
    assert "| int8 | 0 of 2 |" in summary and "## Failed runs" in summary
    for section in ("## Outcome", "## Bytes", "## Where a step's time goes", "## Per seed", "## Plots"):
        assert section in summary
    assert "| none | 2 | 500 | 10 | 200 | 20 | 20 | 4 | 0 |" in summary  # the breakdown: ms per step
    for plot in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_step.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in summary

    assert experiment.run_experiment(spec, "sweep.toml", console=quiet) == 1
    assert counter.read_text() == "x" * 6  # nothing ran again: the successes are done, the failures kept
    (out / "runs" / f"{rows[1]['run_id']}.status.json").unlink()  # as if the sweep had stopped in that run
    assert experiment.run_experiment(spec, "sweep.toml", retry_failed=True, console=quiet) == 1
    assert counter.read_text() == "x" * 9  # that one, and the two failures


@pytest.mark.cluster  # (a process: a stand-in for zps run that never ends)
def test_a_run_past_its_timeout_is_stopped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def command(run: Run, metrics_out: Path, python: str = sys.executable) -> list[str]:
        return [python, "-c", "import threading; print('waiting', flush=True); threading.Event().wait()"]

    monkeypatch.setattr(Run, "command", command)
    spec = parse_spec({"script": STEPS_SCRIPT, "timeout": 0.5}, default_out=tmp_path / "out")
    assert experiment.run_experiment(spec, "t.toml", console=Console(file=io.StringIO())) == 1
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert row["status"] == "timeout" and row["rc"] == -15 and row["error"].startswith("timed out after")


@pytest.mark.unit
def test_dry_run_prints_each_runs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(f'script = "{STEPS_SCRIPT}"\nargs = ["--steps", "5"]\n[matrix]\nmode = ["bsp", "asp"]\n')
    assert zps_main(["experiment", str(spec_file), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("none-asp-s1w1-")
    # (an absolute path under the current directory is shown relative to it)
    assert "--mode asp" in lines[1] and lines[1].endswith(f"{os.path.relpath(STEPS_SCRIPT)} --steps 5")
    assert not (tmp_path / "o").exists()
    spec_file.write_text('[matrix]\nnet = ["bw=fast"]\n')
    assert zps_main(["experiment", str(spec_file)]) == 2
    assert "bandwidth 'fast'" in capsys.readouterr().err


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_an_experiment_runs_two_configurations_end_to_end(tag: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "two.toml"
    spec_file.write_text(f'script = "{STEPS_SCRIPT}"\nargs = ["--steps", "20"]\nservers = 1\nworkers = 2\n'
                         f'out = "{tmp_path / "out"}"\ntimeout = 120\n'
                         '[matrix]\ncodec = ["", "topk:ratio=0.1"]\nerror_feedback = [true]\n')
    code, text = finish(start(tag, ["experiment", str(spec_file)]), timeout=240)
    assert code == 0, text
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["codec"], r["error_feedback"], r["status"], r["steps"]) for r in rows] == [
        ("", "False", "ok", "40"), ("topk:ratio=0.1", "True", "ok", "40")]  # 2 workers x 20 steps
    # (tensors under --compress-min, 1024 elements, go uncompressed: about half of this model's bytes)
    assert float(rows[1]["push_bytes_per_step"]) < 0.7 * float(rows[0]["push_bytes_per_step"])
    assert float(rows[1]["push_ratio"]) > 1.4 > 1.0 > float(rows[0]["push_ratio"]) > 0.5
    assert (tmp_path / "out" / "loss_vs_time.png").exists()  # the script reports a loss, no accuracy
    code, text = finish(start(tag, ["experiment", str(spec_file)]), timeout=60)
    assert code == 0 and "2 of 2 runs already done" in text, text


# -- what the worker writes, as the lab reads it -------------------------------------------------------------------
@pytest.mark.unit
def test_a_steps_record_holds_the_loss_and_samples_reported_after_it(tmp_path: Path) -> None:
    from zps.protocol.stepmetrics import MetricsFile, parts_dir
    from zps.protocol.trace import Tracer
    from zps.worker._progress import Progress

    path = str(tmp_path / "m.jsonl")
    progress = Progress(Tracer(), MetricsFile(path, "worker", 0))
    progress.ready()
    for step in (69, 70, 71):  # a resumed worker's first steps, the script reporting after each opt.step()
        progress.step_begin(step)
        progress.step_end(step)
        progress.reported(loss=1.0 / (step - 68), samples=8)
    progress.step_begin(72)
    progress.step_end(72)  # the last step: the script ends without a report
    progress.end()
    records = read_records(parts_dir(path) / "worker-0.jsonl")
    steps = [(r["step"], r["loss"], r["samples"]) for r in records if r["kind"] == "step"]
    assert steps == [(69, 1.0, 8), (70, 0.5, 8), (71, pytest.approx(1 / 3), 8), (72, None, 0)]
    assert [r["kind"] for r in records] == ["step"] * 4 + ["end"]  # in order, none lost
    assert [r["t"] for r in records] == sorted(r["t"] for r in records)
