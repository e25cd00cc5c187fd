"""Unit tests for the launcher's pure parts: hostfiles and placement, Slurm, DMLC / torchrun, Kubernetes."""

from __future__ import annotations

import dataclasses

import pytest

from zps.launcher.env_roles import local_device, local_rank, torchrun_roles
from zps.launcher.hostfile import (
    Host,
    HostfileError,
    Placement,
    coordinator_host,
    format_placement,
    parse_host_list,
    parse_hostfile,
    place,
    read_hostfile,
)
from zps.launcher.k8s import K8sOptions, k8s_roles, rank_from_k8s, render_manifest, to_yaml_stream
from zps.launcher.slurm import NodelistError, expand_nodelist, is_coordinator_task, slurm_roles
from zps.protocol.config import Config, ConfigError, JobConfig
from zps.protocol.dmlc import dmlc_to_zps
from zps.protocol.variables import join_host_port

pytestmark = pytest.mark.unit


@pytest.fixture
def yaml():
    """PyYAML (the dev extra) reads the manifests back; only the Kubernetes tests need it."""
    return pytest.importorskip("yaml")


# --- hostfile parsing ------------------------------------------------------------------------------------------

GOOD = """\
# cluster for the nightly run

node1 slots=4            # four GPUs
node2:2
node3
   node4 slots=0 roles=server
node5 slots=8 roles=worker,server
[fd00::1]:3
10.0.0.7 slots=1 roles=coordinator
"""


def test_parse_good_hostfile():
    hosts = parse_hostfile(GOOD, "hosts.txt")
    assert hosts == [
        Host("node1", 4, ("server", "worker"), 3),
        Host("node2", 2, ("server", "worker"), 4),
        Host("node3", 1, ("server", "worker"), 5),
        Host("node4", 0, ("server",), 6),
        Host("node5", 8, ("server", "worker"), 7),
        Host("[fd00::1]", 3, ("server", "worker"), 8),
        Host("10.0.0.7", 1, ("coordinator",), 9),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        hosts[0].slots = 3  # type: ignore[misc]


def test_parse_bracketed_ipv6_without_slots_and_crlf():
    hosts = parse_hostfile("[::1]\r\nhost-a.example.com slots=2\r\n")
    assert [(h.name, h.slots, h.line) for h in hosts] == [("[::1]", 1, 1), ("host-a.example.com", 2, 2)]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("a slots=2\nb slots=x\n", 2, "slots='x'"),
        ("a slots=-1\n", 1, "slots='-1'"),
        ("a slots=\n", 1, "slots=''"),
        ("a\n\n# c\nb:two\n", 4, "slots='two'"),
        ("a:\n", 1, "slots=''"),
        ("a slots=2\nb\na slots=1\n", 3, "already listed at line 1"),
        ("a slots=2 gpus=4\n", 1, "unknown key 'gpus'"),
        ("a slots=2 max_slots=4\n", 1, "unknown key 'max_slots'"),
        ("a slots\n", 1, "not key=value"),
        ("a slots=1 slots=2\n", 1, "given twice"),
        ("a:2 slots=2\n", 1, "slots given twice"),
        ("a roles=server,scheduler\n", 1, "roles='server,scheduler'"),
        ("a roles=\n", 1, "roles=''"),
        ("\n\nfe80::1:4\n", 3, "IPv6"),
        ("a\nb/c slots=1\n", 2, "not a host name"),
        ("a roles=coordinator\nb\nc roles=coordinator,server\n", 3, "coordinator role"),
    ],
)
def test_parse_bad_hostfile_names_file_and_line(text, line, words):
    with pytest.raises(HostfileError) as err:
        parse_hostfile(text, "my.hosts")
    message = str(err.value)
    assert message.startswith("my.hosts:")
    assert f"line {line}" in message
    assert words in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_empty_hostfile(text):
    with pytest.raises(HostfileError, match=r"my\.hosts: no hosts"):
        parse_hostfile(text, "my.hosts")


def test_read_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("a slots=2\nb slots=zero\n")
    with pytest.raises(HostfileError, match=rf"{path}: line 2: slots='zero'"):
        read_hostfile(path)
    path.write_text("a slots=2\n")
    assert read_hostfile(str(path)) == [Host("a", 2, ("server", "worker"), 1)]
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "missing")


