"""`zps ray`: a job's roles as Ray actors, on a local Ray cluster of three nodes that the tests start on this host
(``ray.cluster_utils.Cluster``: a head without CPUs and two nodes, ``a`` and ``b``, each a raylet of its own).

The cluster tests are slow (the cluster alone takes 10-20 s to start on 2 cores) and skip, saying why, where Ray is
not installed (``pip install 'zps[ray]'``); the unit tests at the end need no cluster.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zps.launcher.backend import LaunchError
from zps.launcher.ray_backend import actor_options, node_names, parse_resources

from .helpers import ROOT, ZPS, finish, start, tagged_pids, wait_for_line

NO_RAY = "Ray is not installed: pip install 'zps[ray]' (CI installs it)"
NODES: dict[str, dict[str, Any]] = {"a": {"num_cpus": 4, "resources": {"node_a": 1}},
                                    "b": {"num_cpus": 4, "resources": {"node_b": 1}}}


def as_dict(state: Any) -> dict[str, Any]:
    """One entry of Ray's state API (a dataclass, or a pydantic model for jobs) as a dict."""
    if dataclasses.is_dataclass(state):
        return dataclasses.asdict(state)  # type: ignore[arg-type]
    return dict(state.model_dump() if hasattr(state, "model_dump") else state)


