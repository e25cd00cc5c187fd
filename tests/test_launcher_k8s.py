"""`zps k8s`: the manifests as an SRE would deploy them, checked against Kubernetes' own schemas (kubernetes-validate,
every version it ships from 1.29) and JobSet's (tests/data/jobset-v1alpha2.schema.json, its CRD's schema with the
embedded Kubernetes types referring to kubernetes-validate's), one test per item of the review; and the manifest's
pods run as local processes, each with only its own keys, training for real."""
from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from zps.launcher.k8s import (
    K8sOptions,
    k8s_resume,
    option_warnings,
    refused_options,
    render_manifest,
    render_secrets,
)
from zps.protocol.config import Config, JobConfig
from zps.protocol.security import Secrets

from .helpers import ROOT, ZPS, Procs, free_port, wait_for_no_tagged

DATA = Path(__file__).parent / "data"
VERSIONS = ("1.29", "1.33", "1.37")


def manifest(job: JobConfig | None = None, command: list[str] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    text = render_manifest("registry.example/zps:1.0", job or JobConfig(num_servers=2, num_workers=3, secure=True),
                           command or ["train.py", "--lr", "0.1"], **kwargs)
    return [d for d in yaml.safe_load_all(text) if d]


def pods(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template of a manifest, by its replicated Job's or Job's name (``worker-1``, ``zps-worker-1``)."""
    out = {}
    for doc in documents:
        if doc["kind"] == "JobSet":
            for rjob in doc["spec"]["replicatedJobs"]:
                out[rjob["name"]] = rjob["template"]["spec"]["template"]
        elif doc["kind"] == "Job":
            out[doc["metadata"]["name"]] = doc["spec"]["template"]
    return out


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- the schemas ---------------------------------------------------------------------------------------------------
def validate(document: dict[str, Any], version: str) -> None:
    """Kubernetes' schema for ``document`` (JobSet's for a JobSet), strict: an unknown field is an error, as
    ``kubectl apply`` makes it (server-side field validation)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)")
    if document["kind"] != "JobSet":
        kv.validate(document, version, strict=True)
        return
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    latest = [v for v in utils.all_versions() if utils.major_minor(v) <= version][-1]
    definitions = utils.schema_contents(f"kubernetes-json-schema/v{latest}-local-strict/_definitions.json", version)
    schema = json.loads((DATA / "jobset-v1alpha2.schema.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)


SHAPES: dict[str, dict[str, Any]] = {
    "jobset": dict(),
    "jobs": dict(options=K8sOptions(format="jobs")),
    "everything": dict(namespace="ml", port=31000, gpus_per_worker=2, checkpoint_claim="ckpt",
                       job=JobConfig(num_servers=2, num_workers=2, secure=True, metrics_port=9100,
                                     checkpoint_dir="/ckpt", on_worker_failure="restart", max_restarts=3),
                       options=K8sOptions(queue="team-a", ttl=600, deadline=7200,
                                          resources={"coordinator": {"cpu": "1", "memory": "2Gi"},
                                                     "server": {"cpu": "8", "memory": "64Gi"},
                                                     "worker": {"cpu": "8", "memory": "32Gi"}})),
}


@pytest.mark.unit
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_object_is_valid_against_the_schemas(shape: str, version: str) -> None:
    documents = manifest(**SHAPES[shape])
    documents += [d for d in yaml.safe_load_all(render_secrets(JobConfig(num_servers=2, num_workers=3)))]
    for document in documents:
        validate(document, version)


@pytest.mark.unit
def test_the_schema_check_refuses_what_kubernetes_would() -> None:
    """The check can fail: a misspelt field, a wrong type, in a Job and inside a JobSet's embedded pod spec."""
    import jsonschema

    jobs = manifest(options=K8sOptions(format="jobs"))
    bad_job = json.loads(json.dumps(jobs[1]))
    bad_job["spec"]["backofLimit"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate(bad_job, "1.33")
    (jobset,) = manifest()
    bad = json.loads(json.dumps(jobset))
    bad["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "1.33")
    bad = json.loads(json.dumps(jobset))
    bad["spec"]["successPolicy"]["operator"] = "Most"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "1.33")


# -- one test per item of the review ----------------------------------------------------------------------------
@pytest.mark.unit
def test_every_pod_has_cpu_and_memory_requests_equal_to_limits() -> None:
    """Guaranteed QoS (evicted last), the defaults and the options; a GPU is a limit."""
    for shape in ("jobset", "jobs"):
        for name, pod in pods(manifest(**SHAPES[shape])).items():
            (container,) = pod["spec"]["containers"]
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert set(requests) == {"cpu", "memory"} and requests == {k: limits[k] for k in requests}, name
    everything = pods(manifest(**SHAPES["everything"]))
    assert everything["worker-1"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert everything["server-0"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "64Gi"}
    assert pods(manifest())["coordinator"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "500m", "memory": "1Gi"}


@pytest.mark.unit
def test_one_jobset_ties_the_roles_and_fails_or_succeeds_as_one() -> None:
    job = JobConfig(num_servers=2, num_workers=3, secure=True, checkpoint_dir="/ckpt", max_restarts=2)
    (jobset,) = manifest(job, options=K8sOptions(queue="team-a", ttl=600, deadline=7200))
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = jobset["spec"]
    names = [r["name"] for r in spec["replicatedJobs"]]
    assert names == ["coordinator", "server-0", "server-1", "worker-0", "worker-1", "worker-2"]
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["worker-0", "worker-1", "worker-2"]}
    assert spec["failurePolicy"] == {"maxRestarts": 2}  # --max-restarts: the set is recreated, and resumes
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    for rjob in spec["replicatedJobs"]:
        assert rjob["replicas"] == 1 and rjob["template"]["spec"]["backoffLimit"] == 0
        assert rjob["template"]["spec"]["activeDeadlineSeconds"] == 7200
        env = env_of(rjob["template"]["spec"]["template"])
        assert env["ZPS_COORDINATOR"] == "zps-coordinator-0-0.zps:29600"  # the coordinator pod's JobSet DNS name
        assert env["ZPS_RESTART_ATTEMPT"] == {
            "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/restart-attempt']"}}
    # a worker restarted in place keeps the set going; the set itself is then not restarted
    restart = JobConfig(num_workers=2, on_worker_failure="restart", max_restarts=3)
    (jobset,) = manifest(restart)
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 0}
    worker = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == "worker-1"][0]["template"]["spec"]
    assert worker["backoffLimit"] == 3 and worker["template"]["spec"]["restartPolicy"] == "OnFailure"


