"""The variables a zps process reads its settings from: their names, and the readers of their values.

A setting's variable is ``ZPS_`` + its name in capitals (:func:`env_name`); the settings are the fields of
:class:`~zps.protocol.config.Config` and :class:`~zps.protocol.config.JobConfig`. The names below are a process's
place in the job and the job's size: what every launcher backend writes and what the readers of other schedulers'
variables (``DMLC_*``, torchrun, Slurm, Kubernetes) fill in; a unit test checks that each names a field. The
readers take the environment as a mapping and raise :class:`ConfigError` naming the variable. This module imports
nothing of zps, so every module of :mod:`zps.protocol` may import it.
"""
from __future__ import annotations

from collections.abc import Mapping

ENV_PREFIX = "ZPS_"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names its variable (and flag)."""


def env_name(name: str) -> str:
    """The variable of the setting ``name``: ``ZPS_`` + its name in capitals."""
    return ENV_PREFIX + name.upper()


# a process's place in the job (Config's fields) and the job's size (JobConfig's)
ZPS_ROLE = env_name("role")
ZPS_COORDINATOR = env_name("coordinator")
ZPS_RANK = env_name("rank")
ZPS_HOST = env_name("host")
ZPS_LOCAL_RANK = env_name("local_rank")
ZPS_NUM_SERVERS = env_name("num_servers")
ZPS_NUM_WORKERS = env_name("num_workers")


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The value of ``name`` in ``env``; None where it is unset or empty (an empty variable is an unset one)."""
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
    """``host:port`` (the value of ``ZPS_COORDINATOR``, and a ``tcp://`` address's tail); an IPv6 literal is
    bracketed (``[::1]:29600``) so the port stays unambiguous."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