class RayCluster:
    """The test cluster: its address and, per node id, the node's name (``a``, ``b`` or ``head``)."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
        head = self.cluster.head_node
        assert head is not None
        self.names: dict[str, str] = {str(head.node_id): "head"}
        for name, args in NODES.items():
            node = self.cluster.add_node(**args)
            self.names[str(node.node_id)] = name
        self.cluster.wait_for_nodes()
        self.address: str = str(self.cluster.address)
        ray.init(address=self.address, namespace="zps-tests", log_to_driver=False)

    def actors(self, namespace: str, state: str | None = None) -> list[dict[str, Any]]:
        from ray.util.state import list_actors

        filters: list[Any] = [("ray_namespace", "=", namespace)]
        if state:
            filters.append(("state", "=", state))
        return [as_dict(a) for a in list_actors(filters=filters, detail=True, limit=1000)]

    def groups(self, namespace: str) -> list[dict[str, Any]]:
        from ray.util.state import list_placement_groups

        return [as_dict(g) for g in list_placement_groups(detail=True, limit=1000)
                if str(g.name or "").startswith(namespace)]

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@contextlib.contextmanager
def one_ray_cluster_at_a_time(within: float = 900.0) -> Iterator[None]:
    """Hold a lock file while a Ray cluster of these tests lives: the two test processes of ``pytest -n 2`` may each
    be given some of this module's tests, and two local clusters at once collide on Ray's fixed ports (the
    dashboard's 8265). Fails, saying so, if the other process's cluster keeps it longer than ``within`` seconds."""
    path = Path(tempfile.gettempdir()) / "zps-tests-ray-cluster.lock"
    with open(path, "a+") as lock:
        end = time.monotonic() + within
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < end, f"another test process kept its Ray cluster over {within:.0f}s"
                time.sleep(0.5)  # (no event to wait on across processes: the lock is polled)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray", reason=NO_RAY)
    with one_ray_cluster_at_a_time():
        held = RayCluster()
        try:
            yield held
        finally:
            held.close()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """What travels to the nodes: the two training scripts, nothing else."""
    root = tmp_path / "job"
    root.mkdir()
    shutil.copy(ROOT / "examples" / "digits.py", root)
    shutil.copy(ROOT / "tests" / "scripts" / "train_steps.py", root)
    return root


def zps_ray(tag: str, cluster: RayCluster, workdir: Path, *args: str) -> subprocess.Popen:
    return start(tag, ["ray", "--address", cluster.address, "--working-dir", str(workdir), "--progress", "lines",
                       "--env", f"ZPS_TEST_TAG={tag}", *args], cwd=workdir)


def namespace_of(output: str) -> str:
    match = re.search(r"ray: namespace (zps-[0-9a-f]+)", output)
    assert match, output
    return match.group(1)


def printed_placement(cluster: RayCluster, output: str) -> dict[str, str]:
    """``{"server-0": "a", ...}`` from the launcher's lines ``[zps] ray: 2 servers, ...: 0@ADDRESS/NODEID, ...``."""
    out = {}
    for role, where in re.findall(r"\[zps\] ray: \d+ (server|worker)s, .*?: (.*)", output):
        for rank, node in re.findall(r"(\d+)@\S+/([0-9a-f]{8})", where):
            (name,) = [n for node_id, n in cluster.names.items() if node_id.startswith(node)]
            out[f"{role}-{rank}"] = name
    return out


def wait_until(what: str, check: Any, within: float) -> Any:
    """Poll ``check`` (Ray's state, an external condition) until it returns something true, or fail naming ``what``."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so within {within}s (last: {value!r})")
        time.sleep(0.2)


def nothing_left(cluster: RayCluster, namespace: str, tag: str) -> None:
    """No actor of the job alive, every placement group of it removed, no role process on this host."""
    wait_until("every actor of the job dead", lambda: not cluster.actors(namespace, "ALIVE"), 30)
    wait_until("every placement group of the job removed",
               lambda: all(g["state"] == "REMOVED" for g in cluster.groups(namespace)), 30)
    assert cluster.groups(namespace), "the job made no placement group"
    wait_until("no role process of the job on this host", lambda: not tagged_pids(tag), 30)


# -- on the cluster ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_on_two_nodes_with_each_role_where_asked(cluster: RayCluster, workdir: Path, tag: str,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = zps_ray(tag, cluster, workdir, "--servers", "2", "--workers", "2", "--worker-placement", "spread",
                   "digits.py", "--epochs", "20", "--out", str(out))
    code, output = finish(proc, 300)
    assert code == 0, output
    assert json.loads(out.read_text())["test_accuracy"] >= 0.95, output
    namespace = namespace_of(output)
    nodes = {a["name"].split(".")[0]: cluster.names[a["node_id"]] for a in cluster.actors(namespace)}
    assert set(nodes) == {"server-0", "server-1", "worker-0", "worker-1"}, nodes
    # spread: each server on a node of its own, and each worker; never the head, which has no CPU
    assert {nodes["server-0"], nodes["server-1"]} == {"a", "b"}, nodes
    assert {nodes["worker-0"], nodes["worker-1"]} == {"a", "b"}, nodes
    # the launcher said where each role would go, and each role's lines name its node (on one host: its address and
    # node id)
    assert printed_placement(cluster, output) == nodes, output
    assert re.search(r"\[worker 0@[\d.]+/[0-9a-f]{8}\] epoch 20/20", output), output
    assert "--secure" not in output and "ZPS_SECRETS" not in output
    nothing_left(cluster, namespace, tag)


@pytest.mark.slow
def test_workers_packed_on_one_node_by_default(cluster: RayCluster, workdir: Path, tag: str) -> None:
    proc = zps_ray(tag, cluster, workdir, "--servers", "2", "--workers", "3", "--worker-resources",
                   '{"CPU": 1, "node_b": 0.1}', "train_steps.py", "--steps", "5")
    code, output = finish(proc, 300)
    assert code == 0, output
    nodes = {a["name"].split(".")[0]: cluster.names[a["node_id"]] for a in cluster.actors(namespace_of(output))}
    assert [nodes[f"worker-{r}"] for r in range(3)] == ["b", "b", "b"], nodes  # a custom resource: node b only
    assert {nodes["server-0"], nodes["server-1"]} == {"a", "b"}, nodes


def kill_actor(cluster: RayCluster, namespace: str, name: str) -> dict[str, Any]:
    """SIGKILL the process of the live actor ``name`` (what the OOM killer does); its state before."""
    (actor,) = [a for a in cluster.actors(namespace, "ALIVE") if a["name"].split(".")[0] == name]
    os.kill(int(actor["pid"]), signal.SIGKILL)
    return actor


@pytest.mark.slow
def test_a_killed_worker_actor_is_replaced(cluster: RayCluster, workdir: Path, tag: str) -> None:
    proc = zps_ray(tag, cluster, workdir, "--servers", "2", "--workers", "2", "--on-worker-failure", "restart",
                   "--max-restarts", "2", "train_steps.py", "--steps", "60", "--step-time", "0.05")
    namespace = namespace_of(wait_for_line(proc, "ray: namespace", 120))
    wait_for_line(proc, "STEP 5", 180)
    kill_actor(cluster, namespace, "worker-1")
    code, output = finish(proc, 300)
    assert code == 0, output
    assert re.search(r"worker 1@\S+ died with its Ray actor on node \S+: .*: starting a replacement", output), output
    assert "STEP 60" in output
    nothing_left(cluster, namespace, tag)


@pytest.mark.slow
def test_a_killed_server_actor_fails_over_to_its_backup(cluster: RayCluster, workdir: Path, tag: str) -> None:
    proc = zps_ray(tag, cluster, workdir, "--insecure", "--servers", "2", "--workers", "2", "--replicas", "1",
                   "train_steps.py", "--steps", "60", "--step-time", "0.05")
    namespace = namespace_of(wait_for_line(proc, "ray: namespace", 120))
    wait_for_line(proc, "STEP 5", 180)
    kill_actor(cluster, namespace, "server-0")
    code, output = finish(proc, 300)
    assert code == 0, output
    assert re.search(r"server 0@\S+ died with its Ray actor on node \S+: .*its backups take over", output), output
    assert output.count("STEP 60") == 2, output


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "driver-killed"])
def test_nothing_is_left_after_ctrl_c_or_the_drivers_death(cluster: RayCluster, workdir: Path, tag: str,
                                                           how: signal.Signals) -> None:
    proc = zps_ray(tag, cluster, workdir, "--servers", "2", "--workers", "2", "train_steps.py", "--steps", "1000",
                   "--pause-after", "3")
    namespace = namespace_of(wait_for_line(proc, "ray: namespace", 120))
    wait_for_line(proc, "PAUSED", 180)
    assert len(cluster.actors(namespace, "ALIVE")) == 4
    proc.send_signal(how)
    code, output = finish(proc, 60)
    assert code == (130 if how == signal.SIGINT else -signal.SIGKILL), output
    nothing_left(cluster, namespace, tag)


@pytest.mark.slow
def test_secure_keys_are_on_no_command_line_and_not_in_rays_state(cluster: RayCluster, workdir: Path,
                                                                  tag: str) -> None:
    proc = zps_ray(tag, cluster, workdir, "--servers", "1", "--workers", "2", "train_steps.py", "--steps", "1000",
                   "--pause-after", "3")
    try:
        namespace = namespace_of(wait_for_line(proc, "ray: namespace", 120))
        wait_for_line(proc, "PAUSED", 180)
        # the keys, as a worker holds them (its environment, as under zps run)
        keys = set()
        for pid in tagged_pids(tag):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"ZPS_SECRETS="):
                    secrets = json.loads(item.removeprefix(b"ZPS_SECRETS="))
                    keys |= {secrets[k] for k in ("secret", "server_secret") if secrets.get(k)}
        assert len(keys) >= 3, "no role of the job holds its keys"  # two workers' own, the server's
        from ray.util.state import list_jobs, list_tasks

        shown = json.dumps([cluster.actors(namespace), [as_dict(t) for t in list_tasks(detail=True, limit=10000)],
                            [as_dict(j) for j in list_jobs(detail=True)]], default=str)
        assert "ZPS_SECRETS" not in shown
        lines = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    lines.append(Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    continue
        for key in keys:
            assert key not in shown
            assert not [line for line in lines if key in line]
    finally:
        proc.send_signal(signal.SIGINT)
        finish(proc, 60)


# -- without a cluster -------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_resources_and_actor_options() -> None:
    assert parse_resources("--worker-resources", '{"CPU": 4, "GPU": 1, "memory": 8e9, "tpu": 2}') == {
        "CPU": 4.0, "GPU": 1.0, "memory": 8e9, "tpu": 2.0}
    assert actor_options({"CPU": 4, "GPU": 1, "memory": 8e9, "tpu": 2}) == {
        "num_cpus": 4, "num_gpus": 1, "memory": 8e9, "resources": {"tpu": 2}}
    assert actor_options({"GPU": 1}) == {"num_cpus": 0.0, "num_gpus": 1}
    for text, words in (("CPU=4", "is not JSON"), ("[1]", "a JSON object"), ('{"CPU": -1}', "CPU=-1 must be"),
                        ('{"CPU": true}', "CPU=True"), ('{"CPU": 0}', "needs some resource > 0")):
        with pytest.raises(LaunchError, match=re.escape(words)):
            parse_resources("--worker-resources", text)


@pytest.mark.unit
def test_node_names() -> None:
    nodes = [{"NodeID": "aa" * 10, "NodeManagerHostname": "gpu1", "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "bb" * 10, "NodeManagerHostname": "gpu2", "NodeManagerAddress": "10.0.0.2"}]
    assert node_names(nodes) == {"aa" * 10: "gpu1", "bb" * 10: "gpu2"}
    same_host = [{**n, "NodeManagerHostname": "vm"} for n in nodes]
    assert node_names(same_host) == {"aa" * 10: "10.0.0.1", "bb" * 10: "10.0.0.2"}
    one_address = [{**n, "NodeManagerAddress": "10.0.0.9"} for n in same_host]
    assert node_names(one_address) == {"aa" * 10: "10.0.0.9/aaaaaaaa", "bb" * 10: "10.0.0.9/bbbbbbbb"}


@pytest.mark.unit
def test_zps_ray_without_ray_says_how_to_install_it(tmp_path: Path) -> None:
    shadow = tmp_path / "ray"  # a `ray` that cannot be imported, first on the path
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    (tmp_path / "t.py").write_text("")
    done = subprocess.run([*ZPS, "ray", "--workers", "2", "t.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'zps[ray]'" in done.stderr, done.stderr


@pytest.mark.unit
def test_the_actor_runs_a_role_and_streams_its_output(tmp_path: Path) -> None:
    """RoleHost.run outside Ray: the role's pid and node, its output, its exit code (a worker whose script is not
    there exits 2, saying so), in that order."""
    pytest.importorskip("ray", reason=NO_RAY)
    from zps.launcher.ray_actor import RoleHost

    env = {"ZPS_ROLE": "worker", "ZPS_COORDINATOR": "127.0.0.1:1", "ZPS_NUM_WORKERS": "1", "ZPS_NUM_SERVERS": "1"}
    messages = list(RoleHost().run([str(tmp_path / "missing.py")], env))
    assert messages[0][0] == "started" and isinstance(messages[0][1], int)
    output = b"".join(bytes(m[1]) for m in messages if m[0] == "out").decode()  # type: ignore[call-overload]
    assert "missing.py' not found" in output, messages
    assert messages[-1] == ("exit", 2)
    stopped = RoleHost()
    stopped.signal(signal.SIGTERM)  # before it started: it never does
    assert list(stopped.run(["t.py"], env)) == [("exit", -signal.SIGTERM)]


@pytest.mark.unit
def test_rays_reason_for_a_death_in_one_line() -> None:
    from zps.launcher.ray_backend import _reason

    class Died(Exception):
        actor_init_failed = False
        error_msg = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RoleHost\n\tpid: 12\n"
                     "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection "
                     "error code 2. End of file. Some common causes include: (1) the process was killed by the OOM "
                     "killer due to high memory usage, (2) ray stop --force was called, or (3) " + "x" * 400)

    reason = _reason(Died())
    assert reason.startswith("Worker exit type: SYSTEM_ERROR") and "OOM killer" in reason
    assert "\n" not in reason and len(reason) == 300 and reason.endswith("...")
    Died.actor_init_failed, Died.error_msg = True, "The actor died because of an error raised in its creation task"
    assert _reason(Died()) == f"the actor could not start: {Died.error_msg}"
