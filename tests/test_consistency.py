"""SSP bounds staleness (asserted from what the servers record); BSP waits name who is missing; cluster size errors."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from zps.protocol import transport
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.protocol.rendezvous import RendezvousError
from zps.worker.client import Client

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster


def run_steps(client: Client, steps: int, delay: float, tensors: dict[str, torch.Tensor]) -> None:
    grads = {k: torch.full_like(v, 0.01) for k, v in tensors.items()}
    for step in range(steps):
        if delay:
            time.sleep(delay)  # an emulated straggler, not synchronisation
        client.push_pull(grads, tensors, step).result(timeout=60)


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_never_lets_a_worker_run_more_than_s_clocks_ahead(staleness: int) -> None:
    steps = 15
    with local_cluster(2, 3, "ssp", staleness=staleness) as cluster:
        clients = cluster.clients(chunk_bytes=64)
        try:
            models = [{"w": torch.zeros(40), "b": torch.zeros(3)} for _ in clients]
            clients[0].declare(models[0], ("SGD", [{"lr": 0.1}]))
            run_parallel(lambda cm: cm[0].declare(cm[1]), zip(clients[1:], models[1:], strict=True))
            run_parallel(lambda cm: cm[0].pull(cm[1], 0).result(), zip(clients, models, strict=True))
            # worker 2 is the straggler
            run_parallel(lambda i: run_steps(clients[i], steps, 0.01 if i == 2 else 0.0, models[i]), range(3))
            stats = clients[0].stats()
        finally:
            close_all(clients)
    for s in stats:
        assert s["max_served_gap"] <= staleness, s
    # the fast workers really did use the slack they were allowed
    assert max(s["max_served_gap"] for s in stats) == staleness
    # every push was applied once: 3 workers x steps x keys on the server
    total = sum(s["pushes_applied"] for s in stats)
    assert total == 3 * steps * sum(s["keys"] for s in stats)


def test_asp_does_not_wait_for_stragglers() -> None:
    with local_cluster(1, 2, "asp") as cluster:
        clients = cluster.clients()
        try:
            models = [{"w": torch.zeros(8)} for _ in clients]
            clients[0].declare(models[0], ("SGD", [{"lr": 0.1}]))
            clients[1].declare(models[1])
            # worker 1 never pushes; worker 0 still makes progress
            run_steps(clients[0], 10, 0.0, models[0])
            stats = clients[0].stats()[0]
        finally:
            close_all(clients)
    assert stats["max_served_gap"] == 10
    torch.testing.assert_close(models[0]["w"], torch.full((8,), -0.1 * 0.01 * 10))  # lr x grad x steps


def test_bsp_wait_names_the_missing_worker() -> None:
    with local_cluster(1, 2, "bsp", timeout=1.0) as cluster:
        clients = cluster.clients()
        try:
            tensors = {"w": torch.zeros(4)}
            clients[0].declare(tensors, ("SGD", [{"lr": 0.1}]))
            clients[1].declare({"w": torch.zeros(4)})
            started = time.monotonic()
            with pytest.raises(ProtocolError) as info:
                clients[0].push_pull({"w": torch.ones(4)}, tensors, 0).result(timeout=30)
            assert time.monotonic() - started < 10
            assert info.value.code is ErrorCode.TIMEOUT
            assert "waits for workers [1]" in str(info.value)
        finally:
            close_all(clients)


def test_a_worker_that_leaves_is_no_longer_waited_for() -> None:
    with local_cluster(1, 2, "bsp") as cluster:
        clients = cluster.clients()
        try:
            tensors = {"w": torch.zeros(4)}
            clients[0].declare(tensors, ("SGD", [{"lr": 1.0}]))
            clients[1].declare({"w": torch.zeros(4)})
            clients[1].leave()
            clients[0].push_pull({"w": torch.ones(4)}, tensors, 0).result(timeout=10)
            torch.testing.assert_close(tensors["w"], -torch.ones(4))
        finally:
            close_all(clients)


def test_missing_worker_fails_fast_naming_the_rank() -> None:
    """The job expects 3 workers; only 2 start. Registration fails within the timeout, naming rank 2."""
    with local_cluster(1, 3, "bsp", timeout=1.5) as cluster:
        started = time.monotonic()
        results = run_parallel(lambda r: _register_expecting_failure(cluster.worker_config(r)), range(2), timeout=30)
        elapsed = time.monotonic() - started
    assert elapsed < 8
    for err in results:
        assert err.code is ErrorCode.MISSING
        assert "1 of 3 workers (ranks 2)" in str(err)
    assert cluster.coordinator.error and "ranks 2" in cluster.coordinator.error


def test_worker_rank_out_of_range_is_refused() -> None:
    with local_cluster(1, 2, "bsp", timeout=1.0) as cluster:
        err = _register_expecting_failure(cluster.worker_config(rank=5))
    assert err.code is ErrorCode.CONFLICT
    assert "ranks 0-1" in str(err)


def _register_expecting_failure(config) -> RendezvousError:
    try:
        Client(config).close()
    except RendezvousError as exc:
        return exc
    raise AssertionError("registration should have failed")


def test_a_silent_worker_is_declared_dead_and_nobody_hangs() -> None:
    """Worker 1 stops sending heartbeats (as a hung or unreachable node does): the coordinator names it, and
    worker 0's pending BSP step fails with that reason instead of waiting for the full pull timeout."""
    with local_cluster(1, 2, "bsp", timeout=60, heartbeat_timeout=1.0) as cluster:
        clients = cluster.clients()
        try:
            tensors = {"w": torch.zeros(4)}
            clients[0].declare(tensors, ("SGD", [{"lr": 0.1}]))
            clients[1].declare({"w": torch.zeros(4)})
            clients[1].rendezvous._stop_heartbeats()  # silent from now on, its process still alive
            started = time.monotonic()
            with pytest.raises(ProtocolError) as info:
                clients[0].push_pull({"w": torch.ones(4)}, tensors, 0).result(timeout=30)
            assert time.monotonic() - started < 15
            assert info.value.code is ErrorCode.DEAD
            assert "worker:1" in str(info.value) and "heartbeats" in str(info.value)
            assert cluster.coordinator.error and "worker:1" in cluster.coordinator.error
        finally:
            close_all(clients)


