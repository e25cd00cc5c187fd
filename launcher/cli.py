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
        names = [flag, opt.short] if opt.short else [flag]
        help_text = f"{opt.help} (default {default!r})" if default not in ("", False) else opt.help
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(*names, dest=f.name, action=action, default=default, help=opt.help)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        extra: dict[str, Any] = {"action": _Given} if f.name == "staleness" else {}
        group.add_argument(*names, dest=f.name, type=kind, default=default, choices=opt.choices,
                           metavar=opt.metavar, help=help_text, **extra)


class _Given(argparse.Action):
    """Stores the value and notes that the option was given (``args.given``): an option whose default would pass
    silently where the user must choose (``--staleness`` under ``--mode ssp``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def job_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobConfig:
    """The :class:`JobConfig` of the parsed options; a bad value or spec ends the command with one line."""
    try:
        for f in fields(JobConfig):
            option_default(f, os.environ)  # a bad default from the launcher's environment (ZPS_PRELOAD=maybe)
        given = getattr(args, "given", set()) | {n for n in ("staleness",) if env_name(n) in os.environ}
        if getattr(args, "mode", "bsp") == "ssp" and "staleness" not in given:
            raise ConfigError("--mode ssp needs --staleness N: how many clocks a worker may run ahead of the "
                              "slowest (0: every worker waits for every other, each push applied alone)")
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


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """The options of ``zps ray`` beyond the job's own (add_job_options)."""
    from .ray_backend import STRATEGIES

    p.add_argument("--address", default=None,
                   help="the Ray cluster (host:port of its head); default: RAY_ADDRESS, else a cluster `ray start` "
                        "began on this host, else a new local one (as ray.init() does)")
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="what travels to the nodes with the job (Ray's runtime environment; .gitignore applies); "
                        "the script is a path in it (default: the current directory)")
    p.add_argument("--server-resources", default='{"CPU": 1}', metavar="JSON",
                   help="each server's bundle, e.g. '{\"CPU\": 4, \"memory\": 8e9}' (default %(default)s)")
    p.add_argument("--worker-resources", default='{"CPU": 1}', metavar="JSON",
                   help="each worker's bundle, e.g. '{\"CPU\": 4, \"GPU\": 1}' or custom resources "
                        "(default %(default)s)")
    p.add_argument("--server-placement", default="spread", choices=sorted(STRATEGIES),
                   help="how the servers' bundles go over the nodes (default spread: Ray's SPREAD)")
    p.add_argument("--worker-placement", default="pack", choices=sorted(STRATEGIES),
                   help="how the workers' bundles go over the nodes (default pack: Ray's PACK)")
    p.add_argument("--placement-timeout", type=_positive(float), default=300.0, metavar="SECONDS",
                   help="seconds the cluster may take to place every bundle (autoscaling, image pulls) before "
                        "the job fails, apart from --timeout (default 300)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a variable for every server and worker (repeatable)")


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
    add_job_options(slurm)
    slurm.add_argument("--port", type=_port, default=None,
                       help="the coordinator's port (default: one derived from SLURM_JOB_ID, 20000-31999)")
    slurm.add_argument("--role", choices=("server", "worker"), default=None,
                       help="this step runs this role alone, rank SLURM_PROCID; ZPS_COORDINATOR and the job's size "
                            "come from the environment (what zps sbatch's script does)")
    add_script(slurm, required=False, what="the training script (the worker role runs it)")

    sbatch = sub.add_parser("sbatch", help="print a batch script that runs a job on Slurm: servers and workers as "
                                           "the two components of a heterogeneous job (docs/launch.md)")
    add_job_options(sbatch)
    add_insecure(sbatch, "a port of the job")
    sbatch.add_argument("--job-name", default="zps", help="the job's name (default zps)")
    sbatch.add_argument("--time", default=None, help="the job's time limit, e.g. 4:00:00")
    sbatch.add_argument("--account", default=None, help="the account to charge")
    sbatch.add_argument("--partition", default=None, help="the partition of both components")
    sbatch.add_argument("--server-partition", default=None, help="the servers' partition (e.g. a CPU one)")
    sbatch.add_argument("--worker-partition", default=None, help="the workers' partition (e.g. a GPU one)")
    sbatch.add_argument("--server-cpus", type=_positive(int), default=2, help="CPUs per server (default 2)")
    sbatch.add_argument("--worker-cpus", type=_positive(int), default=4, help="CPUs per worker (default 4)")
    sbatch.add_argument("--server-mem", default=None, help="memory per server node, e.g. 16G")
    sbatch.add_argument("--worker-mem", default=None, help="memory per worker node, e.g. 64G")
    sbatch.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per worker task (default 0)")
    sbatch.add_argument("--keys-dir", default="$HOME/.zps/keys",
                        help="--secure: where each job's key directory goes, on a file system every node shares "
                             "(default %(default)s)")
    sbatch.add_argument("--zps", default="zps", help="the zps command on the nodes (default zps)")
    sbatch.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="one more sbatch option, e.g. --sbatch=--qos=high (repeatable)")
    add_script(sbatch, what="the training script every worker runs (a path from where the job is submitted)")

    k8s = sub.add_parser("k8s", help="print a Kubernetes manifest for a job (kubectl apply -f -)")
    add_job_options(k8s)
    add_insecure(k8s, "the job's pods")
    k8s.add_argument("--image", default=None, help="the container image, with zps and the script in it (required, "
                                                   "except with --keys)")
    k8s.add_argument("--namespace", default=None, help="the namespace of every object")
    k8s.add_argument("--name", default="zps", help="the prefix of every object's name (default zps)")
    k8s.add_argument("--port", type=_port, default=None, help="the coordinator's port (default 29600)")
    k8s.add_argument("--gpus-per-worker", type=int, default=0, help="nvidia.com/gpu per worker pod (default 0)")
    k8s.add_argument("--checkpoint-claim", default=None, metavar="PVC",
                     help="a PersistentVolumeClaim every pod mounts at --checkpoint-dir")
    k8s.add_argument("--format", default="jobset", choices=("jobset", "jobs"),
                     help="one JobSet (default: needs the JobSet controller) or independent Jobs and a Service")
    from .k8s import DEFAULT_RESOURCES

    for role, amounts in DEFAULT_RESOURCES.items():
        k8s.add_argument(f"--{role}-resources", default=None, metavar="NAME=QTY,...",
                         help=f"each {role} pod's requests = limits (default "
                              f"{','.join(f'{k}={v}' for k, v in amounts.items())}), e.g. cpu=8,memory=32Gi")
    k8s.add_argument("--queue", default=None, help="Kueue's LocalQueue: the JobSet is admitted whole or not at all")
    k8s.add_argument("--ttl", type=int, default=86400, metavar="SECONDS",
                     help="delete the finished job after this long (default a day)")
    k8s.add_argument("--deadline", type=int, default=None, metavar="SECONDS",
                     help="fail any role still running after this long (activeDeadlineSeconds; default none)")
    k8s.add_argument("--keys", action="store_true",
                     help="--secure: print the job's fresh keys instead, one Secret per pod, for kubectl apply -f - "
                          "(the manifest holds none)")
    add_script(k8s, required=False, what="the training script, a path inside the image")

    ray_p = sub.add_parser("ray", help="run a job on a Ray cluster: every server and worker an actor on its bundle of "
                                       "a placement group (docs/launch.md)")
    add_job_options(ray_p)
    add_ray_options(ray_p)
    add_insecure(ray_p, "a port of the job")
    add_script(ray_p, what="the training script every worker runs (a path in --working-dir)")

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
    from zps.lab.plan_cli import add_arguments

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
    for command in sub.choices.values():  # what main() reports a command's errors with (its own usage)
        command.set_defaults(command_parser=command)
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


