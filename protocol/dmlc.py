"""The ``DMLC_*`` variables of ps-lite and BytePS manifests, read as the ``ZPS_*`` ones they mean.

The one place zps knows these names. :func:`dmlc_to_zps` maps ``DMLC_ROLE`` (``scheduler`` is the coordinator),
``DMLC_PS_ROOT_URI`` + ``DMLC_PS_ROOT_PORT`` (the coordinator's address), ``DMLC_NUM_SERVER``,
``DMLC_NUM_WORKER``, ``DMLC_NODE_HOST`` (the bind address) and, for workers, ``DMLC_WORKER_ID`` (the rank). A
``ZPS_*`` variable already set always wins.
"""
from __future__ import annotations

from collections.abc import Mapping

from .config import ConfigError

# the DMLC_ROLE values ps-lite / BytePS use, and the zps role each one becomes
DMLC_ROLES = {"scheduler": "coordinator", "server": "server", "worker": "worker"}
# a ZPS variable -> the DMLC variable that stands for it (named in errors about the ZPS one)
ALIASES = {
    "ZPS_ROLE": "DMLC_ROLE",
    "ZPS_COORDINATOR": "DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT",
    "ZPS_NUM_SERVERS": "DMLC_NUM_SERVER",
    "ZPS_NUM_WORKERS": "DMLC_NUM_WORKER",
    "ZPS_HOST": "DMLC_NODE_HOST",
}


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "")
    return value if value != "" else None


def parse_int(name: str, value: str, minimum: int) -> int:
    """``int(value)`` or :class:`ConfigError` naming ``name``; the result must be ``>= minimum``."""
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ConfigError(f"{name}={number} must be >= {minimum}")
    return number


def parse_port(name: str, value: str | int) -> int:
    """A TCP port 1..65535, or :class:`ConfigError` naming ``name``."""
    port = parse_int(name, str(value), 1)
    if port > 65535:
        raise ConfigError(f"{name}={port} is not a TCP port (1..65535)")
    return port


def join_host_port(host: str, port: int) -> str:
    """``host:port``; an IPv6 literal is bracketed (``[::1]:29600``) so the port stays unambiguous."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def dmlc_to_zps(env: Mapping[str, str]) -> dict[str, str]:
    """The ``ZPS_*`` variables that ``env``'s ``DMLC_*`` ones imply and that ``env`` does not already set."""
    out: dict[str, str] = {}
    role = _get(env, "ZPS_ROLE")
    dmlc_role = _get(env, "DMLC_ROLE")
    if dmlc_role is not None:
        zps_role = DMLC_ROLES.get(dmlc_role.strip().lower())
        if zps_role is None:
            raise ConfigError(f"DMLC_ROLE={dmlc_role!r} is not one of {', '.join(DMLC_ROLES)}; set ZPS_ROLE instead")
        if role is None:
            out["ZPS_ROLE"] = role = zps_role

    uri, port = _get(env, "DMLC_PS_ROOT_URI"), _get(env, "DMLC_PS_ROOT_PORT")
    if (uri is None) != (port is None):
        missing = "DMLC_PS_ROOT_PORT" if port is None else "DMLC_PS_ROOT_URI"
        raise ConfigError(f"{missing} is not set; DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT go together "
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


def with_dmlc(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the ``ZPS_*`` variables its ``DMLC_*`` ones imply laid over it."""
    return {**env, **dmlc_to_zps(env)}
