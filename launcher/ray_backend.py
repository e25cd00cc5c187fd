"""The Ray backend of ``zps ray``: every server and worker an actor on its bundle of a placement group.

``zps ray`` is a Ray driver. It connects to a running cluster (``--address``; without one, as ``ray.init()`` does:
``RAY_ADDRESS``, else a cluster ``ray start`` began on this host, else a new local one), with the current directory
(``--working-dir``) as the job's runtime environment, so the script travels with the job and a node needs only zps.
Then, per job (kept across ``--max-restarts``):

1. :meth:`RayBackend.prepare` reserves two placement groups, one bundle per server (``--server-resources``, spread
   over the nodes by default: ``--server-placement``) and one per worker (``--worker-resources``, packed by
   default: ``--worker-placement``), and waits for both at once -- the gang is placed whole or not at all -- up to
   ``--placement-timeout`` seconds, then fails naming what it asked for and what the cluster has. The coordinator
   runs in this process (:mod:`.job`), bound to this node's address, which every node must reach.
2. :meth:`RayBackend.processes` gives one :class:`~.backend.ProcSpec` per role, labelled with the node its bundle is
   on (``worker 1@10.0.0.3``), started by this backend (:class:`~.backend.Starter`): a
   :class:`~.ray_actor.RoleHost` actor with exactly its bundle's resources runs ``zps node`` there and streams its
   output back (:class:`RayRole`). The roles find each other as under every backend, from their ``ZPS_*``
   variables.
3. An actor that dies (its node lost, an OOM kill, ``ray stop``) is a failure of its role like any other, named with
   its node and Ray's reason: ``--on-worker-failure``, ``--replicas`` and ``--max-restarts`` handle it (a replacement
   actor takes the same bundle, which Ray moves to another node when its node is gone).
4. :meth:`RayBackend.close` kills what still runs, removes the placement groups and disconnects. Actors and
   placement groups belong to this driver: should it die, Ray removes them itself.

``--secure`` keys go to each actor as an argument of its call (:class:`~.ray_actor.RoleHost`), never in a command
line nor in the runtime environment that Ray's dashboard shows.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from zps.protocol.config import JobConfig

from .backend import LaunchError, ProcSpec, Started, role_command, role_env

INSTALL_HINT = "zps ray needs Ray: pip install 'zps[ray]' (or pip install ray) here and on every node of the cluster"
STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict-pack": "STRICT_PACK", "strict-spread": "STRICT_SPREAD"}
DEFAULT_RESOURCES = {"CPU": 1.0}
# the role's processes on Ray: one accelerator per actor (Ray sets CUDA_VISIBLE_DEVICES), so every local rank is 0
LOCAL_RANK = 0


def import_ray() -> Any:
    """The ``ray`` module, or LaunchError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LaunchError(INSTALL_HINT) from None
    return ray


def parse_resources(option: str, text: str) -> dict[str, float]:
    """``--worker-resources '{"CPU": 4, "GPU": 1}'`` as a dict; LaunchError naming the option when it is not one."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LaunchError(f"{option} {text!r} is not JSON ({exc}); write e.g. '{{\"CPU\": 4, \"GPU\": 1}}'") from None
    if not isinstance(value, dict) or not value:
        raise LaunchError(f"{option} {text!r}: write a JSON object of resource amounts, e.g. '{{\"CPU\": 2}}'")
    out = {}
    for name, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise LaunchError(f"{option}: {name}={amount!r} must be a number >= 0")
        out[str(name)] = float(amount)
    if not any(out.values()):
        raise LaunchError(f"{option} {text!r}: a bundle needs some resource > 0 (Ray refuses empty bundles)")
    return out


@dataclass(frozen=True)
class RayOptions:
    """What ``zps ray`` takes beyond the job's own options (see ``zps ray --help``)."""

    address: str | None = None
    working_dir: str = "."
    server_resources: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    worker_resources: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    server_placement: str = "spread"
    worker_placement: str = "pack"
    placement_timeout: float = 300.0
    env: Mapping[str, str] = field(default_factory=dict)


def actor_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """An actor's resource options for exactly one bundle of ``resources``."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    out: dict[str, Any] = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0)}
    if resources.get("memory"):
        out["memory"] = resources["memory"]
    if custom:
        out["resources"] = custom
    return out


def node_names(nodes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Node id -> what messages call the node: its host name where that is unique among ``nodes`` (``ray.nodes()``),
    else its address where that is, else address/first 8 digits of its id (several nodes of one host)."""
    alive = [n for n in nodes if n.get("Alive", True)]
    hostnames = [n.get("NodeManagerHostname", "") for n in alive]
    addresses = [n.get("NodeManagerAddress", "") for n in alive]
    out = {}
    for node in nodes:
        hostname, address = node.get("NodeManagerHostname", ""), node.get("NodeManagerAddress", "")
        if hostname and hostnames.count(hostname) == 1:
            out[node["NodeID"]] = hostname
        elif address and addresses.count(address) == 1:
            out[node["NodeID"]] = address
        else:
            out[node["NodeID"]] = f"{address or hostname}/{node['NodeID'][:8]}"
    return out


