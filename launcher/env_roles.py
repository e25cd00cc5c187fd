"""Turn the variables torchrun already set into ``ZPS_*`` variables, and pick a worker's device.

Every function here is pure: it takes the environment as a mapping and returns a dict of ``ZPS_*`` strings
meant to be laid over it (``{**env, **derived}``) before :meth:`zps.protocol.config.Config.from_env` reads it
(ps-lite / BytePS ``DMLC_*`` variables are read there, by :mod:`zps.protocol.dmlc`).

* :func:`torchrun_roles` -- a process started by ``torchrun`` becomes a zps *worker*: ``ZPS_RANK=RANK``,
  ``ZPS_NUM_WORKERS=WORLD_SIZE``; the coordinator is ``ZPS_COORDINATOR`` when set, otherwise
  ``MASTER_ADDR:(MASTER_PORT + port_offset)`` (default offset 1: torch's own store keeps ``MASTER_PORT``).
  torchrun starts no servers and no coordinator: those are started elsewhere (by convention the coordinator
  by ``RANK == 0``, which torchrun's static rendezvous places on ``MASTER_ADDR``).
* :func:`local_device` -- ``cuda:<local rank>`` where CUDA is available, else ``cpu``.

``ZPS_LOCAL_RANK`` is set where the source knows it (torchrun, Slurm).
"""
from __future__ import annotations

from collections.abc import Mapping

from zps.protocol.variables import (
    ZPS_COORDINATOR,
    ZPS_LOCAL_RANK,
    ZPS_NUM_SERVERS,
    ZPS_NUM_WORKERS,
    ZPS_RANK,
    ZPS_ROLE,
    ConfigError,
    env_value,
    join_host_port,
    parse_int,
    parse_port,
)

DEFAULT_TORCHRUN_PORT_OFFSET = 1


def _need(env: Mapping[str, str], name: str, why: str) -> str:
    value = env_value(env, name)
    if value is None:
        raise ConfigError(f"{name} is not set; {why}")
    return value


def torchrun_roles(env: Mapping[str, str], num_servers: int | None = None,
                   port_offset: int = DEFAULT_TORCHRUN_PORT_OFFSET) -> dict[str, str]:
    """The ``ZPS_*`` variables that make a torchrun-started process a zps worker.

    ``ZPS_ROLE=worker``, ``ZPS_RANK=RANK``, ``ZPS_NUM_WORKERS=WORLD_SIZE``, ``ZPS_LOCAL_RANK=LOCAL_RANK`` (when
    set). ``ZPS_COORDINATOR`` is kept when set, else ``MASTER_ADDR:(MASTER_PORT + port_offset)``.
    ``ZPS_NUM_SERVERS`` is ``num_servers`` unless already set in ``env``.
    """
    why = "this process was not started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
    world = parse_int("WORLD_SIZE", _need(env, "WORLD_SIZE", why), 1)
    rank = parse_int("RANK", _need(env, "RANK", why), 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} must be < WORLD_SIZE={world}")
    out = {ZPS_ROLE: "worker", ZPS_RANK: str(rank), ZPS_NUM_WORKERS: str(world)}
    local = env_value(env, "LOCAL_RANK")
    if local is not None:
        out[ZPS_LOCAL_RANK] = str(parse_int("LOCAL_RANK", local, 0))
    if env_value(env, ZPS_COORDINATOR) is None:
        why = f"set {ZPS_COORDINATOR}=host:port, or run under torchrun, which sets MASTER_ADDR and MASTER_PORT"
        addr = _need(env, "MASTER_ADDR", why).strip()
        port = parse_port("MASTER_PORT", _need(env, "MASTER_PORT", why)) + port_offset
        out[ZPS_COORDINATOR] = join_host_port(
            addr, parse_port(f"MASTER_PORT + port_offset ({port_offset})", port))
    if num_servers is not None and env_value(env, ZPS_NUM_SERVERS) is None:
        if num_servers < 1:
            raise ConfigError(f"num_servers={num_servers} must be >= 1")
        out[ZPS_NUM_SERVERS] = str(num_servers)
    return out


def local_rank(env: Mapping[str, str]) -> int:
    """This process's index on its host: ``ZPS_LOCAL_RANK``, else ``LOCAL_RANK``, else ``SLURM_LOCALID``, else 0."""
    for name in (ZPS_LOCAL_RANK, "LOCAL_RANK", "SLURM_LOCALID"):
        value = env_value(env, name)
        if value is not None:
            return parse_int(name, value, 0)
    return 0


def local_device(env: Mapping[str, str]) -> str:
    """``"cuda:<local rank>"`` when ``torch.cuda.is_available()``, else ``"cpu"`` (see :func:`local_rank`).

    With more workers on a host than GPUs (a local simulation of a larger cluster) they share the GPUs round-robin:
    local rank ``i`` gets ``cuda:<i mod GPUs>``. Hide the GPUs (``CUDA_VISIBLE_DEVICES=``) to run on the CPU.
    """
    import torch  # imported here: the rest of this module stays light

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank(env) % torch.cuda.device_count()}"
