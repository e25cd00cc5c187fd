"""A Kubernetes manifest for one zps job, written as YAML text (no YAML library needed), and ranks from pods.

:func:`render_manifest` gives, for ``kubectl apply -f``, one of two shapes (``--format``):

* ``jobset`` (the default; needs the JobSet controller, kubernetes-sigs/jobset): **one JobSet** named after the job,
  whose replicated Jobs are ``coordinator``, ``server-R`` and ``worker-R`` (one Job, one pod per rank). It ties the
  roles together: one object to apply, watch and delete; a failed Job fails the set as a unit (``failurePolicy``,
  ``--max-restarts`` recreates it, resuming from the newest checkpoint); it succeeds when every worker has
  (``successPolicy``) and is deleted ``--ttl`` seconds after it finished. The coordinator's address is its pod's own
  DNS name (``<name>-coordinator-0-0.<name>``: JobSet's headless service). With ``--queue Q`` the JobSet carries
  Kueue's queue label: Kueue then admits it whole or not at all (gang scheduling: no pod waits for another that
  cannot be placed).
* ``jobs``: a headless ``Service <name>-coordinator`` and one ``Job`` per role and rank, all labelled
  ``app.kubernetes.io/instance=<name>`` (``kubectl delete job,svc -l app.kubernetes.io/instance=<name>``), each
  deleted ``--ttl`` seconds after it finished. Nothing restarts them as a whole.

Every pod is of the Guaranteed QoS class -- CPU and memory requests equal to their limits (``--coordinator-resources``,
``--server-resources``, ``--worker-resources``; ``--gpus-per-worker``) -- runs without a service account token, and
fails after ``--deadline`` seconds when one is given (``activeDeadlineSeconds``). The coordinator has a TCP readiness
and liveness probe; with ``--metrics-port`` the coordinator and each server declare their metrics port (containerPort
``metrics``) with Prometheus' scrape annotations, and a server's liveness is probed there. (A server picks its data
port when it starts, and a worker serves nothing: their liveness is their heartbeat, which the coordinator watches,
failing the job after ``--heartbeat-timeout``.) A role that fails fails its Job (``backoffLimit: 0``), except under
``--on-worker-failure restart``, where a worker's container restarts in place (``restartPolicy: OnFailure``,
``backoffLimit`` = ``--max-restarts``) and takes its rank back.

``--secure`` (the default of ``zps k8s``): every pod mounts one Secret of its own (mode 0400, at ``/etc/zps/keys``,
``ZPS_SECRETS_DIR``) -- ``<name>-keys-coordinator``, ``<name>-keys-server-R``, ``<name>-keys-worker-R`` -- holding
its keys alone. The manifest holds no key (the same text on every render: it may be reviewed and kept); the keys
come from :func:`render_secrets` (``zps k8s --keys``), straight into ``kubectl apply -f -``. What a pod's keys give
an attacker inside it is in docs/launch.md.

Every container gets ``ZPS_ROLE``, ``ZPS_RANK``, ``ZPS_COORDINATOR``, ``ZPS_HOST`` (the pod IP, from the downward
API) and the job's settings (``ZPS_NUM_SERVERS``, ``ZPS_NUM_WORKERS`` and every option given). For manifests of your
own, ``ZPS_RANK_FROM`` tells ``zps node`` where a pod's rank is (:func:`rank_from_k8s`: ``job-completion-index``,
an Indexed Job's ``JOB_COMPLETION_INDEX``; ``hostname-ordinal``, the ``-N`` suffix of a StatefulSet pod).

Options that mean nothing on Kubernetes are refused (:func:`refused_options`) or warned about
(:func:`option_warnings`), by name.
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.security import ENV_SECRETS_DIR, make_secrets, secrets_label
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


def k8s_resume(env: Mapping[str, str]) -> dict[str, str]:
    """``{"ZPS_RESUME": DIR}`` for a pod that must resume, else {}: where ``ZPS_RESUME=latest``, the newest complete
    checkpoint in ``ZPS_CHECKPOINT_DIR``; in a JobSet restarted by its failure policy (``ZPS_RESTART_ATTEMPT`` > 0,
    a label JobSet sets) with a ``ZPS_CHECKPOINT_DIR`` and no ``ZPS_RESUME``, the newest one there, if any (none yet:
    the job starts again from scratch). Every pod of a restart finds the same one: JobSet deletes the previous
    attempt's pods before it starts the next."""
    from zps.protocol import checkpoint as ckpt

    directory = env_value(env, "ZPS_CHECKPOINT_DIR")
    resume = env_value(env, "ZPS_RESUME")
    attempt = parse_int(ZPS_RESTART_ATTEMPT, env_value(env, ZPS_RESTART_ATTEMPT) or "0", 0)
    if not directory or not (resume == "latest" or (attempt and resume is None)):
        return {}
    found = ckpt.complete(directory)
    return {"ZPS_RESUME": str(found[-1])} if found else {}


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

