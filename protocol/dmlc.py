"""The ``DMLC_*`` variables of ps-lite and BytePS manifests, read as the ``ZPS_*`` ones they mean.

The one place zps knows these names. :func:`dmlc_to_zps` maps ``DMLC_ROLE`` (``scheduler`` is the coordinator),
``DMLC_PS_ROOT_URI`` + ``DMLC_PS_ROOT_PORT`` (the coordinator's address), ``DMLC_NUM_SERVER``,
``DMLC_NUM_WORKER``, ``DMLC_NODE_HOST`` (the bind address) and, for workers, ``DMLC_WORKER_ID`` (the rank). A
``ZPS_*`` variable already set always wins.
"""
from __future__ import annotations

from collections.abc import Mapping

from .variables import (
    ZPS_COORDINATOR,
    ZPS_HOST,
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

# the DMLC_ROLE values ps-lite / BytePS use, and the zps role each one becomes
DMLC_ROLES = {"scheduler": "coordinator", "server": "server", "worker": "worker"}
# a ZPS variable -> the DMLC variable that stands for it (named in errors about the ZPS one)
ALIASES = {
    ZPS_ROLE: "DMLC_ROLE",
    ZPS_COORDINATOR: "DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT",
    ZPS_NUM_SERVERS: "DMLC_NUM_SERVER",
    ZPS_NUM_WORKERS: "DMLC_NUM_WORKER",
    ZPS_HOST: "DMLC_NODE_HOST",
}


def dmlc_to_zps(env: Mapping[str, str]) -> dict[str, str]:
    """The ``ZPS_*`` variables that ``env``'s ``DMLC_*`` ones imply and that ``env`` does not already set."""
    out: dict[str, str] = {}
    role = env_value(env, ZPS_ROLE)
    dmlc_role = env_value(env, "DMLC_ROLE")
    if dmlc_role is not None:
        zps_role = DMLC_ROLES.get(dmlc_role.strip().lower())
        if zps_role is None:
            raise ConfigError(f"DMLC_ROLE={dmlc_role!r} is not one of {', '.join(DMLC_ROLES)}; set {ZPS_ROLE} instead")
        if role is None:
            out[ZPS_ROLE] = role = zps_role

    uri, port = env_value(env, "DMLC_PS_ROOT_URI"), env_value(env, "DMLC_PS_ROOT_PORT")
    if (uri is None) != (port is None):
        missing = "DMLC_PS_ROOT_PORT" if port is None else "DMLC_PS_ROOT_URI"
        raise ConfigError(f"{missing} is not set; DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT go together "
                          f"(or set {ZPS_COORDINATOR}=host:port)")
    if uri is not None and port is not None and env_value(env, ZPS_COORDINATOR) is None:
        out[ZPS_COORDINATOR] = join_host_port(uri.strip(), parse_port("DMLC_PS_ROOT_PORT", port))

    for zps_name, dmlc_name in ((ZPS_NUM_SERVERS, "DMLC_NUM_SERVER"), (ZPS_NUM_WORKERS, "DMLC_NUM_WORKER")):
        value = env_value(env, dmlc_name)
        if value is not None and env_value(env, zps_name) is None:
            out[zps_name] = str(parse_int(dmlc_name, value, 1))

    host = env_value(env, "DMLC_NODE_HOST")
    if host is not None and env_value(env, ZPS_HOST) is None:
        out[ZPS_HOST] = host.strip()

    worker_id = env_value(env, "DMLC_WORKER_ID")
    if worker_id is not None and role == "worker" and env_value(env, ZPS_RANK) is None:
        out[ZPS_RANK] = str(parse_int("DMLC_WORKER_ID", worker_id, 0))
    return out


def with_dmlc(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the ``ZPS_*`` variables its ``DMLC_*`` ones imply laid over it."""
    return {**env, **dmlc_to_zps(env)}
