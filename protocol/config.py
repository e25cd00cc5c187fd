"""All process configuration in one place: one frozen dataclass filled once from ``ZPS_*`` variables.

Nothing else in zps reads ``os.environ`` for its own settings. The ``DMLC_*`` names that ps-lite and BytePS
manifests already carry are accepted as aliases (``ZPS_*`` wins when both are set). Tests pass a plain mapping.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

ROLES = ("coordinator", "server", "worker")
# consistency modes, implemented by ps.consistency
MODES = ("bsp", "asp", "ssp")
# DMLC_ROLE values of ps-lite / BytePS that name a zps role differently
DMLC_ROLE_NAMES = {"scheduler": "coordinator"}

# ZPS name -> the DMLC alias users of ps-lite / BytePS already have in their manifests.
DMLC_ALIASES = {
    "ZPS_ROLE": "DMLC_ROLE",
    "ZPS_NUM_SERVERS": "DMLC_NUM_SERVER",
    "ZPS_NUM_WORKERS": "DMLC_NUM_WORKER",
    "ZPS_HOST": "DMLC_NODE_HOST",
}


class ConfigError(ValueError):
    """A ``ZPS_*`` variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Config:
    """What a zps process needs to know about itself and its cluster.

    ``coordinator`` is ``host:port`` of the rendezvous process. ``rank`` is the requested rank within the role
    (``-1``: let the coordinator assign one). ``host`` is the address this process binds to (loopback by
    default, never every interface unless asked).
    """

    role: str
    coordinator: str
    num_servers: int
    num_workers: int
    rank: int = -1
    host: str = "127.0.0.1"
    # every blocking wait gives up after this many seconds, naming what it waited for
    timeout: float = 120.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 15.0
    # free-form spec strings the worker library and example scripts read (see worker.build_optimizer)
    optimizer: str = ""
    codec: str = ""
    pull_codec: str = ""
    error_feedback: bool = False
    # tensors with fewer elements (biases, norms) are sent uncompressed
    compress_min: int = 1024
    # move tensor bytes through shared memory when worker and server share a host (falls back by itself)
    shm: bool = True
    # this process's index among the processes of its role on its host (its GPU is cuda:<local_rank>)
    local_rank: int = 0
    # read by the coordinator role (``zps node`` with ZPS_ROLE=coordinator); launchers pass them directly
    mode: str = "bsp"
    staleness: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        """Build from ``env`` (default ``os.environ``); raise :class:`ConfigError` naming a bad variable."""
        env = os.environ if env is None else env

        def get(name: str, default: str | None = None) -> str | None:
            if name in env and env[name] != "":
                return env[name]
            alias = DMLC_ALIASES.get(name)
            if alias and env.get(alias, "") != "":
                return env[alias]
            return default

        def need(name: str) -> str:
            value = get(name)
            if value is None:
                alias = DMLC_ALIASES.get(name)
                hint = f" (or {alias})" if alias else ""
                raise ConfigError(f"{name}{hint} is not set; the launcher sets it, or set it yourself")
            return value

        def as_int(name: str, value: str, minimum: int) -> int:
            try:
                number = int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not an integer") from None
            if number < minimum:
                raise ConfigError(f"{name}={number} must be >= {minimum}")
            return number

        def as_float(name: str, value: str) -> float:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not a number") from None
            if not number > 0:
                raise ConfigError(f"{name}={number} must be > 0")
            return number

        role = need("ZPS_ROLE").lower()
        if get("ZPS_ROLE") != env.get("ZPS_ROLE"):  # the value came from DMLC_ROLE
            role = DMLC_ROLE_NAMES.get(role, role)
        if role not in ROLES:
            raise ConfigError(f"ZPS_ROLE={role!r} is not one of {', '.join(ROLES)}")
        coordinator = need("ZPS_COORDINATOR")
        if coordinator.count(":") < 1 or not coordinator.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"ZPS_COORDINATOR={coordinator!r} must be host:port")
        mode = get("ZPS_MODE", "bsp").lower()
        if mode not in MODES:
            raise ConfigError(f"ZPS_MODE={mode!r} is not one of {', '.join(MODES)}")
        staleness = as_int("ZPS_STALENESS", get("ZPS_STALENESS", "0"), 0)
        if staleness and mode != "ssp":
            raise ConfigError(f"ZPS_STALENESS={staleness} only applies to ZPS_MODE=ssp (got {mode})")
        return cls(
            role=role,
            coordinator=coordinator,
            num_servers=as_int("ZPS_NUM_SERVERS", need("ZPS_NUM_SERVERS"), 1),
            num_workers=as_int("ZPS_NUM_WORKERS", need("ZPS_NUM_WORKERS"), 1),
            rank=as_int("ZPS_RANK", get("ZPS_RANK", "-1"), -1),
            host=get("ZPS_HOST", "127.0.0.1"),
            timeout=as_float("ZPS_TIMEOUT", get("ZPS_TIMEOUT", "120")),
            heartbeat_interval=as_float("ZPS_HEARTBEAT_INTERVAL", get("ZPS_HEARTBEAT_INTERVAL", "1")),
            heartbeat_timeout=as_float("ZPS_HEARTBEAT_TIMEOUT", get("ZPS_HEARTBEAT_TIMEOUT", "15")),
            optimizer=get("ZPS_OPTIMIZER", ""),
            codec=get("ZPS_CODEC", ""),
            pull_codec=get("ZPS_PULL_CODEC", ""),
            error_feedback=get("ZPS_ERROR_FEEDBACK", "0").lower() in ("1", "true", "yes", "on"),
            compress_min=as_int("ZPS_COMPRESS_MIN", get("ZPS_COMPRESS_MIN", "1024"), 0),
            shm=get("ZPS_SHM", "1").lower() in ("1", "true", "yes", "on"),
            local_rank=as_int("ZPS_LOCAL_RANK", get("ZPS_LOCAL_RANK", "0"), 0),
            mode=mode,
            staleness=staleness,
        )

    def to_env(self) -> dict[str, str]:
        """The ``ZPS_*`` variables that reproduce this configuration in a child process."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "1" if value else "0"
            out["ZPS_" + f.name.upper()] = str(value)
        return out
