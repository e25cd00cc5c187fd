"""``zps node`` and ``zps slurm``: run the one role this process's environment names, for schedulers that start
every process themselves (Kubernetes, Slurm, torchrun, a ps-lite / BytePS manifest, your own scripts).

Where the role comes from (:func:`node_env`; a ``ZPS_*`` variable already set always wins):

* ``ZPS_ROLE`` = ``coordinator`` | ``server`` | ``worker`` and the other ``ZPS_*`` variables;
* ``DMLC_*`` variables (``DMLC_ROLE=scheduler`` is the coordinator): :func:`launcher.env_roles.dmlc_to_zps`;
* a Kubernetes pod's rank (StatefulSet ordinal, Indexed Job completion index): :func:`launcher.k8s.k8s_roles`;
  ``--resume latest`` (or a restarted JobSet's pod, ``ZPS_RESTART_ATTEMPT``): the newest checkpoint
  (:func:`launcher.k8s.k8s_resume`);
* torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` when no role is set: a
  worker (:func:`launcher.env_roles.torchrun_roles`); the coordinator is at ``MASTER_ADDR:MASTER_PORT+1``.

Then:

* coordinator -- serves the rendezvous at the port of ``ZPS_COORDINATOR``, bound to ``ZPS_HOST`` (else to the
  host of ``ZPS_COORDINATOR``), with ``ZPS_MODE`` / ``ZPS_STALENESS``; exits 0 when every worker finished.
* server -- the parameter server (:func:`zps.ps.server.serve`) in this process.
* worker -- runs ``SCRIPT ARGS...`` in this process, as ``python SCRIPT ARGS...`` would; where CUDA is
  available, first ``torch.cuda.set_device(cuda:<local rank>)`` (``ZPS_LOCAL_RANK``, ``LOCAL_RANK`` or
  ``SLURM_LOCALID``), so each worker of a host drives its own GPU. A script that raises or exits non-zero is
  reported to the coordinator as a failure (:func:`run_script`).

Every launcher starts its roles this way (``zps run`` and ``zps launch`` too), so a role behaves the same
whoever started it.

``zps slurm`` derives the role of each task of an ``srun`` step (:func:`launcher.slurm.slurm_roles`); task 0
runs the coordinator in a thread next to its own role (server 0).
"""
from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence

import zmq

from zps.process import set_process_name
from zps.protocol.config import Config, ConfigError, configure_logging
from zps.protocol.dmlc import dmlc_to_zps
from zps.protocol.security import load_secrets
from zps.protocol.variables import ZPS_HOST, ZPS_NUM_SERVERS, ZPS_ROLE, env_value

from .coordinator import Coordinator
from .env_roles import local_device, torchrun_roles
from .k8s import k8s_resume, k8s_roles
from .slurm import is_coordinator_task, slurm_roles


def node_env(env: Mapping[str, str], num_servers: int | None = None) -> dict[str, str]:
    """``env`` with the ``ZPS_*`` variables its ``DMLC_*``, Kubernetes or torchrun variables imply laid over it.

    ``num_servers`` fills ``ZPS_NUM_SERVERS`` where nothing sets it (torchrun knows only its workers).
    """
    out = dict(env)
    out.update(dmlc_to_zps(out))
    out.update(k8s_roles(out))
    out.update(k8s_resume(out))
    torchrun = env_value(out, "RANK") is not None and env_value(out, "WORLD_SIZE") is not None
    if env_value(out, ZPS_ROLE) is None and torchrun:
        out.update(torchrun_roles(out, num_servers))
    if num_servers is not None and env_value(out, ZPS_NUM_SERVERS) is None:
        out[ZPS_NUM_SERVERS] = str(num_servers)
    return out


def make_coordinator(config: Config, bind_host: str | None = None, env: Mapping[str, str] | None = None) -> Coordinator:
    """The coordinator ``config`` describes, bound to ``bind_host`` (default: the host of its address). With
    ``--secure`` it takes the coordinator's keys: ``config``'s, or (beside another role, ``zps slurm``'s task 0)
    those ``env`` holds for it."""
    host, _, port = config.coordinator.rpartition(":")
    secrets = config.secrets
    if config.job.secure and config.role != "coordinator":
        secrets = load_secrets(os.environ if env is None else env, "coordinator", -1)
    return Coordinator(config.job, host=bind_host or host.strip("[]"), port=int(port), secrets=secrets)


def serve_coordinator(config: Config, bind_host: str | None = None) -> int:
    """Serve the rendezvous until the job ends; 0 when every worker finished, 1 on failure (said on stderr)."""
    try:
        coordinator = make_coordinator(config, bind_host)
    except zmq.ZMQError as exc:
        print(f"zps node: the coordinator cannot bind {bind_host or config.coordinator}: {exc}", file=sys.stderr)
        return 1
    print(f"zps: coordinator at {coordinator.endpoint} for {config.job.num_servers} servers and "
          f"{config.job.num_workers} workers ({config.job.mode})", flush=True)

    def stop(signum: int, frame: object) -> None:
        coordinator.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
    code = coordinator.serve()
    if code and coordinator.error is None:  # a failure's reason is already logged by the coordinator
        print("zps: coordinator: stopped before the job finished", file=sys.stderr, flush=True)
    return code


