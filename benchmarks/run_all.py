"""Run every benchmark, one after another, and write benchmarks/RESULTS.md: machine facts plus each one's tables.

    python benchmarks/run_all.py [--quick] [--only transport small] [--out benchmarks/RESULTS.md]

Each benchmark runs as its own process (``python benchmarks/NAME.py [--quick] --json TMP``); a failing one is
reported in RESULTS.md with its output's tail and the others still run. The exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

# name -> (extra arguments for a full run, extra arguments for --quick); "markdown" comes from --json, except for
# codecs.py (another engineer's), whose stdout is its report.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "transport": ([], ["--quick"]),
    "small": ([], ["--quick"]),
    "training": ([], ["--quick"]),
    "memory": ([], ["--quick"]),
    "codecs": (["--numel", "4000000", "--repeats", "3"], ["--numel", "1000000", "--repeats", "3"]),
    "checkpoint": ([], ["--quick"]),
    "secure": ([], ["--quick"]),
    "observability": ([], ["--quick"]),
    "soak": ([], ["--quick"]),
    "codec_overhead": ([], ["--quick"]),
}
JSON_REPORT = {"transport", "small", "training", "memory", "checkpoint", "secure", "observability", "soak",
               "codec_overhead"}


def run_one(name: str, quick: bool, timeout: float) -> dict:
    full, fast = BENCHMARKS[name]
    with tempfile.TemporaryDirectory(prefix="zps-bench-") as tmp:
        out_json = Path(tmp, f"{name}.json")
        argv = [sys.executable, str(C.BENCH_DIR / f"{name}.py"), *(fast if quick else full)]
        if name in JSON_REPORT:
            argv += ["--json", str(out_json)]
        load = C.load_avg()
        print(f"== {name} (load {load}): {' '.join(argv[1:])}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=str(C.ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                print("   " + line.rstrip("\n"), flush=True)
                lines.append(line.rstrip("\n"))
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"{name} ran past {timeout:.0f}s")
            code = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            C._end(proc)
            return {
                "name": name,
                "ok": False,
                "seconds": time.monotonic() - started,
                "load": load,
                "markdown": f"**{name} did not finish**: {exc}\n\n```\n" + "\n".join(lines[-20:]) + "\n```",
            }
        finally:
            C._end(proc)
        seconds = time.monotonic() - started
        if code != 0:
            return {
                "name": name,
                "ok": False,
                "seconds": seconds,
                "load": load,
                "markdown": f"**{name} failed** (exit {code}):\n\n```\n" + "\n".join(lines[-20:]) + "\n```",
            }
        if name in JSON_REPORT:
            data = json.loads(out_json.read_text())
            md = data["markdown"] + f"\n\n(load average before: {data['load_before']}; after: {data['load_after']})"
        else:
            md = f"### {name}\n\n" + "\n".join(lines) + f"\n\n(load average before: {load}; after: {C.load_avg()})"
        return {"name": name, "ok": True, "seconds": seconds, "load": load, "markdown": md}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast pass of every benchmark")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None)
    parser.add_argument("--out", type=Path, default=C.BENCH_DIR / "RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds each benchmark may take")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    started = dt.datetime.now(dt.timezone.utc)
    facts_before = C.machine_facts()
    results = [run_one(name, args.quick, args.timeout) for name in names]
    facts = {
        **facts_before,
        "load_avg_at_start": facts_before.pop("load_avg"),
        "load_avg_at_end": C.load_avg(),
        "zps_code_at_start": facts_before.pop("zps_code"),
        "zps_code_at_end": C.code_version(),
    }
    lines = [
        "# zps benchmark results",
        "",
        f"Generated by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{started.strftime('%Y-%m-%d %H:%M UTC')}; every ratio below comes from one run of its benchmark, with its "
        "baseline measured in the same run. Loopback only; the machine may be shared (see the load averages)."
        + (
            ""
            if facts["zps_code_at_start"] == facts["zps_code_at_end"]
            else " **The zps code changed while these ran** (see zps_code_at_start / _end): later benchmarks "
            "measured newer code."
        ),
        "",
        "## Machine",
        "",
        C.md_table(["fact", "value"], [[k, v] for k, v in facts.items()], align="ll"),
        "",
        "## Summary",
        "",
        C.md_table(
            ["benchmark", "status", "seconds", "load avg at start"],
            [[r["name"], "ok" if r["ok"] else "FAILED", f"{r['seconds']:.0f}", r["load"]] for r in results],
        ),
    ]
    for r in results:
        lines += ["", "## " + r["name"], "", r["markdown"]]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