def _ray(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``zps ray``: the job on a Ray cluster (:mod:`.ray_backend`)."""
    from .backend import LaunchError
    from .job import run_job
    from .ray_backend import RayBackend, RayOptions, parse_resources
    from .ssh_command import parse_env_options

    job = job_config(args, parser)
    _warn_insecure(job, "ray")
    try:
        options = RayOptions(address=args.address, working_dir=args.working_dir,
                             server_resources=parse_resources("--server-resources", args.server_resources),
                             worker_resources=parse_resources("--worker-resources", args.worker_resources),
                             server_placement=args.server_placement, worker_placement=args.worker_placement,
                             placement_timeout=args.placement_timeout, env=parse_env_options(args.env))
        backend = RayBackend([args.script, *args.args], options, sys.stdout)
        backend.connect()
    except LaunchError as exc:
        print(f"zps ray: {str(exc).removeprefix('zps ray: ')}", file=sys.stderr)
        return 2
    try:
        return run_job(job, backend)
    except KeyboardInterrupt:  # while placing the job, before its own handlers: what it reserved is removed
        print("zps ray: interrupted", file=sys.stderr)
        return 130
    finally:
        backend.close()


def _sbatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``zps sbatch``: the batch script (:func:`.slurm.render_sbatch`) on standard output."""
    from .slurm import SbatchOptions, render_sbatch

    job = job_config(args, parser)
    _warn_insecure(job, "sbatch")
    options = SbatchOptions(job_name=args.job_name, time=args.time, account=args.account, partition=args.partition,
                            server_partition=args.server_partition, worker_partition=args.worker_partition,
                            server_cpus=args.server_cpus, worker_cpus=args.worker_cpus, server_mem=args.server_mem,
                            worker_mem=args.worker_mem, gpus_per_worker=args.gpus_per_worker,
                            keys_dir=args.keys_dir, zps=args.zps, extra=tuple(args.sbatch))
    try:
        sys.stdout.write(render_sbatch(job, [args.script, *args.args], options))
    except ValueError as exc:
        print(f"zps sbatch: {exc}", file=sys.stderr)
        return 2
    return 0


def given_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """The ``ZPS_*`` variables of the job options given on the command line (those left at their defaults are not:
    the environment's own ``ZPS_*`` then stand)."""
    job = job_config(args, parser)
    defaults = JobConfig().to_env()
    return {k: v for k, v in job.to_env().items() if v != defaults[k]}


def _k8s(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .k8s import (
        DEFAULT_PORT,
        DEFAULT_RESOURCES,
        K8sOptions,
        option_warnings,
        parse_resources,
        render_manifest,
        render_secrets,
    )

    job = job_config(args, parser)
    if args.keys:
        if not job.secure:
            parser.error("--keys: an --insecure job has no keys")
        if sys.stdout.isatty():
            print("zps k8s --keys: not to a terminal (nor a log): pipe it into kubectl apply -f -", file=sys.stderr)
            return 2
        try:
            sys.stdout.write(render_secrets(job, namespace=args.namespace, name=args.name))
        except ValueError as exc:
            print(f"zps k8s: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.script or not args.image:
        parser.error("--image and the training script (a path inside the image) are required, except with --keys")
    _warn_insecure(job, "k8s")
    try:
        resources = {role: parse_resources(f"--{role}-resources", text) for role in DEFAULT_RESOURCES
                     if (text := getattr(args, f"{role}_resources")) is not None}
        options = K8sOptions(format=args.format, resources={**DEFAULT_RESOURCES, **resources},
                             queue=args.queue, ttl=args.ttl, deadline=args.deadline)
        text = render_manifest(args.image, job, [args.script, *args.args], namespace=args.namespace,
                               port=args.port or DEFAULT_PORT, name=args.name, gpus_per_worker=args.gpus_per_worker,
                               checkpoint_claim=args.checkpoint_claim, options=options)
    except ValueError as exc:  # ConfigError is one too
        print(f"zps k8s: {exc}", file=sys.stderr)
        return 2
    for warning in option_warnings(job, args.format):
        print(f"zps k8s: warning: {warning}", file=sys.stderr)
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
    args = build_parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser  # a command's errors print its usage, not zps's
    if args.command in ("node", "slurm"):
        from . import node

        script = [args.script, *args.args] if args.script else []
        if args.command == "node":
            return node.main_node(script, num_servers=args.servers)
        return node.main_slurm(script, num_servers=args.num_servers, port=args.port, role=args.role,
                               settings=given_settings(args, parser))
    configure_logging(getattr(args, "log_level", "WARNING"))
    if args.command == "run":
        return _run(args, parser)
    if args.command == "launch":
        return _launch(args, parser)
    if args.command == "k8s":
        return _k8s(args, parser)
    if args.command == "ray":
        return _ray(args, parser)
    if args.command == "sbatch":
        return _sbatch(args, parser)
    if args.command == "secrets":
        return _secrets(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "plan":
        from zps.lab.plan_cli import main as plan_main

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
