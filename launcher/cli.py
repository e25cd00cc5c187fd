"""The ``zps`` command. Job options, their defaults and their help come from :class:`JobConfig`'s fields."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from zps.protocol.config import ConfigError, JobConfig, configure_logging, flag_of, option_default, option_of
from zps.protocol.variables import env_name


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a TCP port is a number 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {text}")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_job_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`JobConfig` field, with its type, default, choices and help (checks: JobConfig's).

    A field marked ``launcher_env`` takes its default from the launcher's own ``ZPS_<NAME>`` where set."""
    group = p.add_argument_group("job options (every process of the job gets them as ZPS_* variables)")
    for f in fields(JobConfig):
        flag, opt = flag_of(f), option_of(f)
        if flag is None or opt is None:
            continue
        try:
            default = option_default(f, os.environ)
        except ConfigError:  # job_config says so, for the commands that start a job
            default = f.default
        if f.name == "staleness" and env_name(f.name) not in os.environ:
            default = None  # not given: job_config refuses --mode ssp without it
        names = [flag, opt.short] if opt.short else [flag]
        help_text = f"{opt.help} (default {default!r})" if default not in ("", False) else opt.help
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(*names, dest=f.name, action=action, default=default, help=opt.help)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(*names, dest=f.name, type=kind, default=default, choices=opt.choices,
                           metavar=opt.metavar, help=help_text)


def job_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobConfig:
    """The :class:`JobConfig` of the parsed options; a bad value or spec ends the command with one line."""
    try:
        for f in fields(JobConfig):
            option_default(f, os.environ)  # a bad default from the launcher's environment (ZPS_PRELOAD=maybe)
        if hasattr(args, "staleness") and args.staleness is None:
            if getattr(args, "mode", "bsp") == "ssp":
                raise ConfigError("--mode ssp needs --staleness N: how many clocks a worker may run ahead of the "
                                  "slowest (0: every worker waits for every other, each push applied alone)")
            args.staleness = 0
        job = JobConfig(**{f.name: getattr(args, f.name) for f in fields(JobConfig) if hasattr(args, f.name)})
        job.check_specs()
    except ConfigError as exc:
        parser.error(str(exc))
    return job


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """The options of ``zps launch`` beyond the job's own (add_job_options)."""
    hosts = p.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--hostfile", help="the hosts, one a line: 'node1 slots=4' (see zps/launcher/hostfile.py)")
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
    p.add_argument("--dry-run", action="store_true",
                   help="print where each process goes and its command; start nothing")


def add_insecure(p: argparse.ArgumentParser, what: str) -> None:
    """``--secure`` on by default (``zps launch``, ``zps k8s``: ports reachable from a network); ``--insecure``
    turns it off."""
    p.set_defaults(secure=True)
    p.add_argument("--insecure", dest="secure", action="store_false",
                   help=f"no CurveZMQ: anyone who reaches {what} can join, read and change the model (warns)")


def _warn_insecure(job: JobConfig, command: str) -> None:
    if not job.secure:
        print(f"zps {command}: warning: --insecure: any process that can reach the job's ports can read and change "
              "the model, or end the job (see docs/security.md)", file=sys.stderr)


