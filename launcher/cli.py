"""The ``zps`` command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from zps.protocol.config import MODES

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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {text}")
    return value


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """The options of ``zps launch`` beyond the job's own (add_job_options)."""
    hosts = p.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--hostfile", help="the hosts, one a line: 'node1 slots=4' (see launcher/hostfile.py)")
    hosts.add_argument("--hosts", help="the hosts inline, Horovod style: node1:4,node2:4")
    p.add_argument("--port", type=_port, default=0, help="the coordinator's port (default: a free one)")
    p.add_argument("--interface", default=None,
                   help="bind the coordinator and every server and worker to this interface's IPv4 address on "
                        "its host (default: the address the launcher reaches each host at)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a variable for every remote process (repeatable)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter on the hosts (default: this one, %(default)s)")
    p.add_argument("--workdir", default=os.getcwd(), help="the directory on the hosts (default: this one)")
    p.add_argument("--ssh-port", type=_port, default=None, help="ssh port (default: ssh's own, ~/.ssh/config)")
    p.add_argument("--user", default=None, help="remote user (default: ssh's own, ~/.ssh/config)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="an extra ssh -o option, e.g. IdentityFile=~/.ssh/cluster (repeatable)")
    p.add_argument("--connect-timeout", type=_positive(float), default=10.0,
                   help="seconds ssh may take to connect (default 10)")
    p.add_argument("--preflight-timeout", type=_positive(float), default=20.0,
                   help="seconds the check of each host may take (default 20)")
    p.add_argument("--skip-preflight", action="store_true", help="start without checking the hosts first")
    p.add_argument("--dry-run", action="store_true", help="print where each process goes and its command; start nothing")


def launch(args: argparse.Namespace) -> int:
    """``zps launch``: the job on the hosts of a hostfile, over ssh."""
    from dataclasses import replace

    from .env_roles import LaunchEnvError
    from .hostfile import HostfileError, parse_host_list, read_hostfile
    from .ssh import LaunchError, Remote, SshOptions, parse_env_options, run_ssh

    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else parse_host_list(args.hosts)
        remote = Remote(python=args.python, workdir=args.workdir, env=parse_env_options(args.env),
                        interface=args.interface)
        ssh = SshOptions(port=args.ssh_port, user=args.user, options=tuple(args.ssh_option),
                         connect_timeout=args.connect_timeout)
        spec = replace(job_spec(args), port=args.port)
        return run_ssh(spec, hosts, [args.script, *args.args], remote, ssh, dry_run=args.dry_run,
                       preflight=not args.skip_preflight, preflight_timeout=args.preflight_timeout)
    except (HostfileError, LaunchError, LaunchEnvError) as exc:
        print(f"zps launch: {exc}", file=sys.stderr)
        return 2


def add_node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", "-s", type=_positive(int), default=None,
                   help="number of servers, where the environment does not say (torchrun starts only workers)")
    p.add_argument("script", nargs="?", help="the training script (the worker role runs it)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zps", description="zps: a parameter server for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job on this host: coordinator, servers and workers as local processes")
    add_job_options(run)
    run.add_argument("script", help="the training script every worker runs")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")

    launch_p = sub.add_parser("launch", help="run a job on the hosts of a hostfile, over ssh")
    add_job_options(launch_p)
    add_launch_options(launch_p)
    launch_p.add_argument("script", help="the training script every worker runs (a path in --workdir)")
    launch_p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")

    node = sub.add_parser("node", help="run the one role this process's environment names (ZPS_ROLE, DMLC_ROLE, "
                                       "a Kubernetes pod, torchrun)")
    add_node_options(node)

    slurm = sub.add_parser("slurm", help="run one task of an srun step: task 0 also runs the coordinator")
    slurm.add_argument("--port", type=_port, default=None, help="the coordinator's port (default 29600)")
    add_node_options(slurm)

    k8s = sub.add_parser("k8s", help="print a Kubernetes manifest for a job (kubectl apply -f -)")
    k8s.add_argument("--image", required=True, help="the container image, with zps and the script in it")
    k8s.add_argument("--servers", "-s", type=_positive(int), default=1, help="number of servers (default 1)")
    k8s.add_argument("--workers", "-w", type=_positive(int), default=1, help="number of workers (default 1)")
    k8s.add_argument("--namespace", default=None, help="the namespace of every object")
    k8s.add_argument("--name", default="zps", help="the prefix of every object's name (default zps)")
    k8s.add_argument("--port", type=_port, default=None, help="the coordinator's port (default 29600)")
    k8s.add_argument("--gpus-per-worker", type=int, default=0, help="nvidia.com/gpu per worker pod (default 0)")
    k8s.add_argument("script", help="the training script, a path inside the image")
    k8s.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def k8s_manifest(args: argparse.Namespace) -> int:
    from .k8s import DEFAULT_PORT, render_manifest

    try:
        text = render_manifest(args.image, args.servers, args.workers, [args.script, *args.args],
                               namespace=args.namespace, port=args.port or DEFAULT_PORT, name=args.name,
                               gpus_per_worker=args.gpus_per_worker)
    except ValueError as exc:  # LaunchEnvError is one too
        print(f"zps k8s: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ZPS_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        if not os.path.exists(args.script):
            print(f"zps: script {args.script!r} not found", file=sys.stderr)
            return 2
        return run_local(job_spec(args), [args.script, *args.args])
    if args.command == "launch":
        return launch(args)
    if args.command == "k8s":
        return k8s_manifest(args)
    if args.command in ("node", "slurm"):
        from . import node

        script = [args.script, *args.args] if args.script else []
        if args.command == "node":
            return node.main_node(script, num_servers=args.servers)
        return node.main_slurm(script, num_servers=args.servers, port=args.port)
    return 2


if __name__ == "__main__":
    sys.exit(main())