FORMATS = ("jobset", "jobs")
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
# what each role's container asks for when the command line does not say: requests = limits, so the pods are of the
# Guaranteed QoS class (evicted last) and a role that outgrows its memory is killed (an exit the job reports)
DEFAULT_RESOURCES = {"coordinator": {"cpu": "500m", "memory": "1Gi"},
                     "server": {"cpu": "2", "memory": "4Gi"},
                     "worker": {"cpu": "2", "memory": "4Gi"}}
# JobSet's label with the number of the restart its pods belong to (0: the first attempt), given to each pod as
# ZPS_RESTART_ATTEMPT: `zps node` resumes a restarted job from its newest checkpoint (launcher.node)
RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"
ZPS_RESTART_ATTEMPT = "ZPS_RESTART_ATTEMPT"
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i?|[mkMGTPE]|[eE][+-]?\d+)?")
_RESOURCE_NAME = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def _check_name(what: str, value: str, max_len: int) -> None:
    if not _DNS_LABEL.fullmatch(value) or len(value) > max_len:
        raise ValueError(f"{what}={value!r} must be a DNS label: lowercase letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {max_len} characters")


def parse_resources(option: str, text: str) -> dict[str, str]:
    """``cpu=4,memory=16Gi,nvidia.com/gpu=1`` as a dict of Kubernetes quantities; ValueError naming ``option``."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not _RESOURCE_NAME.fullmatch(key) or not _QUANTITY.fullmatch(value):
            raise ValueError(f"{option} {text!r}: write NAME=QUANTITY pairs, e.g. cpu=4,memory=16Gi,nvidia.com/gpu=1 "
                             f"({item.strip()!r} is not one)")
        out[key] = value
    return out


@dataclass(frozen=True)
class K8sOptions:
    """How ``zps k8s`` deploys a job beyond its own options: the shape (one JobSet, or independent Jobs), each role's
    resources (requests = limits), a Kueue queue, when a finished job is deleted (``ttl``) and the longest any
    role may run (``deadline``; None: no limit)."""

    format: str = "jobset"
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    queue: str | None = None
    ttl: int = 86400
    deadline: int | None = None


def render_manifest(image: str, job: JobConfig, command: Sequence[str] | str, namespace: str | None = None,
                    port: int = DEFAULT_PORT, name: str = "zps", gpus_per_worker: int = 0,
                    checkpoint_claim: str | None = None, options: K8sOptions | None = None) -> str:
    """The Kubernetes objects of one zps job (see the module docstring) as a YAML document stream, without keys
    (:func:`render_secrets` gives those): the same text every time for the same arguments.

    ``command`` is the worker's script and arguments, run as ``zps node SCRIPT ARGS...``: a list of strings,
    or one string split like a shell would (``"train.py --lr 0.1"``). ``name`` prefixes every object (one
    cluster per name and namespace). ``gpus_per_worker`` > 0 asks for ``nvidia.com/gpu`` per worker pod.
    ``checkpoint_claim`` names a PersistentVolumeClaim mounted at ``job.checkpoint_dir`` in every pod.
    """
    options = options or K8sOptions()
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image={image!r} must be an image reference without spaces, e.g. 'registry/zps:1.0'")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int) or gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker={gpus_per_worker!r} must be an integer >= 0")
    if checkpoint_claim is not None:
        _check_name("checkpoint_claim", checkpoint_claim, 63)
        if not job.checkpoint_dir.startswith("/"):
            raise ValueError("checkpoint_claim needs an absolute --checkpoint-dir to mount it at")
    if options.format not in FORMATS:
        raise ValueError(f"format={options.format!r} is not one of {', '.join(FORMATS)}")
    if options.queue is not None:
        _check_name("queue", options.queue, 63)
    for what, value in (("ttl", options.ttl), ("deadline", options.deadline)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{what}={value!r} must be a number of seconds >= 0")
    refused = refused_options(job, options.format)
    if refused:
        raise ValueError(refused[0])
    port = parse_port("port", port)
    # pod names: <name>-worker-<rank>-0-0-<5 chars> must stay within 63 characters
    _check_name("name", name, 40)
    if namespace is not None:
        _check_name("namespace", namespace, 63)
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if not args or not all(isinstance(a, str) for a in args) or not args[0]:
        raise ValueError(f"command={command!r} must name the worker script, e.g. ['train.py', '--lr', '0.1']")

    jobset = options.format == "jobset"
    # JobSet: the coordinator pod's own DNS name (JobSet's headless service, named after the JobSet); Jobs: ours
    coordinator = join_host_port(f"{name}-coordinator-0-0.{name}" if jobset else f"{name}-coordinator", port)
    defaults = JobConfig().to_env()
    settings = {k: v for k, v in job.to_env().items()
                if v != defaults[k] or k in (ZPS_NUM_SERVERS, ZPS_NUM_WORKERS)}

    def labels(component: str, rank: int | None = None) -> dict[str, str]:
        out = {"app.kubernetes.io/name": "zps", "app.kubernetes.io/instance": name,
               "app.kubernetes.io/component": component}
        if rank is not None:
            out["zps/rank"] = str(rank)
        return out

    def meta(obj_name: str, component: str, rank: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": obj_name}
        if namespace is not None:
            out["namespace"] = namespace
        out["labels"] = labels(component, rank)
        return out

    def resources(role: str) -> dict[str, Any]:
        amounts = dict(options.resources.get(role, DEFAULT_RESOURCES[role]))
        if role == "worker" and gpus_per_worker:
            amounts["nvidia.com/gpu"] = str(gpus_per_worker)
        # extended resources (GPUs) are requested by their limit alone; Kubernetes sets the request equal
        return {"requests": {k: v for k, v in amounts.items() if k in ("cpu", "memory", "ephemeral-storage")},
                "limits": amounts}

    def metrics_port(role: str, rank: int) -> int | None:
        if not job.metrics_port or role == "worker":  # (a worker's metrics are served by the coordinator)
            return None
        return job.metrics_port if role == "coordinator" else job.metrics_port + 1 + rank

    def container(role: str, rank: int, argv: list[str]) -> dict[str, Any]:
        env: list[dict[str, Any]] = [
            {"name": ZPS_ROLE, "value": role},
            {"name": ZPS_COORDINATOR, "value": coordinator},
            *({"name": k, "value": v} for k, v in settings.items()),
            {"name": ZPS_HOST, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]
        if role != "coordinator":
            env.append({"name": ZPS_RANK, "value": str(rank)})
        if jobset:
            env.append({"name": ZPS_RESTART_ATTEMPT,
                        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{RESTART_LABEL}']"}}})
        mounts = []
        if job.secure:
            env.append({"name": ENV_SECRETS_DIR, "value": KEYS_PATH})
            mounts.append({"name": "keys", "mountPath": KEYS_PATH, "readOnly": True})
        out: dict[str, Any] = {"name": role, "image": image, "command": argv, "env": env,
                               "resources": resources(role)}
        ports = []
        if role == "coordinator":
            ports.append({"name": "coordinator", "containerPort": port, "protocol": "TCP"})
            # the coordinator answers on its port while the job lives: a pod whose coordinator stopped is restarted
            # by nobody (restartPolicy Never), but marked failed, which fails the job
            probe = {"tcpSocket": {"port": "coordinator"}, "periodSeconds": 10, "failureThreshold": 6}
            out["readinessProbe"] = {**probe, "failureThreshold": 1}
            out["livenessProbe"] = probe
        metrics = metrics_port(role, rank)
        if metrics is not None:
            ports.append({"name": "metrics", "containerPort": metrics, "protocol": "TCP"})
            if role == "server":  # (servers pick their data port when they start: nothing fixed to probe but this)
                out["livenessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 15,
                                        "failureThreshold": 4, "initialDelaySeconds": 30}
        if ports:
            out["ports"] = ports
        if checkpoint_claim is not None:
            mounts.append({"name": "checkpoints", "mountPath": job.checkpoint_dir})
        if mounts:
            out["volumeMounts"] = mounts
        return out

    def pod(role: str, rank: int, argv: list[str], restart: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"restartPolicy": restart, "automountServiceAccountToken": False,
                                "containers": [container(role, rank, argv)]}
        volumes: list[dict[str, Any]] = []
        if job.secure:
            volumes.append({"name": "keys", "secret": {"secretName": secret_name(name, role, rank),
                                                       "defaultMode": 0o400}})
        if checkpoint_claim is not None:
            volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim}})
        if volumes:
            spec["volumes"] = volumes
        metadata: dict[str, Any] = {"labels": labels(role, None if role == "coordinator" else rank)}
        metrics = metrics_port(role, rank)
        if metrics is not None:
            metadata["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics),
                                       "prometheus.io/path": "/metrics"}
        return {"metadata": metadata, "spec": spec}

    restart_workers = job.on_worker_failure == "restart"

    def job_spec(role: str, rank: int, argv: list[str]) -> dict[str, Any]:
        restart = role == "worker" and restart_workers
        spec: dict[str, Any] = {"completions": 1, "parallelism": 1,
                                "backoffLimit": job.max_restarts if restart else 0}
        if options.deadline is not None:
            spec["activeDeadlineSeconds"] = options.deadline
        if not jobset:
            spec["ttlSecondsAfterFinished"] = options.ttl
        spec["template"] = pod(role, rank, argv, "OnFailure" if restart else "Never")
        return spec

    roles = [("coordinator", 0, ["zps", "node"])]
    roles += [("server", rank, ["zps", "node"]) for rank in range(job.num_servers)]
    roles += [("worker", rank, ["zps", "node", *args]) for rank in range(job.num_workers)]

    def part(role: str, rank: int) -> str:
        return role if role == "coordinator" else f"{role}-{rank}"

    documents: list[dict[str, Any]]
    if jobset:
        workers = [part("worker", rank) for rank in range(job.num_workers)]
        metadata = meta(name, "job")
        if options.queue is not None:
            metadata["labels"]["kueue.x-k8s.io/queue-name"] = options.queue
        spec: dict[str, Any] = {
            "ttlSecondsAfterFinished": options.ttl,
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            # done when every worker is: the coordinator and the servers end with them (JobSet ends what runs)
            "successPolicy": {"operator": "All", "targetReplicatedJobs": workers},
            # a failed Job fails the whole set; --max-restarts N recreates it up to N times, resuming from the newest
            # checkpoint (ZPS_RESTART_ATTEMPT); a restarted worker (--on-worker-failure restart) is its Job's own
            "failurePolicy": {"maxRestarts": 0 if restart_workers else job.max_restarts},
            "replicatedJobs": [{"name": part(role, rank), "replicas": 1,
                                "template": {"metadata": {"labels": labels(role, None if role == "coordinator"
                                                                                else rank)},
                                             "spec": job_spec(role, rank, argv)}}
                               for role, rank, argv in roles],
        }
        documents = [{"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": metadata, "spec": spec}]
    else:
        documents = [
            {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{name}-coordinator", "coordinator"),
             "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels("coordinator"),
                      "ports": [{"name": "coordinator", "port": port, "targetPort": port, "protocol": "TCP"}]}},
            *({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(f"{name}-{part(role, rank)}", role, rank),
               "spec": job_spec(role, rank, argv)} for role, rank, argv in roles),
        ]
    return to_yaml_stream(documents)


def secret_name(name: str, role: str, rank: int) -> str:
    """The Secret that holds one pod's keys: ``zps-keys-worker-3`` (``zps-keys-coordinator``)."""
    return f"{name}-keys-{secrets_label(role, rank)}"