def test_parse_host_list():
    assert parse_host_list("a:2, b:4,c") == [
        Host("a", 2, ("server", "worker"), 1),
        Host("b", 4, ("server", "worker"), 2),
        Host("c", 1, ("server", "worker"), 3),
    ]
    with pytest.raises(HostfileError, match="item 2"):
        parse_host_list("a:2,,c")
    with pytest.raises(HostfileError, match="item 3: host 'a' is already listed at item 1"):
        parse_host_list("a:2,b,a:1")
    with pytest.raises(HostfileError, match="item 1"):
        parse_host_list("a slots=2")


# --- placement -------------------------------------------------------------------------------------------------


def hosts_of(text: str) -> list[Host]:
    return parse_hostfile(text, "h")


def by_role(placements: list[Placement], role: str) -> list[tuple[int, str, int]]:
    return [(p.rank, p.host, p.local_rank) for p in placements if p.role == role]


def test_place_spreads_servers_and_fills_workers():
    placements = place(hosts_of("a slots=2\nb slots=2\nc slots=2\n"), num_servers=4, num_workers=5)
    assert by_role(placements, "coordinator") == [(0, "a", 0)]
    assert by_role(placements, "server") == [(0, "a", 0), (1, "b", 0), (2, "c", 0), (3, "a", 1)]
    assert by_role(placements, "worker") == [(0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "b", 1), (4, "c", 0)]
    assert [p.role for p in placements] == ["coordinator"] + ["server"] * 4 + ["worker"] * 5


def test_place_respects_roles_and_slots():
    hosts = hosts_of(
        "ps1 slots=0 roles=server\nps2 roles=server\ng1 slots=2 roles=worker\n"
        "g2 slots=3 roles=worker\nhead roles=coordinator\n"
    )
    placements = place(hosts, num_servers=3, num_workers=4)
    assert by_role(placements, "coordinator") == [(0, "head", 0)]
    assert by_role(placements, "server") == [(0, "ps1", 0), (1, "ps2", 0), (2, "ps1", 1)]
    assert by_role(placements, "worker") == [(0, "g1", 0), (1, "g1", 1), (2, "g2", 0), (3, "g2", 1)]
    assert coordinator_host(hosts) == "head"
    assert coordinator_host(hosts[:2]) == "ps1"


def test_place_servers_do_not_use_slots():
    placements = place(hosts_of("a slots=1\n"), num_servers=2, num_workers=1)
    assert by_role(placements, "server") == [(0, "a", 0), (1, "a", 1)]
    assert by_role(placements, "worker") == [(0, "a", 0)]


def test_place_does_not_fit():
    with pytest.raises(HostfileError) as err:
        place(hosts_of("a slots=1\nb slots=1\n"), num_servers=1, num_workers=3)
    assert "3 workers need 3 slots but the hostfile offers 2: a slots=1, b slots=1" in str(err.value)
    with pytest.raises(HostfileError, match=r"offers 1: b slots=1 \(a without the worker role\)"):
        place(hosts_of("a slots=4 roles=server\nb slots=1\n"), num_servers=1, num_workers=2)
    with pytest.raises(HostfileError, match="need a host with the server role"):
        place(hosts_of("a roles=worker\nb roles=worker,coordinator\n"), num_servers=1, num_workers=1)
    with pytest.raises(HostfileError, match="at least 1 server and 1 worker"):
        place(hosts_of("a\n"), num_servers=0, num_workers=1)


def test_format_placement():
    table = format_placement(place(hosts_of("alpha slots=2\nb\n"), num_servers=1, num_workers=3))
    assert table.splitlines() == [
        "role         rank  host   local_rank",
        "coordinator  0     alpha  0",
        "server       0     alpha  0",
        "worker       0     alpha  0",
        "worker       1     alpha  1",
        "worker       2     b      0",
    ]


