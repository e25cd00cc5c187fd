"""Turn the variables another launcher already set into ``ZPS_*`` variables.

Every function here is pure: it takes the environment as a mapping and returns a dict of ``ZPS_*`` strings
meant to be laid over it (``{**env, **derived}``) before :meth:`protocol.config.Config.from_env` reads it.

* :func:`dmlc_to_zps` -- ps-lite / BytePS manifests (``DMLC_*``). A ``ZPS_*`` variable already set wins.
* :func:`torchrun_roles` -- a process started by ``torchrun`` becomes a zps *worker*: ``ZPS_RANK=RANK``,
  ``ZPS_NUM_WORKERS=WORLD_SIZE``; the coordinator is ``ZPS_COORDINATOR`` when set, otherwise
  ``MASTER_ADDR:(MASTER_PORT + port_offset)`` (default offset 1: torch's own store keeps ``MASTER_PORT``).
  torchrun starts no servers and no coordinator: those are started elsewhere (by convention the coordinator
  by ``RANK == 0``, which torchrun's static rendezvous places on ``MASTER_ADDR``).
* :func:`local_device` -- ``cuda:<local rank>`` where CUDA is available, else ``cpu``.

``ZPS_LOCAL_RANK`` is set where the source knows it (torchrun, Slurm); ``protocol.config`` does not read it
yet, :func:`local_device` does.
"""
from __future__ import annotations

from typing import Mapping

# the DMLC_ROLE values ps-lite / BytePS use, and the zps role each one becomes
DMLC_ROLES = {"scheduler": "coordinator", "server": "server", "worker": "worker"}

DEFAULT_TORCHRUN_PORT_OFFSET = 1