def add_script(p: argparse.ArgumentParser, required: bool = True,
               what: str = "the training script every worker runs") -> None:
    p.add_argument("script", nargs=None if required else "?", help=what)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.allow_abbrev = False  # a script's --n is the script's, never an abbreviation of a zps option


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zps", description="zps: a parameter server for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job on this host: coordinator, servers and workers as local processes")
    add_job_options(run)
    add_script(run)

    launch_p = sub.add_parser("launch", help="run a job on the hosts of a hostfile, over ssh")
    add_job_options(launch_p)
    add_launch_options(launch_p)
    add_insecure(launch_p, "a port of the job")
    add_script(launch_p, what="the training script every worker runs (a path in --workdir)")

    node = sub.add_parser("node", help="run the one role this process's environment names (ZPS_ROLE, DMLC_ROLE, "
                                       "a Kubernetes pod, torchrun)")
    node.add_argument("--servers", "-s", type=_positive(int), default=None,
                      help="number of servers, where the environment does not say (torchrun starts only workers)")
    add_script(node, required=False, what="the training script (the worker role runs it)")

    slurm = sub.add_parser("slurm", help="run one task of an srun step: task 0 also runs the coordinator")
    slurm.add_argument("--port", type=_port, default=None, help="the coordinator's port (default 29600)")
    slurm.add_argument("--servers", "-s", type=_positive(int), default=None, help="number of servers (default 1)")
    add_script(slurm, required=False, what="the training script (the worker role runs it)")

    k8s = sub.add_parser("k8s", help="print a Kubernetes manifest for a job (kubectl apply -f -)")
    add_job_options(k8s)
    add_insecure(k8s, "the job's pods")
    k8s.add_argument("--image", required=True, help="the container image, with zps and the script in it")
    k8s.add_argument("--namespace", default=None, help="the namespace of every object")
    k8s.add_argument("--name", default="zps", help="the prefix of every object's name (default zps)")
    k8s.add_argument("--port", type=_port, default=None, help="the coordinator's port (default 29600)")
    k8s.add_argument("--gpus-per-worker", type=int, default=0, help="nvidia.com/gpu per worker pod (default 0)")
    k8s.add_argument("--checkpoint-claim", default=None, metavar="PVC",
                     help="a PersistentVolumeClaim every pod mounts at --checkpoint-dir")
    add_script(k8s, what="the training script, a path inside the image")

    top = sub.add_parser("top", help="a live view of a running job: every role's step, rates, memory, stragglers")
    top.add_argument("--coordinator", "-c", required=True, metavar="HOST:PORT",
                     help="the job's coordinator (zps run and zps launch print it at start)")
    top.add_argument("--interval", type=_positive(float), default=1.0, help="seconds between updates (default 1)")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("--secrets", default=None, metavar="FILE",
                     help="a --secure job's key file (one written by zps secrets, e.g. DIR/worker-0.json)")

    exp = sub.add_parser("experiment", help="run every configuration of a spec's matrix (codecs, modes, networks, "
                                            "seeds...) as a fresh local job; a table, CSV/JSON and plots "
                                            "(docs/experiments.md)")
    exp.add_argument("spec", help="the spec, a TOML file (or YAML with PyYAML installed)")
    exp.add_argument("--out", default=None, metavar="DIR", help="where the runs and results go (default: the "
                                                                  "spec's out, else <spec name>.out)")
    exp.add_argument("--dry-run", action="store_true", help="print each run's id and command; run nothing")
    exp.add_argument("--retry-failed", action="store_true", help="run the runs that failed before again "
                                                                 "(those that succeeded are always kept)")
    exp.add_argument("--summary-only", action="store_true",
                     help="run nothing: write the results of the runs done so far")

    plan = sub.add_parser("plan", help="predict a job's step time and its bottleneck (compute, codecs, links with "
                                       "incast, servers) from a short calibration on this host")
    from zps.lab.planner import add_arguments

    add_arguments(plan)

    chaos = sub.add_parser("chaos", help="run a job and kill or pause its roles at random, repeatedly; then check "
                                         "that it completed and left nothing behind (docs/failures.md)")
    from zps.lab.chaos import add_arguments as chaos_arguments

    chaos_arguments(chaos)

    keys = sub.add_parser("secrets", help="write a job's keys for --secure, one 0600 file per process, for "
                                          "schedulers that start the processes themselves (ZPS_SECRETS_DIR)")
    keys.add_argument("directory", help="where to write them (made 0700; on a file system every host shares)")
    keys.add_argument("--servers", "-s", type=_positive(int), required=True, help="number of servers")
    keys.add_argument("--workers", "-w", type=_positive(int), required=True, help="number of workers")
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .local import run_local

    if not os.path.exists(args.script):
        parser.error(f"script {args.script!r} not found")
    return run_local(job_config(args, parser), [args.script, *args.args])