# --- Slurm -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, expected",
    [
        ("login", ["login"]),
        (
            "node[01-04,07],gpu-a[1-2],login",
            ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2", "login"],
        ),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[3]", ["n3"]),
        ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
        ("[1-2]x", ["1x", "2x"]),
        ("a,b , c", ["a", "b", "c"]),
        ("n[1, 3-4]", ["n1", "n3", "n4"]),
        ("  cn[0001-0002].cluster.local  ", ["cn0001.cluster.local", "cn0002.cluster.local"]),
        ("a[1-2],b[01-02]-c", ["a1", "a2", "b01-c", "b02-c"]),
    ],
)
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize(
    "nodelist, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("node[1-3", "never closed"),
        ("node1-3]", "closes nothing"),
        ("node[1-[2]]", "nested"),
        ("node[]", "holds ''"),
        ("node[a-c]", "holds 'a-c'"),
        ("node[5-2]", "runs backwards"),
        ("node[1-2-3]", "holds '1-2-3'"),
        ("node[1,,2]", "holds ''"),
        ("a,,b", "empty name"),
        ("a,", "empty name"),
        ("bad host", "not a host name"),
        ("n[0-99999999]", "more than"),
        ("a[0-999]b[0-999]", "more than"),
    ],
)
def test_expand_nodelist_malformed(nodelist, words):
    with pytest.raises(NodelistError) as err:
        expand_nodelist(nodelist)
    assert words in str(err.value)
    assert isinstance(err.value, ValueError)


def slurm_env(procid: int, ntasks: int = 4, **extra: str) -> dict[str, str]:
    env = {
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_LOCALID": str(procid % 2),
        "SLURMD_NODENAME": f"gpu{7 + procid // 2:02d}",
    }
    env.update(extra)
    return env


def test_slurm_roles_layout():
    roles = [slurm_roles(slurm_env(p), num_servers=1) for p in range(4)]
    assert [(r["ZPS_ROLE"], r["ZPS_RANK"]) for r in roles] == [
        ("server", "0"),
        ("worker", "0"),
        ("worker", "1"),
        ("worker", "2"),
    ]
    assert {r["ZPS_COORDINATOR"] for r in roles} == {"gpu07:29600"}
    assert {(r["ZPS_NUM_SERVERS"], r["ZPS_NUM_WORKERS"]) for r in roles} == {("1", "3")}
    assert [r["ZPS_HOST"] for r in roles] == ["gpu07", "gpu07", "gpu08", "gpu08"]
    assert [r["ZPS_LOCAL_RANK"] for r in roles] == ["0", "1", "0", "1"]
    assert [is_coordinator_task(slurm_env(p)) for p in range(4)] == [True, False, False, False]
    config = Config.from_env({**slurm_env(3), **roles[3]})
    assert (config.role, config.rank, config.job.num_workers, config.coordinator) == ("worker", 2, 3, "gpu07:29600")


def test_slurm_roles_sources_and_overrides():
    env = {"SLURM_PROCID": "2", "SLURM_NPROCS": "5", "SLURM_NODELIST": "c[1-3]"}
    roles = slurm_roles(env, num_servers=2, port=4000)
    assert roles == {
        "ZPS_ROLE": "worker",
        "ZPS_RANK": "0",
        "ZPS_NUM_SERVERS": "2",
        "ZPS_NUM_WORKERS": "3",
        "ZPS_COORDINATOR": "c1:4000",
    }
    step = slurm_roles({**env, "SLURM_STEP_NODELIST": "c[2-3]"}, num_servers=2)
    assert step["ZPS_COORDINATOR"] == "c2:29600"
    explicit = slurm_roles({**env, "ZPS_COORDINATOR": "head:1234", "ZPS_HOST": "10.1.1.1"}, num_servers=2)
    assert (explicit["ZPS_COORDINATOR"], explicit["ZPS_HOST"]) == ("head:1234", "10.1.1.1")


