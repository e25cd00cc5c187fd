"""--secure: CurveZMQ on every socket. A process without the job's keys gets no answer from any role; a key speaks
only as the process it was made for; the job's own processes train as before."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import zmq
import zmq.utils.monitor

from zps.protocol import security
from zps.protocol.config import ConfigError
from zps.protocol.messages import ErrorCode, Kind, Message, parse_frames
from zps.protocol.tensors import as_buffer

from .helpers import close_all, local_cluster, run_parallel

NUMEL = 8


def curve_dealer(keys: security.Secrets | None, server_public: str) -> zmq.Socket:
    """A raw DEALER: with ``keys`` (public, secret) speaking CURVE to ``server_public``; without, in the clear."""
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_secretkey = keys.secret.encode()
    return sock


def handshake_outcome(sock: zmq.Socket, address: str, timeout: float = 20.0) -> int:
    """Connect ``sock`` to ``address`` and return the first monitor event that ends its handshake: succeeded,
    failed (auth or protocol), or the peer closed the connection."""
    monitor = sock.get_monitor_socket()
    ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}
    try:
        sock.connect(address)
        while monitor.poll(int(timeout * 1000)):
            event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
            if event in ends:
                return int(event)
        raise AssertionError(f"no end of the handshake with {address} within {timeout}s")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def request(kind: Kind, src: str, **fields) -> list:
    msg = Message(kind, id=99, src=src, body=fields.pop("body", {}), keys=fields.pop("keys", []),
                  frames=fields.pop("frames", []))
    return msg.to_frames()


def ask(sock: zmq.Socket, frames: list) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(10_000), "no answer"
    return parse_frames(sock.recv_multipart())


@pytest.fixture()
def secure_cluster():
    """A secure BSP cluster (2 servers, 2 workers) with declared tensors, and its clients."""
    with local_cluster(2, 2, secure=True) as cluster:
        clients = cluster.clients(shm=False)
        tensors = {"a": torch.arange(NUMEL, dtype=torch.float32), "b": torch.ones(2 * NUMEL)}
        try:
            run_parallel(lambda c: c.declare(tensors, ("SGD", [{"lr": 1.0}]) if c.rank == 0 else None), clients)
            yield cluster, clients, tensors
        finally:
            close_all(clients)


def pulled(client, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outs = {k: torch.empty_like(v) for k, v in tensors.items()}
    client.pull(outs, step=0).result(timeout=30)
    return outs


@pytest.mark.cluster
def test_without_the_jobs_key_no_role_answers(secure_cluster) -> None:
    cluster, clients, tensors = secure_cluster
    server_public = cluster.secrets["coordinator"].server_public
    stranger_public, stranger_secret = (k.decode() for k in zmq.curve_keypair())
    stranger = security.Secrets(server_public, "worker:0", stranger_public, stranger_secret)
    before = pulled(clients[0], tensors)
    targets = [cluster.coordinator.address, *clients[0].topology.servers]
    for address in targets:
        for keys, refused in ((None, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL), (stranger, zmq.EVENT_HANDSHAKE_FAILED_AUTH)):
            sock = curve_dealer(keys, server_public)
            try:
                outcome = handshake_outcome(sock, address)
                assert outcome in (refused, zmq.EVENT_DISCONNECTED), (address, keys, outcome)
                # nothing it sends is answered: there is no connection to carry it (a short, bounded look)
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(request(Kind.STATS, "worker:0"), zmq.NOBLOCK)
                assert not sock.poll(300)
            finally:
                sock.close(linger=0)
    # a key of the job is let in, and the refused ones changed nothing
    sock = curve_dealer(cluster.secrets["worker-1"], server_public)
    try:
        assert handshake_outcome(sock, clients[0].topology.servers[0]) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert ask(sock, request(Kind.STATS, "worker:1")).kind is Kind.OK
    finally:
        sock.close(linger=0)
    after = pulled(clients[0], tensors)
    assert all(torch.equal(before[k], after[k]) for k in tensors)


@pytest.mark.cluster
def test_a_workers_key_speaks_only_as_that_worker(secure_cluster) -> None:
    cluster, clients, tensors = secure_cluster
    server_public = cluster.secrets["coordinator"].server_public
    before = pulled(clients[1], tensors)
    chunk = clients[0].chunks("a")[0]
    server = clients[0].topology.servers[chunk.server]
    grad = as_buffer(torch.full((chunk.numel,), 1000.0)).tobytes()
    push = {"key": chunk.key, "step": 0, "nf": 1, "codec": "none", "meta": {}, "bufs": [["float32", chunk.numel]]}
    sock = curve_dealer(cluster.secrets["worker-0"], server_public)  # worker 0's own key
    coord = curve_dealer(cluster.secrets["worker-0"], server_public)
    try:
        sock.connect(server)
        coord.connect(cluster.coordinator.address)
        for frames in (request(Kind.PUSH, "worker:1", keys=[push], frames=[grad]),  # as another worker
                       request(Kind.LEAVE, "worker:1"), request(Kind.STATS, "worker:1")):
            reply = ask(sock, frames)
            assert reply.kind is Kind.ERROR and reply.body["code"] == ErrorCode.BAD_HEADER.value, reply.body
            assert "speaks as 'worker:0'" in reply.body["reason"]
        for frames in (request(Kind.REGISTER, "server:0", body={"role": "server", "rank": 0,
                                                              "address": "tcp://127.0.0.1:9"}),
                       request(Kind.DONE, "worker:1", body={"exit_code": 1, "failure": "forged"}),
                       request(Kind.BARRIER, "worker:1", body={"name": "x"})):
            reply = ask(coord, frames)
            assert reply.kind is Kind.ERROR and "speaks as 'worker:0'" in reply.body["reason"], reply.body
    finally:
        sock.close(linger=0)
        coord.close(linger=0)
    assert cluster.coordinator.error is None and cluster.coordinator.state.value == "running"
    after = pulled(clients[1], tensors)
    assert all(torch.equal(before[k], after[k]) for k in tensors)
    # the job goes on: one BSP step from both workers applies their mean gradient exactly
    grads = [{k: torch.full_like(v, float(r + 1)) for k, v in tensors.items()} for r in range(2)]
    run_parallel(lambda c: c.push(grads[c.rank], step=0).result(timeout=30), clients)
    outs = {k: torch.empty_like(v) for k, v in tensors.items()}
    clients[1].pull(outs, step=1).result(timeout=30)
    for k in tensors:
        torch.testing.assert_close(outs[k], before[k] - 1.5, rtol=0, atol=0)


# -- keys: where they come from ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_secrets_files_are_private_and_name_their_process(tmp_path: Path) -> None:
    keys = security.make_secrets(2, 3)
    assert set(keys) == {"coordinator", "server-0", "server-1", "worker-0", "worker-1", "worker-2", "observer"}
    # the observer's key is known to the coordinator only, as the observer (zps top), never to a server
    assert keys["coordinator"].clients[keys["observer"].public] == "observer"
    assert keys["observer"].public not in keys["server-0"].clients and not keys["observer"].server_secret
    assert not keys["worker-1"].server_secret and not keys["worker-1"].clients  # a worker cannot serve
    assert keys["server-1"].server_secret == keys["coordinator"].server_secret
    assert keys["coordinator"].clients[keys["worker-2"].public] == "worker:2"
    where = security.write_secrets(tmp_path / "keys", keys)
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(where / "worker-2.json").st_mode) == 0o600
    env = {"ZPS_SECRETS_DIR": str(where)}
    assert security.load_secrets(env, "worker", 2) == keys["worker-2"]
    assert security.load_secrets(env, "coordinator", -1) == keys["coordinator"]
    with pytest.raises(ConfigError, match="needs its rank"):
        security.load_secrets(env, "worker", -1)
    os.chmod(where / "worker-2.json", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        security.load_secrets(env, "worker", 2)
    with pytest.raises(ConfigError, match="needs this process's keys"):
        security.load_secrets({}, "worker", 2)
    with pytest.raises(ConfigError, match="not the job's secrets"):
        security.load_secrets({"ZPS_SECRETS": "{}"}, "worker", 2)
    assert "secret" not in repr(security.Secrets("x", "worker:0", "p", "s")).split("Secrets(")[0]


@pytest.mark.unit
@pytest.mark.skipif(os.getuid() != 0, reason="files of another user need root to make (chown) in a test")
def test_secrets_another_user_could_have_planted_are_refused(tmp_path: Path) -> None:
    """Issue 22: in a directory others can write, another user substituted their own 0600 worker-0.json and
    load_secrets returned it (for coordinator.json: who may speak as whom)."""
    keys = security.make_secrets(1, 1)
    stranger = 54321  # a uid of nobody here: another local user
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # writable by every user
    planted = security.make_secrets(1, 1)["worker-0"]
    path = shared / "worker-0.json"
    path.write_text(planted.to_json())
    os.chmod(path, 0o600)
    os.chown(path, stranger, stranger)
    with pytest.raises(ConfigError, match="writable by other users"):
        security.load_secrets({"ZPS_SECRETS_DIR": str(shared)}, "worker", 0)
    os.chmod(shared, 0o1777)  # sticky, like /tmp: nobody may replace another's entry, but one may plant a name
    with pytest.raises(ConfigError, match="belongs to another user"):
        security.load_secrets({"ZPS_SECRETS_FILE": str(path)}, "worker", 0)
    mine = security.write_secrets(tmp_path / "mine", keys)
    link = shared / "link.json"
    os.symlink(mine / "worker-0.json", link)
    os.lchown(link, stranger, stranger)  # a link another user made to this user's own file
    with pytest.raises(ConfigError, match="belongs to another user"):
        security.load_secrets({"ZPS_SECRETS_FILE": str(link)}, "worker", 0)
    os.chown(mine, stranger, stranger)  # the directory of the keys is another user's
    with pytest.raises(ConfigError, match="belongs to another user"):
        security.load_secrets({"ZPS_SECRETS_DIR": str(mine)}, "worker", 0)
    os.chown(mine, os.getuid(), os.getgid())
    assert security.load_secrets({"ZPS_SECRETS_DIR": str(mine)}, "worker", 0) == keys["worker-0"]
    planted_dir = tmp_path / "planted"  # zps secrets into a directory another user made: nothing is written
    planted_dir.mkdir()
    os.chown(planted_dir, stranger, stranger)
    with pytest.raises(OSError, match="belongs to another user"):
        security.write_secrets(planted_dir, keys)
    assert not list(planted_dir.iterdir())


@pytest.mark.unit
def test_a_process_takes_its_rank_from_its_keys_and_refuses_anothers() -> None:
    from zps.protocol.config import Config

    keys = security.make_secrets(1, 2)
    base = {"ZPS_ROLE": "worker", "ZPS_COORDINATOR": "127.0.0.1:9", "ZPS_NUM_SERVERS": "1", "ZPS_NUM_WORKERS": "2",
            "ZPS_SECURE": "1", "ZPS_SECRETS": keys["worker-1"].to_json()}
    config = Config.from_env(base)
    assert config.rank == 1 and config.secrets == keys["worker-1"]
    assert "worker-1" not in repr(config) and keys["worker-1"].secret not in repr(config)
    with pytest.raises(ConfigError, match="worker:1's, not this worker's"):
        Config.from_env({**base, "ZPS_RANK": "0"})
    with pytest.raises(ConfigError, match="worker:1's, not this server's"):
        Config.from_env({**base, "ZPS_ROLE": "server"})


@pytest.mark.unit
def test_the_guard_hands_keys_from_stdin_to_the_role(tmp_path: Path) -> None:
    import subprocess
    import sys

    keys = security.make_secrets(1, 1)["worker-0"].to_json()
    show = "import os,sys; sys.stdout.write(os.environ['ZPS_SECRETS'])"
    argv = [sys.executable, "-m", "zps.launcher.remote", "guard", "--label", "worker 0", "--interface", "lo",
            "--secrets-stdin", "--", sys.executable, "-c", show]
    done = subprocess.run(argv, input=keys.encode() + b"\n", capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(keys)
    empty = subprocess.run(argv, input=b"", capture_output=True, timeout=60)
    assert empty.returncode == 2 and b"no keys arrived" in empty.stderr
