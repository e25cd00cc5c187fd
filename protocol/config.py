"""Every setting of a zps job, in one place: two frozen dataclasses filled once from ``ZPS_*`` variables.

* :class:`JobConfig` -- what every process of a job shares (its size, consistency mode, codecs, timeouts, log
  level). Each field declares its help text, its command-line flag and its checks; the ``zps`` command derives
  its options, defaults and help from these fields, and the launcher hands the result to every process as
  ``ZPS_<FIELD>`` variables (:meth:`JobConfig.to_env`).
* :class:`Config` -- one process: its role, rank, the coordinator's address, the address it binds, plus the job's
  :class:`JobConfig`.

Each field's variable is ``ZPS_`` + its name in capitals (:func:`~zps.protocol.variables.env_name`; the names
and the readers of their values are in :mod:`zps.protocol.variables`). The ``DMLC_*`` variables of ps-lite
and BytePS manifests are read too (:mod:`zps.protocol.dmlc`; a ``ZPS_*`` variable wins). Nothing else in zps reads
``os.environ`` for its settings; tests pass a plain mapping. Both classes check themselves on construction and
raise :class:`ConfigError` naming the variable and the flag.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from .dmlc import ALIASES, with_dmlc
from .peers import ROLES
from .variables import ConfigError, env_name

# consistency modes, implemented by zps.ps.consistency
MODES = ("bsp", "asp", "ssp")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
WORKER_POLICIES = ("abort", "shrink", "restart")
DEFAULT_CHECKPOINT_EVERY = "300s"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """How one setting is described and checked (the metadata of a field, see :func:`setting`)."""

    help: str
    flag: str | None = None  # the command-line flag; None: --name-with-dashes; "": not on the command line
    short: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    positive: bool = False
    required: bool = False  # a process cannot start without its variable (the default is the CLI's)
    metavar: str | None = None
    launcher_env: bool = False  # the launcher's own variable, where set, is the command line's default


def setting(default: Any, help: str, **option: Any) -> Any:
    """A dataclass field carrying its :class:`Option`."""
    return field(default=default, metadata={"zps": Option(help, **option)})


def option_of(f: Field) -> Option | None:
    return f.metadata.get("zps")


def flag_of(f: Field) -> str | None:
    """The command-line flag of a field, or None when it has none."""
    opt = option_of(f)
    if opt is None or opt.flag == "":
        return None
    return opt.flag or "--" + f.name.replace("_", "-")


def describe_setting(f: Field) -> str:
    """How errors name a setting: its variable, and its flag where it has one."""
    flag = flag_of(f)
    return f"{env_name(f.name)} ({flag})" if flag else env_name(f.name)


def _parse(f: Field, text: str) -> Any:
    """A variable's text as the field's type (``int``, ``float``, ``bool`` or ``str``)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = env_name(f.name)
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ConfigError(f"{name}={text!r} is not a boolean (1/0, true/false, yes/no, on/off)")
        return lowered in _TRUE
    if kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not an integer") from None
    if kind == "float":
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a number") from None
    return text


def option_default(f: Field, env: Mapping[str, str]) -> Any:
    """The command line's default for a field: its variable in ``env`` (the launcher's environment) where the
    field allows that (``launcher_env``) and it is set, else the field's default. ConfigError on a bad value."""
    opt = option_of(f)
    text = env.get(env_name(f.name), "") if opt is not None and opt.launcher_env else ""
    return _parse(f, text) if text else f.default


def _check_fields(obj: Any) -> None:
    """Each field's own checks (choices, minimum, positive), naming the setting."""
    for f in fields(obj):
        opt = option_of(f)
        if opt is None:
            continue
        value = getattr(obj, f.name)
        what = describe_setting(f)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{what}={value!r} is not one of {', '.join(opt.choices)}")
        if opt.minimum is not None and value < opt.minimum:
            raise ConfigError(f"{what}={value} must be >= {opt.minimum:g}")
        if opt.positive and not value > 0:
            raise ConfigError(f"{what}={value} must be > 0")