def test_barrier_releases_everyone_and_names_who_is_missing() -> None:
    with local_cluster(1, 3, "bsp", timeout=1.0) as cluster:
        clients = cluster.clients()
        try:
            run_parallel(lambda c: c.rendezvous.barrier("all"), clients)  # returns for all three
            clients[2].close()  # a worker that is done no longer counts
            run_parallel(lambda c: c.rendezvous.barrier("two"), clients[:2])
            started = time.monotonic()
            with pytest.raises(RendezvousError) as info:
                clients[0].rendezvous.barrier("alone")  # worker 1 never comes
            assert time.monotonic() - started < 10
            assert "barrier 'alone'" in str(info.value) and "[1]" in str(info.value)
        finally:
            close_all(clients)


def test_a_failing_transport_fails_the_callers_instead_of_leaving_them_waiting(monkeypatch) -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        try:
            client.declare({"w": torch.zeros(4)}, ("SGD", [{"lr": 0.1}]))

            def broken(*args, **kwargs):
                raise OSError("simulated socket failure")

            # only the client's view of the transport breaks; the server in this process keeps working
            monkeypatch.setattr(
                "zps.worker._engine.transport", types.SimpleNamespace(**{**vars(transport), "send": broken})
            )
            with pytest.raises(RuntimeError, match="transport failed.*simulated socket failure"):
                client.pull({"w": torch.zeros(4)}, 0).result(timeout=10)
            with pytest.raises(RuntimeError, match="transport failed.*no new requests"):
                client.pull({"w": torch.zeros(4)}, 0)
        finally:
            client.close(failure="closed by the test")


def test_a_worker_that_fails_is_never_taken_for_one_that_left() -> None:
    """Worker 1 ends with an error (close with a failure: what an exception or a non-zero exit in the script leads
    to). BSP must not go on averaging worker 0 alone: worker 0's next step fails naming worker 1 and why."""
    with local_cluster(1, 2, "bsp") as cluster:
        clients = cluster.clients()
        try:
            models = [{"w": torch.zeros(4)} for _ in clients]
            clients[0].declare(models[0], ("SGD", [{"lr": 1.0}]))
            clients[1].declare(models[1])
            run_parallel(lambda c: c.push_pull({"w": torch.ones(4)}, models[c.rank], 0).result(timeout=30), clients)
            clients[1].close(failure="RuntimeError: CUDA out of memory")
            with pytest.raises(ProtocolError) as info:
                clients[0].push_pull({"w": torch.ones(4)}, models[0], 1).result(timeout=30)
            assert info.value.code is ErrorCode.DEAD
            assert "worker:1" in str(info.value) and "CUDA out of memory" in str(info.value)
            assert cluster.servers[0].shard.keys[0].version == 1  # step 1 was never applied with worker 0 alone
            assert cluster.coordinator.error and "worker:1" in cluster.coordinator.error
        finally:
            close_all(clients)


def test_declare_on_another_rank_returns_only_once_rank_0_set_the_values() -> None:
    """Rank 1 declares first (the README's low-level example races so): its declare waits for rank 0's values
    instead of returning at once, so its first push finds the keys initialised."""
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients()
        try:
            outcome: dict[str, object] = {}

            def rank1() -> None:
                try:
                    clients[1].declare({"w": torch.zeros(8)})
                    outcome["declared"] = True
                    clients[1].push({"w": torch.ones(8)}, 0).result(timeout=30)
                    outcome["pushed"] = True
                except Exception as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=rank1)
            thread.start()
            deadline = time.monotonic() + 30
            while not any(len(s.shard.pending) for s in cluster.servers) and thread.is_alive():
                assert time.monotonic() < deadline, "rank 1's declare never reached the servers"
                time.sleep(0.01)  # polling another thread's progress, bounded by the deadline
            assert not outcome, outcome  # rank 1 waits: its INIT is pending on the server of "w"
            clients[0].declare({"w": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
            thread.join(30)
            assert outcome == {"declared": True, "pushed": True}, outcome
        finally:
            close_all(clients)


def test_declare_without_rank_0_fails_after_the_timeout_naming_it() -> None:
    with local_cluster(1, 2, "bsp", timeout=1.5) as cluster:
        clients = cluster.clients()
        try:
            with pytest.raises(ProtocolError) as info:
                clients[1].declare({"w": torch.zeros(8)})
            assert info.value.code is ErrorCode.TIMEOUT
            assert "worker 0 has not sent the initial values" in str(info.value), info.value
        finally:
            close_all(clients)