def render_secrets(job: JobConfig, namespace: str | None = None, name: str = "zps") -> str:
    """``--secure``: fresh keys for the job, one Secret per pod (each mounted by that pod alone), as YAML.

    Printed apart from the manifest (``zps k8s --keys``): the manifest holds no key, so it may be kept and reviewed;
    these go straight to ``kubectl apply -f -``.
    """
    _check_name("name", name, 40)
    if namespace is not None:
        _check_name("namespace", namespace, 63)
    documents = []
    for label, value in make_secrets(job.num_servers, job.num_workers).items():
        role, _, rank = label.partition("-")
        metadata: dict[str, Any] = {"name": f"{name}-keys-{label}"}
        if namespace is not None:
            metadata["namespace"] = namespace
        metadata["labels"] = {"app.kubernetes.io/name": "zps", "app.kubernetes.io/instance": name,
                              "app.kubernetes.io/component": role}
        documents.append({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
                          "immutable": True, "stringData": {f"{label}.json": value.to_json()}})
    return to_yaml_stream(documents)


# --- what the options mean on Kubernetes ------------------------------------------------------------------------

def _given(job: JobConfig, option: str) -> bool:
    return bool(getattr(job, option) != getattr(JobConfig(), option))


def refused_options(job: JobConfig, fmt: str = "jobset") -> list[str]:
    """The job's options that cannot work as asked on Kubernetes, each a sentence naming it."""
    out = []
    if job.net:
        out.append("--net emulates a network between processes on one host: use it with zps run")
    if fmt == "jobset" and job.on_worker_failure == "shrink":
        out.append("--on-worker-failure shrink: a JobSet fails as a whole when one of its Jobs fails, so a failed "
                   "worker cannot be left behind; use --format jobs (independent Jobs), or restart")
    if fmt == "jobset" and job.replicas:
        out.append(f"--replicas {job.replicas}: a JobSet fails as a whole when one of its Jobs fails, so a failed "
                   "server's backups cannot take over; use --format jobs (independent Jobs)")
    return out