class LaunchEnvError(ValueError):
    """A launcher-provided variable is missing or malformed; the message names it and what to do."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "")
    return value if value != "" else None


def _need(env: Mapping[str, str], name: str, why: str) -> str:
    value = _get(env, name)
    if value is None:
        raise LaunchEnvError(f"{name} is not set; {why}")
    return value


def parse_int(name: str, value: str, minimum: int) -> int:
    """``int(value)`` or :class:`LaunchEnvError` naming ``name``; the result must be ``>= minimum``."""
    try:
        number = int(value.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise LaunchEnvError(f"{name}={number} must be >= {minimum}")
    return number


def parse_port(name: str, value: str | int) -> int:
    """A TCP port 1..65535, or :class:`LaunchEnvError` naming ``name``."""
    port = parse_int(name, str(value), 1)
    if port > 65535:
        raise LaunchEnvError(f"{name}={port} is not a TCP port (1..65535)")
    return port


def join_host_port(host: str, port: int) -> str:
    """``host:port``; an IPv6 literal is bracketed (``[::1]:29600``) so the port stays unambiguous."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def dmlc_to_zps(env: Mapping[str, str]) -> dict[str, str]:
    """The ``ZPS_*`` variables implied by ps-lite / BytePS ``DMLC_*`` ones; a ``ZPS_*`` already set wins.

    Maps ``DMLC_ROLE`` (``scheduler`` -> ``coordinator``), ``DMLC_PS_ROOT_URI`` + ``DMLC_PS_ROOT_PORT`` ->
    ``ZPS_COORDINATOR``, ``DMLC_NUM_SERVER``, ``DMLC_NUM_WORKER``, ``DMLC_NODE_HOST`` -> ``ZPS_HOST`` and, for
    workers, ``DMLC_WORKER_ID`` -> ``ZPS_RANK``. Only variables not already set are returned.
    """
    out: dict[str, str] = {}

    role = _get(env, "ZPS_ROLE")
    dmlc_role = _get(env, "DMLC_ROLE")
    if dmlc_role is not None:
        zps_role = DMLC_ROLES.get(dmlc_role.strip().lower())
        if zps_role is None:
            raise LaunchEnvError(
                f"DMLC_ROLE={dmlc_role!r} is not one of {', '.join(DMLC_ROLES)}; set ZPS_ROLE instead")
        if role is None:
            out["ZPS_ROLE"] = role = zps_role

    uri, port = _get(env, "DMLC_PS_ROOT_URI"), _get(env, "DMLC_PS_ROOT_PORT")
    if (uri is None) != (port is None):
        missing = "DMLC_PS_ROOT_PORT" if port is None else "DMLC_PS_ROOT_URI"
        raise LaunchEnvError(f"{missing} is not set; DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT go together "
                             f"(or set ZPS_COORDINATOR=host:port)")
    if uri is not None and port is not None and _get(env, "ZPS_COORDINATOR") is None:
        out["ZPS_COORDINATOR"] = join_host_port(uri.strip(), parse_port("DMLC_PS_ROOT_PORT", port))

    for zps_name, dmlc_name in (("ZPS_NUM_SERVERS", "DMLC_NUM_SERVER"), ("ZPS_NUM_WORKERS", "DMLC_NUM_WORKER")):
        value = _get(env, dmlc_name)
        if value is not None and _get(env, zps_name) is None:
            out[zps_name] = str(parse_int(dmlc_name, value, 1))

    host = _get(env, "DMLC_NODE_HOST")
    if host is not None and _get(env, "ZPS_HOST") is None:
        out["ZPS_HOST"] = host.strip()

    worker_id = _get(env, "DMLC_WORKER_ID")
    if worker_id is not None and role == "worker" and _get(env, "ZPS_RANK") is None:
        out["ZPS_RANK"] = str(parse_int("DMLC_WORKER_ID", worker_id, 0))
    return out


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
        raise LaunchEnvError(f"RANK={rank} must be < WORLD_SIZE={world}")
    out = {"ZPS_ROLE": "worker", "ZPS_RANK": str(rank), "ZPS_NUM_WORKERS": str(world)}
    local = _get(env, "LOCAL_RANK")
    if local is not None:
        out["ZPS_LOCAL_RANK"] = str(parse_int("LOCAL_RANK", local, 0))
    if _get(env, "ZPS_COORDINATOR") is None:
        why = "set ZPS_COORDINATOR=host:port, or run under torchrun, which sets MASTER_ADDR and MASTER_PORT"
        addr = _need(env, "MASTER_ADDR", why).strip()
        port = parse_port("MASTER_PORT", _need(env, "MASTER_PORT", why)) + port_offset
        out["ZPS_COORDINATOR"] = join_host_port(
            addr, parse_port(f"MASTER_PORT + port_offset ({port_offset})", port))
    if num_servers is not None and _get(env, "ZPS_NUM_SERVERS") is None:
        if num_servers < 1:
            raise LaunchEnvError(f"num_servers={num_servers} must be >= 1")
        out["ZPS_NUM_SERVERS"] = str(num_servers)
    return out


def local_rank(env: Mapping[str, str]) -> int:
    """This process's index on its host: ``ZPS_LOCAL_RANK``, else ``LOCAL_RANK``, else ``SLURM_LOCALID``, else 0."""
    for name in ("ZPS_LOCAL_RANK", "LOCAL_RANK", "SLURM_LOCALID"):
        value = _get(env, name)
        if value is not None:
            return parse_int(name, value, 0)
    return 0


def local_device(env: Mapping[str, str]) -> str:
    """``"cuda:<local rank>"`` when ``torch.cuda.is_available()``, else ``"cpu"`` (see :func:`local_rank`).

    Raises :class:`LaunchEnvError` when the local rank names a GPU this host does not have.
    """
    import torch  # imported here: the rest of this module stays light

    if not torch.cuda.is_available():
        return "cpu"
    index = local_rank(env)
    count = torch.cuda.device_count()
    if index >= count:
        raise LaunchEnvError(f"local rank {index} has no GPU: this host has {count}; start at most {count} "
                             f"workers per host, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
    return f"cuda:{index}"