@pytest.mark.unit
def test_independent_jobs_are_tied_by_labels_and_deleted_after_their_ttl() -> None:
    documents = manifest(options=K8sOptions(format="jobs", ttl=600))
    assert [d["kind"] for d in documents] == ["Service"] + ["Job"] * 6
    assert {d["metadata"]["labels"]["app.kubernetes.io/instance"] for d in documents} == {"zps"}
    for doc in documents[1:]:
        assert doc["spec"]["ttlSecondsAfterFinished"] == 600 and "activeDeadlineSeconds" not in doc["spec"]
        assert env_of(doc["spec"]["template"])["ZPS_COORDINATOR"] == "zps-coordinator:29600"
        assert "ZPS_RESTART_ATTEMPT" not in env_of(doc["spec"]["template"])
    service = documents[0]["spec"]
    assert service["clusterIP"] == "None" and service["selector"]["app.kubernetes.io/component"] == "coordinator"


@pytest.mark.unit
def test_probes_and_metrics_ports_with_scrape_annotations() -> None:
    found = pods(manifest(**SHAPES["everything"]))
    coordinator = found["coordinator"]
    (container,) = coordinator["spec"]["containers"]
    assert container["readinessProbe"]["tcpSocket"] == container["livenessProbe"]["tcpSocket"] == {
        "port": "coordinator"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"coordinator": 31000, "metrics": 9100}
    assert coordinator["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                                                      "prometheus.io/path": "/metrics"}
    for rank in range(2):
        server = found[f"server-{rank}"]
        (container,) = server["spec"]["containers"]
        assert container["ports"] == [{"name": "metrics", "containerPort": 9101 + rank, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert server["metadata"]["annotations"]["prometheus.io/port"] == str(9101 + rank)
        worker = found[f"worker-{rank}"]  # (its metrics are the coordinator's to serve)
        assert "ports" not in worker["spec"]["containers"][0] and "annotations" not in worker["metadata"]
    plain = pods(manifest())
    assert "livenessProbe" not in plain["server-0"]["spec"]["containers"][0]  # no fixed port: heartbeats say it


@pytest.mark.unit
def test_each_pod_mounts_only_its_own_keys_and_the_manifest_holds_none() -> None:
    job = JobConfig(num_servers=2, num_workers=3, secure=True)
    text = render_manifest("zps:1", job, ["train.py"])
    assert text == render_manifest("zps:1", job, ["train.py"])  # the same on every render: no key in it
    assert 'kind: "Secret"' not in text and "stringData" not in text
    for name, pod in pods([d for d in yaml.safe_load_all(text) if d]).items():
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "keys"]
        assert volume["secret"] == {"secretName": f"zps-keys-{name}", "defaultMode": 0o400}
        assert pod["spec"]["automountServiceAccountToken"] is False
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(render_secrets(job, namespace="ml")) if d}
    assert sorted(secrets) == sorted(f"zps-keys-{n}" for n in ("coordinator", "server-0", "server-1", "worker-0",
                                                                   "worker-1", "worker-2"))
    for name, secret in secrets.items():
        label = name.removeprefix("zps-keys-")
        assert list(secret["stringData"]) == [f"{label}.json"] and secret["metadata"]["namespace"] == "ml"
        keys = Secrets.from_json(secret["stringData"][f"{label}.json"], name)
        if label.startswith("worker"):  # a worker's Secret: its own key pair, nobody else's, no serving key
            assert keys.name == f"worker:{label[7:]}" and keys.secret and not keys.server_secret and not keys.clients
    other = yaml.safe_load_all(render_secrets(job))
    assert {d["metadata"]["name"]: d["stringData"] for d in other if d} != {n: s["stringData"] for n, s in
                                                                           secrets.items()}  # fresh every time


@pytest.mark.unit
def test_options_that_mean_nothing_there_are_refused_or_warned_by_name() -> None:
    assert refused_options(JobConfig(net="bw=1gbit"))[0].startswith("--net ")
    assert refused_options(JobConfig(num_servers=2, replicas=1))[0].startswith("--replicas 1:")
    assert refused_options(JobConfig(num_servers=2, replicas=1), "jobs") == []
    assert refused_options(JobConfig(on_worker_failure="shrink"))[0].startswith("--on-worker-failure shrink")
    warned = option_warnings(JobConfig(straggler="1:2", trace="/t", progress="off", preload=False, max_restarts=2),
                             "jobs")
    assert [w.split()[0].rstrip(":") for w in warned] == ["--straggler", "--trace", "--progress", "--no-preload",
                                                          "--max-restarts"]
    assert option_warnings(JobConfig()) == []
    assert option_warnings(JobConfig(on_worker_failure="restart", max_restarts=2), "jobs") == []
    with pytest.raises(ValueError, match="^--net emulates"):
        render_manifest("zps:1", JobConfig(net="bw=1gbit"), ["t.py"])


def zps_k8s(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZPS, "k8s", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.unit
def test_zps_k8s_command() -> None:
    done = zps_k8s("--image", "zps:1", "--workers", "2", "--straggler", "1:2", "--trace", "/t", "--worker-resources",
                   "cpu=8,memory=32Gi", "train.py", "--lr", "0.1")
    assert done.returncode == 0, done.stderr
    assert "warning: --straggler" in done.stderr and "warning: --trace" in done.stderr
    (jobset,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    worker = pods([jobset])["worker-1"]["spec"]["containers"][0]
    assert worker["command"] == ["zps", "node", "train.py", "--lr", "0.1"]
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    for args, words in ((["--net", "bw=1gbit"], "zps k8s: --net emulates"),
                        (["--worker-resources", "cpu"], "--worker-resources 'cpu': write NAME=QUANTITY"),
                        (["--format", "jobset", "--servers", "2", "--replicas", "1", "--insecure"], "--replicas 1:")):
        done = zps_k8s("--image", "zps:1", *args, "train.py")
        assert done.returncode == 2 and words in done.stderr, done.stderr
    keys = zps_k8s("--image", "zps:1", "--workers", "2", "--keys")
    assert keys.returncode == 0, keys.stderr
    assert sorted(d["metadata"]["name"] for d in yaml.safe_load_all(keys.stdout)) == [
        "zps-keys-coordinator", "zps-keys-server-0", "zps-keys-worker-0", "zps-keys-worker-1"]


@pytest.mark.unit
def test_zps_k8s_keys_are_not_printed_to_a_terminal() -> None:
    main, other = pty.openpty()
    try:
        done = subprocess.run([*ZPS, "k8s", "--image", "zps:1", "--keys"], cwd=ROOT, stdout=other,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(other)
        os.close(main)
    assert done.returncode == 2 and "pipe it into kubectl apply -f -" in done.stderr


@pytest.mark.unit
def test_a_restarted_jobset_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    for step in (5, 10):  # two complete checkpoints and an incomplete one
        (tmp_path / f"ckpt-{step:09d}").mkdir()
        (tmp_path / f"ckpt-{step:09d}" / "MANIFEST.json").write_text("{}")
    (tmp_path / "ckpt-000000015").mkdir()
    env = {"ZPS_CHECKPOINT_DIR": str(tmp_path)}
    assert k8s_resume({**env, "ZPS_RESTART_ATTEMPT": "0"}) == {}  # the first attempt starts afresh
    assert k8s_resume({**env, "ZPS_RESTART_ATTEMPT": "1"}) == {"ZPS_RESUME": str(tmp_path / "ckpt-000000010")}
    assert k8s_resume({**env, "ZPS_RESUME": "latest"}) == {"ZPS_RESUME": str(tmp_path / "ckpt-000000010")}
    assert k8s_resume({**env, "ZPS_RESTART_ATTEMPT": "1", "ZPS_RESUME": "/other"}) == {}  # given: kept
    assert k8s_resume({"ZPS_CHECKPOINT_DIR": str(tmp_path / "none"), "ZPS_RESTART_ATTEMPT": "2"}) == {}


@pytest.mark.unit
def test_a_pod_builds_its_config_from_the_manifest() -> None:
    """A string command is split as a shell would; the checkpoint volume is mounted at --checkpoint-dir in every pod;
    a worker pod's environment (its IP from the downward API) makes the Config of its rank."""
    job = JobConfig(num_workers=2, checkpoint_dir="/ckpt")
    text = render_manifest("zps", job, "train.py --flag 'a b' yes", name="job-7", checkpoint_claim="zps-ckpt")
    found = pods([d for d in yaml.safe_load_all(text) if d])
    for pod in found.values():
        assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "zps-ckpt"}} in pod["spec"]["volumes"]
        (container,) = pod["spec"]["containers"]
        assert {"name": "checkpoints", "mountPath": "/ckpt"} in container["volumeMounts"]
    worker = found["worker-1"]
    assert worker["spec"]["containers"][0]["command"] == ["zps", "node", "train.py", "--flag", "a b", "yes"]
    env = {k: v for k, v in env_of(worker).items() if isinstance(v, str)}
    config = Config.from_env({**env, "ZPS_HOST": "10.2.3.4", "ZPS_RESTART_ATTEMPT": "0"})
    assert (config.role, config.rank, config.host, config.coordinator) == ("worker", 1, "10.2.3.4",
                                                                            "job-7-coordinator-0-0.job-7:29600")
    assert (config.job.num_servers, config.job.num_workers, config.job.checkpoint_dir) == (1, 2, "/ckpt")


# -- the manifest's pods, run here -------------------------------------------------------------------------------
@pytest.fixture()
def procs(tag: str, tmp_path: Path) -> Iterator[Procs]:
    yield Procs(tag, tmp_path)


@pytest.mark.cluster
def test_the_manifests_pods_train_digits_each_with_its_own_keys(procs: Procs, tag: str, tmp_path: Path) -> None:
    """Each pod of the rendered JobSet as a local process: its container's environment (the pod IP 127.0.0.1, the
    coordinator's DNS name made 127.0.0.1 too), its command, and its Secret alone mounted at ZPS_SECRETS_DIR."""
    port = free_port()
    job = JobConfig(num_servers=2, num_workers=2, secure=True, timeout=90)
    out = tmp_path / "result.json"
    command = ["examples/digits.py", "--epochs", "8", "--out", str(out)]
    (jobset,) = manifest(job, command, port=port)
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(render_secrets(job)) if d}
    for name, pod in pods([jobset]).items():
        (container,) = pod["spec"]["containers"]
        env = {k: v for k, v in env_of(pod).items() if isinstance(v, str)}
        env.update(ZPS_HOST="127.0.0.1", ZPS_RESTART_ATTEMPT="0",
                   ZPS_COORDINATOR=env["ZPS_COORDINATOR"].replace("zps-coordinator-0-0.zps", "127.0.0.1"))
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "keys"]
        keys = tmp_path / name / "keys"
        keys.mkdir(parents=True, mode=0o700)
        for file, text in secrets[volume["secret"]["secretName"]].items():
            (keys / file).write_text(text)
            (keys / file).chmod(volume["secret"]["defaultMode"])
        env["ZPS_SECRETS_DIR"] = str(keys)
        assert container["command"][:2] == ["zps", "node"]
        procs.start(name, env, container["command"][1:])
    codes = procs.wait(180)
    assert set(codes.values()) == {0}, f"{codes}\n{procs.logs()}"
    assert wait_for_no_tagged(tag, within=5) == []
    assert json.loads(out.read_text())["test_accuracy"] >= 0.9, procs.logs()
