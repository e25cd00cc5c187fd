"""The ``zps`` command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ps.consistency import MODES

from .job import JobSpec
from .local import run_local


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", "-s", type=_positive(int), default=1, help="number of parameter servers (default 1)")
    p.add_argument("--workers", "-w", type=_positive(int), default=1, help="number of workers (default 1)")
    p.add_argument("--mode", choices=MODES, default="bsp", help="consistency: bsp (default), asp or ssp")
    p.add_argument("--staleness", type=int, default=0, help="SSP: how many clocks a worker may run ahead (default 0)")
    p.add_argument("--optimizer", default="", help="server optimizer spec the example scripts use, e.g. sgd:lr=0.1,momentum=0.9")
    p.add_argument("--codec", default="", help="gradient codec for pushes, e.g. topk:ratio=0.01")
    p.add_argument("--pull-codec", default="", help="codec for compressed pulls (deltas with server-side error feedback)")
    p.add_argument("--error-feedback", action="store_true", help="wrap the push codec in error feedback")
    p.add_argument("--compress-min", type=int, default=1024, metavar="N",
                   help="tensors with fewer elements go uncompressed (default 1024)")
    p.add_argument("--timeout", type=_positive(float), default=120.0, help="seconds any wait may take before the job fails naming what is missing")
    p.add_argument("--heartbeat-timeout", type=_positive(float), default=15.0, help="seconds of silence after which a process is declared dead")


def job_spec(args: argparse.Namespace, host: str = "127.0.0.1") -> JobSpec:
    if args.staleness < 0:
        raise SystemExit("zps: --staleness must be >= 0")
    if args.mode != "ssp" and args.staleness:
        raise SystemExit(f"zps: --staleness only applies to --mode ssp (got --mode {args.mode})")
    return JobSpec(
        num_servers=args.servers,
        num_workers=args.workers,
        mode=args.mode,
        staleness=args.staleness,
        host=host,
        timeout=args.timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        optimizer=args.optimizer,
        codec=args.codec,
        pull_codec=args.pull_codec,
        error_feedback=args.error_feedback,
        compress_min=args.compress_min,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zps", description="zps: a parameter server for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job on this host: coordinator, servers and workers as local processes")
    add_job_options(run)
    run.add_argument("script", help="the training script every worker runs")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ZPS_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        if not os.path.exists(args.script):
            print(f"zps: script {args.script!r} not found", file=sys.stderr)
            return 2
        return run_local(job_spec(args), [args.script, *args.args])
    return 2


if __name__ == "__main__":
    sys.exit(main())