def _launch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``zps launch``: the job on the hosts of a hostfile, over ssh."""
    from .backend import LaunchError
    from .hostfile import HostfileError, parse_host_list, read_hostfile
    from .job import run_job
    from .ssh import SshBackend
    from .ssh_command import Remote, SshOptions, parse_env_options

    job = job_config(args, parser)
    _warn_insecure(job, "launch")
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else parse_host_list(args.hosts)
        remote = Remote(python=args.python, workdir=args.workdir, env=parse_env_options(args.env),
                        interface=args.interface)
        ssh = SshOptions(port=args.ssh_port, user=args.user, options=tuple(args.ssh_option),
                         connect_timeout=args.connect_timeout)
        backend = SshBackend(hosts, [args.script, *args.args], remote, ssh, preflight=not args.skip_preflight,
                             preflight_timeout=args.preflight_timeout, port=args.port)
        if args.dry_run:
            print(backend.describe(job))
            return 0
    except (HostfileError, LaunchError, ConfigError) as exc:
        print(f"zps launch: {str(exc).removeprefix('zps launch: ')}", file=sys.stderr)
        return 2
    return run_job(job, backend, port=args.port)


def _k8s(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .k8s import DEFAULT_PORT, render_manifest

    job = job_config(args, parser)
    _warn_insecure(job, "k8s")
    try:
        text = render_manifest(args.image, job, [args.script, *args.args], namespace=args.namespace,
                               port=args.port or DEFAULT_PORT, name=args.name, gpus_per_worker=args.gpus_per_worker,
                               checkpoint_claim=args.checkpoint_claim)
    except ValueError as exc:  # ConfigError is one too
        print(f"zps k8s: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    """``zps experiment SPEC``: the sweep (:mod:`.experiment`)."""
    from zps.lab.experiment import run_experiment
    from zps.lab.experiment_spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, out=args.out)
        return run_experiment(spec, args.spec, dry_run=args.dry_run, retry_failed=args.retry_failed,
                              summary_only=args.summary_only)
    except SpecError as exc:
        print(f"zps experiment: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zps experiment: stopped; the finished runs are kept, run the command again to go on",
              file=sys.stderr)
        return 130


def _secrets(args: argparse.Namespace) -> int:
    """``zps secrets DIR``: fresh keys for a job, for ``ZPS_SECURE=1 ZPS_SECRETS_DIR=DIR`` (Slurm, your own)."""
    from zps.protocol.security import make_secrets, write_secrets

    try:
        where = write_secrets(args.directory, make_secrets(args.servers, args.workers))
    except OSError as exc:
        print(f"zps secrets: cannot write {args.directory}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"zps secrets: keys for {args.servers} servers and {args.workers} workers in {where}; give every "
          f"process ZPS_SECURE=1 ZPS_SECRETS_DIR={where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("node", "slurm"):
        from . import node

        script = [args.script, *args.args] if args.script else []
        if args.command == "node":
            return node.main_node(script, num_servers=args.servers)
        return node.main_slurm(script, num_servers=args.servers, port=args.port)
    configure_logging(getattr(args, "log_level", "WARNING"))
    if args.command == "run":
        return _run(args, parser)
    if args.command == "launch":
        return _launch(args, parser)
    if args.command == "k8s":
        return _k8s(args, parser)
    if args.command == "secrets":
        return _secrets(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "plan":
        from zps.lab.planner import main as plan_main

        return plan_main(args)
    if args.command == "chaos":
        from zps.lab.chaos import main as chaos_main

        return chaos_main(args)
    if args.command == "top":
        from zps.telemetry.top import main_top

        return main_top(args.coordinator, args.interval, args.once, args.secrets)
    return 2


if __name__ == "__main__":
    sys.exit(main())