class RayBackend:
    """Servers and workers as Ray actors (see the module docstring); :meth:`close` when the job is over."""

    local = False

    def __init__(self, script: Sequence[str], options: RayOptions, out: IO[str]) -> None:
        if not script:
            raise ValueError("no script to run")
        self.script, self.options, self.out = list(script), options, out
        self.ray: Any = None
        self.job_id = uuid.uuid4().hex[:8]  # names this job's placement groups
        self.namespace = f"zps-{self.job_id}"  # its actors'
        self.groups: dict[str, Any] = {}  # role -> its placement group
        self.nodes: dict[str, list[str]] = {}  # role -> the node of each bundle, by rank
        self.roles: list[RayRole] = []
        self.started = 0  # actors started, for their names

    # -- the cluster -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect to the cluster (see the module docstring), with the working directory as the job's."""
        if self.ray is not None:
            return
        address = self.options.address
        if address and address.startswith("ray://"):
            raise LaunchError(f"--address {address}: zps ray runs the job's coordinator in this process, so it "
                              "must run on a node of the cluster (or one its nodes reach), not through Ray Client: "
                              "run it on the head node, or with `ray job submit -- zps ray ...`")
        working_dir = os.path.abspath(self.options.working_dir)
        script = os.path.abspath(os.path.join(working_dir, self.script[0]))
        if not os.path.isfile(script) or os.path.commonpath([working_dir, script]) != working_dir:
            raise LaunchError(f"script {self.script[0]!r} not found in the working directory {working_dir}: it "
                              "travels to the nodes with that directory (--working-dir), as a path relative to it")
        ray = import_ray()
        # (Ray says that it leaves .git and .venv out of the working directory, every time: known, and wanted)
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
        try:
            context = ray.init(address=address, namespace=self.namespace, log_to_driver=False,
                               logging_level=logging.WARNING, runtime_env={"working_dir": working_dir})
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise LaunchError(f"zps ray: cannot connect to the Ray cluster at {address or 'RAY_ADDRESS / local'}: "
                              f"{exc}") from None
        self.ray = ray
        dashboard = getattr(context, "dashboard_url", None)
        self._say(f"ray: namespace {self.namespace} on the cluster at {ray.get_runtime_context().gcs_address}"
                  + (f" (dashboard: http://{dashboard})" if dashboard else ""))

    def prepare(self, job: JobConfig) -> str:
        """Connect, reserve the placement groups (once per job) and return this node's address: the
        coordinator's."""
        self.connect()
        ray = self.ray
        if not self.groups:
            self._reserve(job)
        return str(ray.util.get_node_ip_address())

    def _reserve(self, job: JobConfig) -> None:
        from ray.util.placement_group import placement_group, placement_group_table

        ray, options = self.ray, self.options
        wanted = {"server": (job.num_servers, options.server_resources, options.server_placement),
                  "worker": (job.worker_ranks, options.worker_resources, options.worker_placement)}
        for role, (count, resources, strategy) in wanted.items():
            self.groups[role] = placement_group([dict(resources)] * count, strategy=STRATEGIES[strategy],
                                                name=f"{self.namespace}-{role}s")
        waits = [group.ready() for group in self.groups.values()]
        ready, _ = ray.wait(waits, num_returns=len(waits), timeout=options.placement_timeout)
        if len(ready) < len(waits):
            self._release()
            needs = "; ".join(f"{count} {role}s x {json.dumps(dict(resources))} ({strategy})"
                              for role, (count, resources, strategy) in wanted.items())
            raise LaunchError(f"zps ray: the Ray cluster could not place the job within {options.placement_timeout:g}s "
                              f"(--placement-timeout): it needs {needs}; the cluster has "
                              f"{_amounts(ray.cluster_resources())}, of which free: "
                              f"{_amounts(ray.available_resources())}. Nothing was started")
        names = node_names(ray.nodes())
        for role, group in self.groups.items():
            bundles = placement_group_table(group)["bundles_to_node_id"]
            self.nodes[role] = [names.get(bundles[i], "?") for i in range(len(bundles))]
        for role, (count, resources, strategy) in wanted.items():
            where = ", ".join(f"{r}@{node}" for r, node in enumerate(self.nodes[role][:count]))
            self._say(f"ray: {count} {role}s, {json.dumps(dict(resources))} each, {strategy}: {where}")

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        procs = []
        for role, count in (("server", job.num_servers), ("worker", job.num_workers)):
            for rank in range(count):
                env = {"PYTHONUNBUFFERED": "1", **self.options.env,
                       **role_env(job, role, rank, coordinator, local_rank=LOCAL_RANK)}  # (the actor sets ZPS_HOST)
                script = self.script if role == "worker" else []
                procs.append(ProcSpec(f"{role} {rank}@{self.nodes[role][rank]}", role, rank,
                                      role_command("python", script), env, script=tuple(script), starter=self))
        return procs

    # -- the Starter: one actor per role ------------------------------------------------------------------------
    def start(self, spec: ProcSpec, env: dict[str, str]) -> Started:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .ray_actor import RoleHost

        resources = self.options.server_resources if spec.role == "server" else self.options.worker_resources
        self.started += 1
        actor = self.ray.remote(RoleHost).options(
            name=f"{spec.role}-{spec.rank}.{self.started}", max_concurrency=2, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.groups[spec.role],
                                                                 placement_group_bundle_index=spec.rank),
            **actor_options(resources)).remote()
        role = RayRole(self.ray, actor, spec, env, self.nodes[spec.role][spec.rank])
        self.roles.append(role)
        return role

    # -- the end -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every actor still there, remove the placement groups, disconnect (a local cluster we started
        ends with it)."""
        if self.ray is None:
            return
        for role in self.roles:
            role.signal_group(signal.SIGKILL)
        for role in self.roles:
            role.wait_quietly(10.0)
        self._release()
        self.ray.shutdown()
        self.ray = None

    def _release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001  (already gone with the cluster: nothing is left to remove)
                pass
        self.groups.clear()

    def _say(self, text: str) -> None:
        self.out.write(f"[zps] {text}\n")
        self.out.flush()


def _amounts(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in sorted(resources.items()) if not k.startswith("node:") and k != "object_store_memory"}
    return json.dumps({k: (int(v) if float(v).is_integer() else v) for k, v in shown.items()})


class RayRole:
    """One role's actor, as the process group sees a child (:class:`~.backend.Started`): its output on ``stdout``
    (a pipe this end writes what the actor streams into), its exit code, ``cause`` when the actor died."""

    def __init__(self, ray: Any, actor: Any, spec: ProcSpec, env: dict[str, str], node: str) -> None:
        self.ray, self.actor, self.spec, self.node = ray, actor, spec, node
        self.pid = -1  # on its node, once it runs
        self.returncode: int | None = None
        self.cause: str | None = None
        read_end, self._write = os.pipe()
        self.stdout: IO[bytes] = os.fdopen(read_end, "rb")
        self._done = threading.Event()
        self._stream = actor.run.remote(list(spec.script), env)
        threading.Thread(target=self._pump, name=f"ray-{spec.label}", daemon=True).start()

    def _pump(self) -> None:
        """Copy what the actor streams to ``stdout`` until the role's exit code, or the actor's death."""
        ray = self.ray
        code = None
        try:
            for ref in self._stream:
                message = ray.get(ref)
                if message[0] == "out":
                    _write_all(self._write, message[1])
                elif message[0] == "started":
                    self.pid, self.node = int(message[1]), str(message[2])
                elif message[0] == "exit":
                    code = int(message[1])
        except ray.exceptions.RayActorError as exc:
            self.cause = f"died with its Ray actor on node {self.node}: {_reason(exc)}"
        except Exception as exc:  # noqa: BLE001  (the connection to Ray is gone: the role is lost to the job)
            self.cause = f"was lost to the job: {type(exc).__name__}: {_first_line(str(exc))}"
        finally:
            os.close(self._write)
            self.returncode = -signal.SIGKILL if code is None else code
            self._done.set()
            self._kill_actor()  # its role is over: free its bundle (a replacement takes it)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.spec.label, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def wait_quietly(self, timeout: float) -> None:
        self._done.wait(timeout)

    def signal_group(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self._kill_actor()
        elif self.returncode is None:
            try:
                self.actor.signal.remote(sig)
            except Exception:  # noqa: BLE001  (the actor is gone already)
                pass

    def _kill_actor(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001  (gone already, or Ray is: either way it does not run)
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _reason(exc: Exception, limit: int = 300) -> str:
    """Ray's reason for an actor's death in one line: its detail (an OOM kill, the node's death, ``ray.kill``, an
    error in the actor's start: zps not installed there), without the ids, cut at ``limit`` characters."""
    lines = str(getattr(exc, "error_msg", "") or exc).strip().splitlines()
    detail = " ".join(line.strip() for line in lines[1:] if line.strip() and not line.startswith("\t"))
    text = " ".join((detail or (lines[0] if lines else type(exc).__name__)).split())
    if getattr(exc, "actor_init_failed", False):
        text = f"the actor could not start: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
