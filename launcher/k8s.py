"""A Kubernetes manifest for one zps cluster, written as YAML text (no YAML library needed), and ranks from pods.

:func:`render_manifest` gives four objects, for ``kubectl apply -f``:

* ``Service <name>-coordinator`` -- headless; its DNS name is the coordinator address every pod gets.
* ``Job <name>-coordinator`` -- one pod running ``zps node`` with ``ZPS_ROLE=coordinator``.
* ``Job <name>-server`` -- Indexed, ``num_servers`` pods running ``zps node``; rank = ``JOB_COMPLETION_INDEX``.
* ``Job <name>-worker`` -- Indexed, ``num_workers`` pods running ``zps node SCRIPT ARGS...``; rank likewise.

Every role is a Job, so a finished job's pods stay finished (``Completed``) instead of being restarted, and a
failure fails the job as a unit (``backoffLimit: 0``): servers and the coordinator end with the workers. The one
exception is ``--on-worker-failure restart``: a failed worker's container is restarted in place
(``restartPolicy: OnFailure``, ``backoffLimit`` = ``--max-restarts``) and takes its rank back. To restart the
whole job from its newest checkpoint, apply the manifest again with ``--resume latest``: give
``--checkpoint-dir`` and a PersistentVolumeClaim (``--checkpoint-claim``) that every pod mounts there.

With ``--secure`` (the default of ``zps k8s``) three Secrets come first, ``<name>-keys-coordinator``,
``-server`` and ``-worker``: the job's fresh keys, each mounted (mode 0400) only in its role's pods at
``/etc/zps/keys`` (``ZPS_SECRETS_DIR``). A pod of one role cannot read another role's keys; the worker pods share
one Secret, so a worker's pod could read its fellow workers' keys. The manifest holds the keys: pipe it to
``kubectl apply -f -``, do not keep it.

Every container gets ``ZPS_ROLE``, ``ZPS_COORDINATOR`` (service DNS name:port), ``ZPS_HOST`` (the pod IP, from
the downward API), the job's settings (``ZPS_NUM_SERVERS``, ``ZPS_NUM_WORKERS`` and every option given) and
``ZPS_RANK_FROM``, which tells ``zps node`` how to find its rank: :func:`rank_from_k8s` (``job-completion-index``:
``JOB_COMPLETION_INDEX``; ``hostname-ordinal``, the ``-N`` suffix of a StatefulSet pod's ``HOSTNAME``, is read
too, for manifests of your own).
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.security import ENV_SECRETS_DIR, make_secrets
from zps.protocol.variables import (
    ZPS_COORDINATOR,
    ZPS_HOST,
    ZPS_NUM_SERVERS,
    ZPS_NUM_WORKERS,
    ZPS_RANK,
    ZPS_ROLE,
    env_value,
    join_host_port,
    parse_int,
    parse_port,
)

DEFAULT_PORT = 29600
KEYS_PATH = "/etc/zps/keys"  # where a pod's Secret of keys is mounted (--secure)
RANK_SOURCES = ("hostname-ordinal", "job-completion-index")
# how `zps node` in a pod finds its rank: one of RANK_SOURCES (set by the manifest, read by rank_from_k8s)
ZPS_RANK_FROM = "ZPS_RANK_FROM"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_ORDINAL = re.compile(r".+-(\d+)")


def rank_from_k8s(env: Mapping[str, str]) -> int | None:
    """This pod's rank within its role, or None where nothing says it.

    ``ZPS_RANK_FROM=hostname-ordinal``: the ordinal suffix of ``HOSTNAME`` (``zps-server-2`` -> 2).
    ``ZPS_RANK_FROM=job-completion-index``, or unset: ``JOB_COMPLETION_INDEX`` (None when unset and absent).
    ``HOSTNAME`` is read only when asked: a Deployment's pod names can end in digits too.
    """
    source = env.get(ZPS_RANK_FROM, "").strip().lower()
    if source == "hostname-ordinal":
        hostname = env.get("HOSTNAME", "")
        match = _ORDINAL.fullmatch(hostname)
        if match is None:
            raise ConfigError(f"{ZPS_RANK_FROM}=hostname-ordinal but HOSTNAME={hostname!r} does not end in "
                                 f"-N; this only works in a StatefulSet pod")
        return int(match.group(1))
    if source not in ("", "job-completion-index"):
        raise ConfigError(f"{ZPS_RANK_FROM}={source!r} is not one of {', '.join(RANK_SOURCES)}")
    index = env.get("JOB_COMPLETION_INDEX", "")
    if index == "":
        if source:
            raise ConfigError(f"{ZPS_RANK_FROM}=job-completion-index but JOB_COMPLETION_INDEX is not set; "
                                 "this only works in an Indexed Job pod (completionMode: Indexed)")
        return None
    return parse_int("JOB_COMPLETION_INDEX", index, 0)


def k8s_roles(env: Mapping[str, str]) -> dict[str, str]:
    """``{"ZPS_RANK": ...}`` from :func:`rank_from_k8s` when ``ZPS_RANK`` is unset and a rank is found, else {}."""
    if env_value(env, ZPS_RANK) is not None:
        return {}
    rank = rank_from_k8s(env)
    return {} if rank is None else {ZPS_RANK: str(rank)}


# --- YAML text -------------------------------------------------------------------------------------------------

def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # a JSON string is a YAML double-quoted scalar: every string is quoted, so "1", "true", "no", "null",
        # "*x", "#y" and ": z" all stay strings
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in ("true", "false", "null", "yes", "no",
                                                                       "on", "off", "y", "n") else _scalar(key)


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    """Append block-style YAML for a dict or list at ``indent`` spaces."""
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_key(key)}:")
                _emit(item, indent + 2, lines)
            else:
                lines.append(f"{pad}{_key(key)}: {_flow_empty(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                sub: list[str] = []
                _emit(item, indent + 2, sub)
                lines.append(f"{pad}- {sub[0][indent + 2:]}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_flow_empty(item)}")
    else:
        raise TypeError(f"a YAML document is a mapping or a list, not {type(value).__name__}")


def _flow_empty(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml_stream(documents: Sequence[Mapping[str, Any]]) -> str:
    """Documents (dicts of dicts, lists, str, int, bool, None) as one YAML stream, each opened by ``---``."""
    lines: list[str] = []
    for document in documents:
        lines.append("---")
        _emit(dict(document), 0, lines)
    return "\n".join(lines) + "\n"


# --- the manifest ----------------------------------------------------------------------------------------------

def _check_name(what: str, value: str, max_len: int) -> None:
    if not _DNS_LABEL.fullmatch(value) or len(value) > max_len:
        raise ValueError(f"{what}={value!r} must be a DNS label: lowercase letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {max_len} characters")


def render_manifest(image: str, job: JobConfig, command: Sequence[str] | str, namespace: str | None = None,
                    port: int = DEFAULT_PORT, name: str = "zps", gpus_per_worker: int = 0,
                    checkpoint_claim: str | None = None) -> str:
    """The Kubernetes objects of one zps job (see the module docstring) as a YAML document stream.

    ``command`` is the worker's script and arguments, run as ``zps node SCRIPT ARGS...``: a list of strings,
    or one string split like a shell would (``"train.py --lr 0.1"``). ``name`` prefixes every object (one
    cluster per name and namespace). ``gpus_per_worker`` > 0 asks for ``nvidia.com/gpu`` per worker pod.
    ``checkpoint_claim`` names a PersistentVolumeClaim mounted at ``job.checkpoint_dir`` in every pod.
    """
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image={image!r} must be an image reference without spaces, e.g. 'registry/zps:1.0'")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int) or gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker={gpus_per_worker!r} must be an integer >= 0")
    if checkpoint_claim is not None:
        _check_name("checkpoint_claim", checkpoint_claim, 63)
        if not job.checkpoint_dir.startswith("/"):
            raise ValueError("checkpoint_claim needs an absolute --checkpoint-dir to mount it at")
    port = parse_port("port", port)
    # pod names: <name>-worker-<index>-<5 chars> must stay within 63 characters
    _check_name("name", name, 40)
    if namespace is not None:
        _check_name("namespace", namespace, 63)
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if not args or not all(isinstance(a, str) for a in args) or not args[0]:
        raise ValueError(f"command={command!r} must name the worker script, e.g. ['train.py', '--lr', '0.1']")

    coordinator_svc = f"{name}-coordinator"
    host = coordinator_svc if namespace is None else f"{coordinator_svc}.{namespace}.svc"
    coordinator = join_host_port(host, port)
    defaults = JobConfig().to_env()
    settings = {k: v for k, v in job.to_env().items()
                if v != defaults[k] or k in (ZPS_NUM_SERVERS, ZPS_NUM_WORKERS)}

    def meta(obj_name: str, component: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": obj_name}
        if namespace is not None:
            out["namespace"] = namespace
        out["labels"] = labels(component)
        return out

    def labels(component: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "zps", "app.kubernetes.io/instance": name,
                "app.kubernetes.io/component": component}

    def container(role: str, argv: list[str], rank_from: str | None,
                  resources: dict[str, Any] | None = None) -> dict[str, Any]:
        env: list[dict[str, Any]] = [
            {"name": ZPS_ROLE, "value": role},
            {"name": ZPS_COORDINATOR, "value": coordinator},
            *({"name": k, "value": v} for k, v in settings.items()),
            {"name": ZPS_HOST, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]
        if rank_from is not None:
            env.append({"name": ZPS_RANK_FROM, "value": rank_from})
        mounts = []
        if job.secure:
            env.append({"name": ENV_SECRETS_DIR, "value": KEYS_PATH})
            mounts.append({"name": "keys", "mountPath": KEYS_PATH, "readOnly": True})
        out: dict[str, Any] = {"name": role, "image": image, "command": argv, "env": env}
        if role == "coordinator":
            out["ports"] = [{"name": "coordinator", "containerPort": port, "protocol": "TCP"}]
        if resources:
            out["resources"] = resources
        if checkpoint_claim is not None:
            mounts.append({"name": "checkpoints", "mountPath": job.checkpoint_dir})
        if mounts:
            out["volumeMounts"] = mounts
        return out

    def pod(component: str, spec_container: dict[str, Any], restart: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"restartPolicy": restart, "containers": [spec_container]}
        volumes: list[dict[str, Any]] = []
        if job.secure:
            volumes.append({"name": "keys", "secret": {"secretName": f"{name}-keys-{component}",
                                                       "defaultMode": 0o400}})
        if checkpoint_claim is not None:
            volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim}})
        if volumes:
            spec["volumes"] = volumes
        return {"metadata": {"labels": labels(component)}, "spec": spec}

    def indexed_job(component: str, count: int, argv: list[str], restart: str, backoff: int,
                    resources: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(f"{name}-{component}", component),
                "spec": {"completionMode": "Indexed", "completions": count, "parallelism": count,
                         "backoffLimit": backoff,
                         "template": pod(component, container(component, argv, "job-completion-index", resources),
                                         restart)}}

    restart_workers = job.on_worker_failure == "restart"
    worker_resources = ({"limits": {"nvidia.com/gpu": gpus_per_worker}} if gpus_per_worker else None)
    documents = [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(coordinator_svc, "coordinator"),
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels("coordinator"),
                  "ports": [{"name": "coordinator", "port": port, "targetPort": port, "protocol": "TCP"}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(coordinator_svc, "coordinator"),
         "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 0,
                  "template": pod("coordinator", container("coordinator", ["zps", "node"], None), "Never")}},
        # no ports: servers pick free ones and report them to the coordinator
        indexed_job("server", job.num_servers, ["zps", "node"], "Never", 0),
        indexed_job("worker", job.num_workers, ["zps", "node", *args], "OnFailure" if restart_workers else "Never",
                    job.max_restarts if restart_workers else 0, worker_resources),
    ]
    if job.secure:
        documents = [*_secrets(job, name, meta), *documents]
    return to_yaml_stream(documents)


def _secrets(job: JobConfig, name: str, meta: Any) -> list[dict[str, Any]]:
    """``--secure``: fresh keys for the job, one Secret per role, each mounted only by that role's pods."""
    keys = make_secrets(job.num_servers, job.num_workers)
    out = []
    for component in ("coordinator", "server", "worker"):
        files = {f"{label}.json": value.to_json() for label, value in keys.items()
                 if label.partition("-")[0] == component}
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{name}-keys-{component}", component),
                    "type": "Opaque", "stringData": files})
    return out