def option_warnings(job: JobConfig, fmt: str = "jobset") -> list[str]:
    """The job's options that do less on Kubernetes than under zps run, each a sentence naming it."""
    out = []
    for option, why in (("straggler", "slows a worker on purpose (a simulation)"),
                        ("jitter", "stalls workers on purpose (a simulation)"),
                        ("kill", "kills a role on purpose (fault injection)")):
        if _given(job, option):
            out.append(f"--{option} {why}: it will, in every pod that reads it")
    for option in ("trace", "metrics_out"):
        if _given(job, option):
            flag = f"--{option.replace('_', '-')}"
            out.append(f"{flag}: each pod writes its own part into its own file system, and nothing merges them (zps "
                       f"run does): give a path on a volume every pod mounts (--checkpoint-claim) and merge them "
                       "yourself")
    if _given(job, "progress"):
        out.append("--progress: zps k8s starts no launcher to show it; watch the job with zps top --coordinator "
                   "(kubectl port-forward to the coordinator's port)")
    if not job.preload:
        out.append("--no-preload: every pod starts its role afresh anyway (preloading is zps run's)")
    if job.max_restarts and job.on_worker_failure != "restart" and fmt == "jobs":
        out.append(f"--max-restarts {job.max_restarts}: independent Jobs are not restarted as a whole; use the "
                   "JobSet format (failurePolicy.maxRestarts), or apply the manifest again with --resume")
    if job.max_restarts and job.on_worker_failure != "restart" and fmt == "jobset" and not job.checkpoint_dir:
        out.append(f"--max-restarts {job.max_restarts}: without --checkpoint-dir a restarted JobSet starts from "
                   "scratch")
    return out