def _from_env(cls: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """The fields of ``cls`` that ``env`` sets (parsed), plus the required ones (or ConfigError naming them)."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        opt = option_of(f)
        if opt is None:
            continue
        text = env.get(env_name(f.name), "")
        if text != "":
            values[f.name] = _parse(f, text)
        elif opt.required:
            alias = ALIASES.get(env_name(f.name))
            hint = f" (or {alias})" if alias else ""
            raise ConfigError(f"{env_name(f.name)}{hint} is not set; the launcher sets it, or set it yourself")
    return values


def _to_env(obj: Any) -> dict[str, str]:
    out = {}
    for f in fields(obj):
        if option_of(f) is None:
            continue
        value = getattr(obj, f.name)
        out[env_name(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


@dataclass(frozen=True)
class JobConfig:
    """The settings every process of one job shares. ``zps run --help`` lists them with these texts."""

    num_servers: int = setting(1, "number of parameter servers", flag="--servers", short="-s", minimum=1,
                               required=True)
    num_workers: int = setting(1, "number of workers", flag="--workers", short="-w", minimum=1, required=True)
    max_workers: int = setting(0, "workers may join the running job up to this many (ranks --workers .. M-1, "
                                  "e.g. with zps node); 0: no joins", minimum=0, metavar="M")
    mode: str = setting("bsp", "consistency: bsp (synchronous), asp (asynchronous) or ssp (bounded staleness)",
                        choices=MODES)
    staleness: int = setting(0, "ssp: how many clocks a worker may run ahead of the slowest", minimum=0)
    bsp_sum: str = setting("rank", "bsp: the order a step's pushes are summed in: rank (the same bits on every run, "
                                   "whatever order pushes arrive in) or arrival (as they come)",
                           choices=("rank", "arrival"))
    optimizer: str = setting("", "the server optimizer, a torch.optim spec such as adam:lr=1e-3; the script "
                                 "builds it with zps.worker.build_optimizer (refused when the script builds "
                                 "another)", metavar="SPEC")
    codec: str = setting("", "gradient codec for pushes, e.g. topk:ratio=0.01", metavar="SPEC")
    pull_codec: str = setting("", "codec for compressed pulls (deltas, with the server's own error feedback)",
                              metavar="SPEC")
    error_feedback: bool = setting(False, "wrap the push codec in error feedback")
    compress_min: int = setting(1024, "tensors with fewer elements (biases, norms) go uncompressed", minimum=0,
                                metavar="N")
    shm: bool = setting(True, "move tensor bytes through shared memory where a worker and a server share a host")
    timeout: float = setting(120.0, "seconds any wait may take before the job fails naming what it waits for",
                             positive=True, metavar="SECONDS")
    heartbeat_interval: float = setting(0.5, "seconds between heartbeats (each carries the process's progress to "
                                             "the coordinator)", positive=True, metavar="SECONDS")
    heartbeat_timeout: float = setting(15.0, "seconds of silence after which a process is declared dead",
                                       positive=True, metavar="SECONDS")
    log_level: str = setting("INFO", "log level of every process of the job", choices=LOG_LEVELS)
    checkpoint_dir: str = setting("", "write checkpoints here (across hosts: a file system every host shares)",
                                  metavar="DIR")
    checkpoint_every: str = setting("", f"a checkpoint every N steps (100) or seconds (30s); with --checkpoint-dir "
                                        f"the default is {DEFAULT_CHECKPOINT_EVERY}", metavar="N|Ns")
    keep: int = setting(3, "how many of the newest checkpoints to keep", minimum=1, metavar="K")
    resume: str = setting("", "start from this checkpoint, or the newest one in this directory ('latest': the newest "
                              "in --checkpoint-dir)", metavar="DIR")
    max_restarts: int = setting(0, "restart a failed job from its newest checkpoint up to N times", minimum=0,
                                metavar="N")
    replicas: int = setting(0, "keep R backup copies of every chunk on other servers (values and optimizer state); "
                               "a server that dies is replaced by a backup and the job goes on (docs/failures.md)",
                            minimum=0, metavar="R")
    on_worker_failure: str = setting("abort", "when a worker fails: abort the job, shrink (go on without it) or "
                                              "restart it (a replacement with the same rank)", choices=WORKER_POLICIES)
    preload: bool = setting(True, "zps run: start the local processes by forking one process that imported torch "
                                  "once (ZPS_PRELOAD in the launcher's environment sets the default)",
                            launcher_env=True)
    # observability (docs/metrics.md)
    metrics_port: int = setting(0, "serve Prometheus metrics over HTTP: the coordinator (its own and every "
                                   "worker's) on PORT, server r on PORT+1+r, on --metrics-host (0: off)",
                                minimum=0, metavar="PORT")
    metrics_host: str = setting("127.0.0.1", "the address --metrics-port serves on: loopback unless asked; 'host': "
                                             "each role's own address (reachable from other hosts: the metrics "
                                             "name hosts, parameters and rates, with no authentication), or an "
                                             "address such as 0.0.0.0", metavar="ADDRESS")
    trace: str = setting("", "write Chrome-trace spans of every worker and server into DIR; the launcher merges "
                             "them into DIR/trace.json at the end (Perfetto, chrome://tracing)", metavar="DIR")
    straggler_factor: float = setting(1.5, "flag a worker whose step time (without waiting for the servers) is this "
                                           "many times the median of the others'", positive=True, metavar="X")
    progress: str = setting("auto", "zps run/launch: a live view per role (live), one line per role every 10 s "
                                    "(lines), or nothing (off); auto: live on a terminal, else lines",
                            choices=("auto", "live", "lines", "off"), launcher_env=True)
    metrics_out: str = setting("", "write per-step metrics of every worker and server as JSON lines into FILE "
                                   "(format: docs/experiments.md)", metavar="FILE")
    # simulation (docs/experiments.md; specs: zps.protocol.simulation)
    net: str = setting("", "zps run: emulate a network on this host; each role's link gets a bandwidth, one-way "
                           "latency and jitter, e.g. 'bw=100mbit,latency=2ms,jitter=0.5ms'; overrides after ';' "
                           "for a role or one process: ';worker:3=bw=10mbit' (turns --shm off)", metavar="SPEC")
    straggler: str = setting("", "slow worker RANK's compute by FACTOR (2: each step takes twice as long); "
                                 "comma-separated for several", metavar="RANK:FACTOR")
    jitter: str = setting("", "every worker pauses SECONDS in a step with probability P (random stalls)",
                          metavar="P:SECONDS")
    kill: str = setting("", "kill a process (SIGKILL) once it reaches STEP, e.g. worker:1@50 or server:0@80; "
                            "comma-separated for several", metavar="ROLE:RANK@STEP")
    secure: bool = setting(False, "CurveZMQ on every socket: only processes holding the job's keys are answered, "
                                  "each bound to its role and rank (zps launch and zps k8s: on unless --insecure)")
    # caps on what a peer can make a server or the coordinator hold (docs/security.md); a request over one is
    # refused with an error naming it and this setting
    max_message_bytes: int = setting(1 << 30, "cap: the largest message a server or the coordinator receives "
                                              "(ZeroMQ drops a peer that sends more)", minimum=1 << 16,
                                     metavar="BYTES")
    max_header_bytes: int = setting(4 << 20, "cap: the largest message header", minimum=1 << 12, metavar="BYTES")
    max_key_elements: int = setting(1 << 28, "cap: elements in one key (a chunk of a parameter)", minimum=1,
                                    metavar="N")
    max_keys: int = setting(1 << 16, "cap: keys one server holds (each costs about 1 KiB even before it has values)",
                            minimum=1, metavar="N")
    max_server_bytes: int = setting(1 << 36, "cap: bytes of parameters one server holds (their optimizer state "
                                             "comes on top)", minimum=1 << 20, metavar="BYTES")
    max_pending: int = setting(256, "cap: requests of one worker a server keeps waiting", minimum=1, metavar="N")
    max_tables: int = setting(64, "cap: embedding tables a job declares (every server holds an index, counters and, "
                                  "with admit > 1, a 16 MB sketch for each)", minimum=1, metavar="N")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.staleness and self.mode != "ssp":
            raise ConfigError(f"ZPS_STALENESS (--staleness)={self.staleness} only applies to mode ssp "
                              f"(the mode is {self.mode})")
        if self.error_feedback and self.codec in ("", "none"):
            raise ConfigError("ZPS_ERROR_FEEDBACK (--error-feedback) needs ZPS_CODEC (--codec): error feedback keeps "
                              "what a lossy codec drops, and without one nothing is dropped")
        if self.checkpoint_every:
            if not self.checkpoint_dir:
                raise ConfigError("ZPS_CHECKPOINT_EVERY (--checkpoint-every) needs ZPS_CHECKPOINT_DIR "
                                  "(--checkpoint-dir)")
            try:
                parse_every(self.checkpoint_every)
            except ValueError as exc:
                raise ConfigError(f"ZPS_CHECKPOINT_EVERY (--checkpoint-every)={exc}") from None
        if self.resume == "latest" and not self.checkpoint_dir:
            raise ConfigError("ZPS_RESUME (--resume)=latest needs ZPS_CHECKPOINT_DIR (--checkpoint-dir)")
        if self.metrics_port and self.metrics_port + 1 + self.num_servers > 65535:
            raise ConfigError(f"ZPS_METRICS_PORT (--metrics-port)={self.metrics_port}: the servers' ports "
                              f"(up to {self.metrics_port + self.num_servers}) must stay below 65536")
        from . import simulation

        for name, parse in (("net", simulation.NetSpec.parse), ("straggler", simulation.parse_stragglers),
                            ("jitter", simulation.parse_jitter), ("kill", simulation.parse_kills)):
            spec = getattr(self, name)
            if spec:
                try:
                    parse(spec)
                except simulation.SpecError as exc:
                    raise ConfigError(f"{env_name(name)} (--{name})={exc}") from None
        if self.replicas:
            self._check_replicas()
        if self.max_workers and self.max_workers < self.num_workers:
            raise ConfigError(f"ZPS_MAX_WORKERS (--max-workers)={self.max_workers}: fewer than the "
                              f"{self.num_workers} workers the job starts with")
        if self.on_worker_failure == "restart" and not self.max_restarts:
            raise ConfigError("ZPS_ON_WORKER_FAILURE (--on-worker-failure)=restart needs ZPS_MAX_RESTARTS "
                              "(--max-restarts) > 0: the replacements draw on it")

    def _check_replicas(self) -> None:
        from .replicas import check_replicas

        try:
            check_replicas(self.replicas, self.num_servers)
        except ValueError as exc:
            raise ConfigError(f"ZPS_REPLICAS (--replicas)={self.replicas}: {exc}") from None
        for name, value in (("checkpoint_dir", self.checkpoint_dir), ("resume", self.resume)):
            if value:  # (a checkpoint part would hold the backups' copies too)
                raise ConfigError(f"ZPS_REPLICAS (--replicas) cannot be combined with {env_name(name)} "
                                  f"(--{name.replace('_', '-')}) yet")

    @property
    def worker_ranks(self) -> int:
        """How many worker ranks the job may ever have: ``max_workers`` where joins are allowed."""
        return max(self.num_workers, self.max_workers)

    def checkpoint_interval(self) -> tuple[str, float] | None:
        """``("steps", N)`` or ``("seconds", S)`` between checkpoints; None without ``--checkpoint-dir``."""
        if not self.checkpoint_dir:
            return None
        return parse_every(self.checkpoint_every or DEFAULT_CHECKPOINT_EVERY)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobConfig:
        """From ``env`` (default ``os.environ``, with ``DMLC_*`` aliases); ConfigError names a bad variable."""
        values = _from_env(cls, with_dmlc(os.environ if env is None else env))
        if "mode" in values:
            values["mode"] = values["mode"].lower()
        if "log_level" in values:
            values["log_level"] = values["log_level"].upper()
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``ZPS_*`` variables that reproduce these settings in another process."""
        return _to_env(self)

    def check_specs(self) -> None:
        """Build the optimizer and codec specs once, as the processes will: ConfigError (one line) when one is
        wrong. The launcher calls this before it starts anything (it imports torch only when a spec is set)."""
        by_name = {f.name: f for f in fields(self)}
        for name in ("optimizer", "codec", "pull_codec"):
            spec = getattr(self, name)
            if not spec:
                continue
            try:
                if name == "optimizer":
                    from .optim_spec import check_optimizer_spec

                    check_optimizer_spec(spec)
                    continue
                from .codecs import codec_factory
                from .codecs.sparse import DgcCodec

                made = codec_factory(spec)()
            except Exception as exc:  # a spec names user code too (import paths): whatever it raises
                raise ConfigError(f"{describe_setting(by_name[name])}={spec!r}: {exc}") from None
            problem = made.feedback_problem() if name == "pull_codec" or self.error_feedback else None
            if problem:
                why = "pulls keep the servers' own error feedback" if name == "pull_codec" else "--error-feedback"
                raise ConfigError(f"{describe_setting(by_name[name])}={spec!r}: {problem} ({why})")
            if name == "pull_codec" and isinstance(made, DgcCodec):
                raise ConfigError(f"{describe_setting(by_name[name])}={spec!r}: {made.name} accumulates and "
                                  "transforms gradients (momentum, Adam directions); a pull sends the servers' "
                                  "values' change with their own error feedback: use topk, int8, fp16, ...")


@dataclass(frozen=True)
class Config:
    """One process: its role and place in the cluster, and the job's settings.

    ``coordinator`` is ``host:port`` of the rendezvous process. ``rank`` is the requested rank within the role
    (``-1``: let the coordinator assign one). ``host`` is the address this process binds (loopback by default,
    never every interface unless asked). ``local_rank`` is its index among its role's processes on its host
    (a worker's GPU is ``cuda:<local_rank>``).
    """

    role: str = setting("", "coordinator, server or worker", flag="", choices=ROLES, required=True)
    coordinator: str = setting("", "host:port of the coordinator", flag="", required=True)
    rank: int = setting(-1, "rank within the role; -1: assigned by the coordinator", flag="", minimum=-1)
    host: str = setting("127.0.0.1", "the address this process binds", flag="")
    local_rank: int = setting(0, "index among the processes of its role on its host", flag="", minimum=0)
    job: JobConfig = field(default_factory=JobConfig)
    # with --secure: this process's keys (zps.protocol.security.Secrets), from its environment, never printed
    secrets: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"ZPS_COORDINATOR={self.coordinator!r} must be host:port")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """From ``env`` (default ``os.environ``, with ``DMLC_*`` aliases); ConfigError names a bad variable."""
        env = with_dmlc(os.environ if env is None else env)
        values = _from_env(cls, env)
        values["role"] = values["role"].lower()
        job = JobConfig.from_env(env)
        if job.secure:
            from .peers import parse_peer
            from .security import load_secrets

            values["secrets"] = secrets = load_secrets(env, values["role"], values.get("rank", -1))
            own = parse_peer(secrets.name)
            if values["role"] != "coordinator":
                if own is None or own[0] != values["role"] or values.get("rank", -1) not in (-1, own[1]):
                    raise ConfigError(f"the keys given are {secrets.name}'s, not this {values['role']}'s "
                                      f"(rank {values.get('rank', -1)})")
                values["rank"] = own[1]
        return cls(**values, job=job)

    def to_env(self) -> dict[str, str]:
        """The ``ZPS_*`` variables that reproduce this configuration in a child process."""
        return {**_to_env(self), **self.job.to_env()}


def parse_every(text: str) -> tuple[str, float]:
    """``--checkpoint-every``: ``"100"`` (steps) or ``"30s"`` (seconds): ``("steps", 100)`` or ``("seconds", 30)``."""
    text = text.strip()
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if seconds > 0:
                return "seconds", seconds
        else:
            steps = int(text)
            if steps > 0:
                return "steps", steps
    except ValueError:
        pass
    raise ValueError(f"{text!r} is neither a number of steps (100) nor of seconds (30s), > 0")


def configure_logging(level: str) -> None:
    """Log lines as ``LEVEL name: message`` at ``level`` (a :data:`LOG_LEVELS` name), for every role."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