def test_slurm_roles_errors():
    with pytest.raises(ConfigError, match=r"leave no worker after 4 servers; start at least 5 tasks"):
        slurm_roles(slurm_env(0), num_servers=4)
    with pytest.raises(ConfigError, match="SLURM_PROCID is not set"):
        slurm_roles({"SLURM_NTASKS": "2", "SLURM_NODELIST": "a"}, num_servers=1)
    with pytest.raises(ConfigError, match="SLURM_NTASKS or SLURM_NPROCS is not set"):
        slurm_roles({"SLURM_PROCID": "0", "SLURM_NODELIST": "a"}, num_servers=1)
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        slurm_roles({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, num_servers=1)
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        slurm_roles(slurm_env(0, SLURM_PROCID="x"), num_servers=1)
    with pytest.raises(ConfigError, match="must be < SLURM_NTASKS"):
        slurm_roles(slurm_env(4), num_servers=1)
    with pytest.raises(ConfigError, match="task 0 runs on gpu08, not on the first node gpu07"):
        slurm_roles(slurm_env(0, SLURMD_NODENAME="gpu08"), num_servers=1)
    with pytest.raises(NodelistError):
        slurm_roles(slurm_env(1, SLURM_JOB_NODELIST="gpu[07-"), num_servers=1)
    with pytest.raises(ConfigError, match="num_servers=0"):
        slurm_roles(slurm_env(1), num_servers=0)


# --- DMLC and torchrun -----------------------------------------------------------------------------------------


def test_dmlc_to_zps():
    env = {
        "DMLC_ROLE": "scheduler",
        "DMLC_PS_ROOT_URI": "10.0.0.1",
        "DMLC_PS_ROOT_PORT": "9000",
        "DMLC_NUM_SERVER": "2",
        "DMLC_NUM_WORKER": "4",
        "DMLC_NODE_HOST": "10.0.0.5",
    }
    assert dmlc_to_zps(env) == {
        "ZPS_ROLE": "coordinator",
        "ZPS_COORDINATOR": "10.0.0.1:9000",
        "ZPS_NUM_SERVERS": "2",
        "ZPS_NUM_WORKERS": "4",
        "ZPS_HOST": "10.0.0.5",
    }
    worker = {**env, "DMLC_ROLE": "worker", "DMLC_WORKER_ID": "3"}
    derived = dmlc_to_zps(worker)
    assert (derived["ZPS_ROLE"], derived["ZPS_RANK"]) == ("worker", "3")
    config = Config.from_env({**worker, **derived})
    assert (config.role, config.rank, config.coordinator, config.job.num_workers) == ("worker", 3, "10.0.0.1:9000", 4)
    # a server ignores DMLC_WORKER_ID (BytePS sets it on every process of a machine)
    assert "ZPS_RANK" not in dmlc_to_zps({**worker, "DMLC_ROLE": "server"})
    assert dmlc_to_zps({"DMLC_PS_ROOT_URI": "fd00::1", "DMLC_PS_ROOT_PORT": "1"}) == {"ZPS_COORDINATOR": "[fd00::1]:1"}
    assert dmlc_to_zps({}) == {}


def test_dmlc_zps_wins():
    env = {
        "DMLC_ROLE": "worker",
        "DMLC_WORKER_ID": "1",
        "DMLC_PS_ROOT_URI": "a",
        "DMLC_PS_ROOT_PORT": "1",
        "DMLC_NUM_SERVER": "2",
        "DMLC_NUM_WORKER": "2",
        "DMLC_NODE_HOST": "h",
        "ZPS_ROLE": "worker",
        "ZPS_RANK": "0",
        "ZPS_COORDINATOR": "b:2",
        "ZPS_NUM_SERVERS": "1",
        "ZPS_NUM_WORKERS": "3",
        "ZPS_HOST": "g",
    }
    assert dmlc_to_zps(env) == {}
    # an explicit ZPS_ROLE decides whether DMLC_WORKER_ID applies
    assert dmlc_to_zps({"ZPS_ROLE": "server", "DMLC_ROLE": "worker", "DMLC_WORKER_ID": "1"}) == {}
    assert dmlc_to_zps({"ZPS_NUM_WORKERS": "", "DMLC_NUM_WORKER": "5"}) == {"ZPS_NUM_WORKERS": "5"}


@pytest.mark.parametrize(
    "env, words",
    [
        ({"DMLC_ROLE": "joint"}, "DMLC_ROLE='joint'"),
        ({"DMLC_PS_ROOT_URI": "a"}, "DMLC_PS_ROOT_PORT is not set"),
        ({"DMLC_PS_ROOT_PORT": "1"}, "DMLC_PS_ROOT_URI is not set"),
        ({"DMLC_PS_ROOT_URI": "a", "DMLC_PS_ROOT_PORT": "http"}, "DMLC_PS_ROOT_PORT='http'"),
        ({"DMLC_PS_ROOT_URI": "a", "DMLC_PS_ROOT_PORT": "70000"}, "not a TCP port"),
        ({"DMLC_NUM_WORKER": "0"}, "DMLC_NUM_WORKER=0 must be >= 1"),
        ({"DMLC_ROLE": "worker", "DMLC_WORKER_ID": "-1"}, "DMLC_WORKER_ID=-1"),
    ],
)
def test_dmlc_errors(env, words):
    with pytest.raises(ConfigError) as err:
        dmlc_to_zps(env)
    assert words in str(err.value)


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_torchrun_roles():
    assert torchrun_roles(TORCHRUN) == {
        "ZPS_ROLE": "worker",
        "ZPS_RANK": "5",
        "ZPS_NUM_WORKERS": "8",
        "ZPS_LOCAL_RANK": "1",
        "ZPS_COORDINATOR": "node0:29501",
    }
    roles = torchrun_roles({**TORCHRUN, "ZPS_COORDINATOR": "ps:7000"}, num_servers=2, port_offset=10)
    assert "ZPS_COORDINATOR" not in roles and roles["ZPS_NUM_SERVERS"] == "2"
    assert torchrun_roles(TORCHRUN, port_offset=100)["ZPS_COORDINATOR"] == "node0:29600"
    assert "ZPS_NUM_SERVERS" not in torchrun_roles({**TORCHRUN, "ZPS_NUM_SERVERS": "3"}, num_servers=2)
    config = Config.from_env({**TORCHRUN, **torchrun_roles(TORCHRUN, num_servers=2)})
    assert (config.role, config.rank, config.job.num_workers, config.job.num_servers) == ("worker", 5, 8, 2)


@pytest.mark.parametrize(
    "env, words",
    [
        ({}, "WORLD_SIZE is not set"),
        ({**TORCHRUN, "RANK": "8"}, "RANK=8 must be < WORLD_SIZE=8"),
        ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
        ({**TORCHRUN, "MASTER_PORT": "65535"}, "not a TCP port"),
        ({**TORCHRUN, "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ],
)
def test_torchrun_errors(env, words):
    with pytest.raises(ConfigError) as err:
        torchrun_roles(env)
    assert words in str(err.value)


def test_local_rank_and_device(monkeypatch):
    torch = pytest.importorskip("torch")
    assert local_rank({}) == 0
    assert local_rank({"SLURM_LOCALID": "3", "LOCAL_RANK": "2"}) == 2
    assert local_rank({"ZPS_LOCAL_RANK": "1", "LOCAL_RANK": "2"}) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device({"LOCAL_RANK": "3"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device({"LOCAL_RANK": "3"}) == "cuda:3"
    assert local_device({}) == "cuda:0"
    assert local_device({"LOCAL_RANK": "5"}) == "cuda:1"  # more workers than GPUs: shared round-robin


def test_join_host_port():
    assert join_host_port("a", 1) == "a:1"
    assert join_host_port("::1", 2) == "[::1]:2"
    assert join_host_port("[::1]", 2) == "[::1]:2"


# --- Kubernetes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"image": ""}, "image=''"),
        ({"image": "a b"}, "image='a b'"),
        ({"checkpoint_claim": "pvc"}, "needs an absolute --checkpoint-dir"),
        ({"checkpoint_claim": "Bad_Claim", "job": JobConfig(checkpoint_dir="/c")}, "checkpoint_claim='Bad_Claim'"),
        ({"command": []}, "command=[]"),
        ({"namespace": "ML"}, "namespace='ML'"),
        ({"name": "zps_job"}, "name='zps_job'"),
        ({"name": "x" * 41}, "at most 40"),
        ({"port": 0}, "port=0"),
        ({"gpus_per_worker": -1}, "gpus_per_worker=-1"),
        ({"options": K8sOptions(format="helm")}, "format='helm'"),
        ({"options": K8sOptions(queue="Team A")}, "queue='Team A'"),
        ({"options": K8sOptions(ttl=-1)}, "ttl=-1"),
        ({"options": K8sOptions(deadline=True)}, "deadline=True"),
    ],
)
def test_render_manifest_errors(kwargs, words):
    args = {"image": "zps", "job": JobConfig(), "command": ["t.py"], **kwargs}
    with pytest.raises(ValueError) as err:
        render_manifest(**args)
    assert words in str(err.value)




def test_yaml_quoting_round_trips(yaml):
    tricky = [
        "yes",
        "no",
        "null",
        "~",
        "1",
        "0x10",
        "1e3",
        "*ref",
        "&a",
        "!tag",
        "# c",
        "a: b",
        "- x",
        "[x]",
        "{y}",
        "'",
        '"',
        "back\\slash",
        "tab\there",
        "line\nbreak",
        "ünïcode ☃ 🎉",
        "",
        " pad ",
        "%x",
        "@",
        "`",
        "a #b",
        "\x00\x07",
        "\u2028",
    ]
    doc = {
        "list": tricky,
        "map": {f"k{i}": v for i, v in enumerate(tricky)},
        "n": 3,
        "t": True,
        "z": None,
        "empty": [],
        "nothing": {},
        "nested": [[1, 2], {"a": [{"b": "c"}]}],
        "yes": "key needs quoting",
        "weird key: #": 1,
    }
    assert yaml.safe_load(to_yaml_stream([doc])) == doc
    assert list(yaml.safe_load_all(to_yaml_stream([doc, {"b": 2}]))) == [doc, {"b": 2}]


def test_rank_from_k8s():
    assert rank_from_k8s({}) is None
    assert rank_from_k8s({"HOSTNAME": "web-6d4cf56db6-12345"}) is None
    assert rank_from_k8s({"JOB_COMPLETION_INDEX": "4"}) == 4
    assert rank_from_k8s({"ZPS_RANK_FROM": "job-completion-index", "JOB_COMPLETION_INDEX": "0"}) == 0
    assert rank_from_k8s({"ZPS_RANK_FROM": "hostname-ordinal", "HOSTNAME": "zps-server-12"}) == 12
    assert k8s_roles({"ZPS_RANK_FROM": "hostname-ordinal", "HOSTNAME": "zps-server-2"}) == {"ZPS_RANK": "2"}
    assert k8s_roles({"ZPS_RANK": "0", "JOB_COMPLETION_INDEX": "4"}) == {}
    assert k8s_roles({}) == {}
    with pytest.raises(ConfigError, match="does not end in -N"):
        rank_from_k8s({"ZPS_RANK_FROM": "hostname-ordinal", "HOSTNAME": "zps-server"})
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX is not set"):
        rank_from_k8s({"ZPS_RANK_FROM": "job-completion-index"})
    with pytest.raises(ConfigError, match="ZPS_RANK_FROM='pod-label'"):
        rank_from_k8s({"ZPS_RANK_FROM": "pod-label"})
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX='x'"):
        rank_from_k8s({"JOB_COMPLETION_INDEX": "x"})


@pytest.mark.unit
@pytest.mark.parametrize("hosts, servers, replicas", [(3, 3, 2), (2, 4, 1), (4, 8, 2), (3, 6, 1)])
def test_zps_launch_puts_the_copies_of_a_chunk_on_different_hosts(hosts: int, servers: int, replicas: int) -> None:
    """Servers go round-robin over the hosts and a chunk's copies sit on consecutive server ranks, so with a number
    of servers that is a multiple of the number of hosts its R + 1 copies are on R + 1 hosts wherever there are
    that many (one host dying loses no chunk). Otherwise the copies of the last server wrap round to the first
    ones, which may share its host (docs/failures.md)."""
    from zps.protocol.replicas import copies

    placed = place(parse_hostfile("".join(f"node{i} slots=2\n" for i in range(hosts))), servers, 2)
    host_of = {p.rank: p.host for p in placed if p.role == "server"}
    for home in range(servers):
        on = [host_of[s] for s in copies(home, replicas, servers)]
        assert len(set(on)) == min(replicas + 1, hosts), (home, on)