def run_script(script: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``SCRIPT ARGS...`` in this process as ``python SCRIPT ARGS...`` would; return its exit code.

    The worker's client then ends as the script did: after a clean end it leaves the servers; after an exception
    or a non-zero exit it reports the failure, so the job never mistakes a crash for a worker that finished.
    """
    from zps.worker import session

    path = script[0]
    if not os.path.isfile(path):
        print(f"zps node: script {path!r} not found (in {os.getcwd()})", file=sys.stderr)
        return 2
    try:
        _pin_device(env)
    except ConfigError as exc:
        print(f"zps node: {exc}", file=sys.stderr)
        return 2
    sys.argv = list(script)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    code, failure = 0, None
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
        failure = f"{path} exited with code {code}" if code else None
    except BaseException as exc:  # the script's own error: shown as Python would, then reported as a failure
        traceback.print_exc()
        code, failure = 1, f"{path} raised {type(exc).__name__}: {exc}"
    if failure is None:
        session.shutdown()
    else:
        session.abort(failure)
    return code


def _pin_device(env: Mapping[str, str]) -> None:
    """``torch.cuda.set_device(cuda:<local rank>)`` where CUDA is available (see the module docstring)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_device(env))


def process_name(config: Config) -> str:
    """What ps shows for a role's process: ``zps-<role>-<rank>`` (no rank while the coordinator assigns it)."""
    if config.role == "coordinator" or config.rank < 0:
        return f"zps-{config.role}"
    return f"zps-{config.role}-{config.rank}"


def run_role(config: Config, env: Mapping[str, str], script: Sequence[str]) -> int:
    """Run ``config.role`` in this process; ``env`` (the resolved environment) becomes ``os.environ``.

    The process is named for ps and top: ``zps-server-0``, ``zps-worker-3``, ``zps-coordinator``.
    """
    configure_logging(config.job.log_level)
    set_process_name(process_name(config))
    if config.role == "coordinator":
        return serve_coordinator(config, env_value(env, ZPS_HOST))
    # the worker library reads its configuration from os.environ (Config.from_env)
    os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    if config.role == "server":
        from zps.ps.server import serve

        code = serve(config)
    elif not script:
        print("zps node: a worker runs a training script: zps node SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    else:
        code = run_script(script, env)
    # The role is over. What is left would only be walked by the collector at exit: with torch loaded that takes
    # most of a second, and the job waits for it. (Python does not promise finalizers at exit; atexit still runs.)
    gc.freeze()
    return code


def main_node(script: Sequence[str], num_servers: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``zps node [SCRIPT ARGS...]``."""
    try:
        env = node_env(os.environ if environ is None else environ, num_servers)
        config = Config.from_env(env)
    except ConfigError as exc:
        print(f"zps node: {exc}", file=sys.stderr)
        return 2
    return run_role(config, env, script)


def main_slurm(script: Sequence[str], num_servers: int | None = None, port: int | None = None,
               environ: Mapping[str, str] | None = None, role: str | None = None,
               settings: Mapping[str, str] | None = None) -> int:
    """``srun zps slurm [--servers S] [JOB OPTIONS] SCRIPT ARGS...``: this task's role; task 0 also runs the
    coordinator. ``settings`` (the job options given) lie over the environment's ``ZPS_*``; with ``role`` the step
    runs that role alone (:func:`launcher.slurm.slurm_roles`) and the coordinator runs elsewhere."""
    base = {**(os.environ if environ is None else environ), **(settings or {})}
    try:
        env = {**base, **slurm_roles(base, num_servers or 1, port, role)}
        config = Config.from_env(env)
        first_task = role is None and is_coordinator_task(base)
        coordinator = make_coordinator(config, env=env) if first_task else None
    except ConfigError as exc:
        print(f"zps slurm: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"zps slurm: the coordinator cannot bind {config.coordinator}: {exc}", file=sys.stderr)
        return 1
    if coordinator is None:
        return run_role(config, env, script)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(coordinator.serve()), name="zps-coordinator",
                              daemon=True)
    thread.start()
    try:
        code = run_role(config, env, script)
    except BaseException:
        coordinator.stop()
        raise
    if code:
        coordinator.stop()
    # the coordinator ends once the servers said goodbye, at most heartbeat_timeout after the last worker
    thread.join(timeout=config.job.heartbeat_timeout + 10)
    if thread.is_alive():
        coordinator.stop()
        thread.join(timeout=5)
    if not code and result and result[0]:  # the coordinator logged why
        return result[0]
    return code
