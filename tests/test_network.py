"""The network emulator (``--net``): its links' arithmetic, and that what it delivers matches its settings:
goodput within 10% of the rate at 10 Mbit/s, 100 Mbit/s and 1 Gbit/s, round trips within 10% (or 0.2 ms) of the
latency set, and a zps job's bytes all crossing it (incast at a server's link included)."""
from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from zps.lab.network import Emulator, Queue
from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.simulation import Link, NetSpec, SpecError, parse_jitter, parse_kills, parse_stragglers

from .helpers import close_all, local_cluster, run_parallel


# -- specs and queues ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_spec_gives_each_role_its_link_with_overrides_by_kind_then_rank() -> None:
    spec = NetSpec.parse("bw=100mbit,latency=2ms,jitter=0.5ms;server=latency=5ms;worker:3=bw=10mbit")
    assert spec.link("worker", 0) == Link(rate=12.5e6, latency=0.002, jitter=0.0005)
    assert spec.link("server", 1) == Link(rate=12.5e6, latency=0.005, jitter=0.0005)
    assert spec.link("worker", 3) == Link(rate=1.25e6, latency=0.002, jitter=0.0005)
    assert NetSpec.parse("").link("worker", 0) == Link()


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["bw=fast", "bw=-1mbit", "speed=1mbit", "bw=1mbit;ps:0=bw=1mbit", "latency"])
def test_a_bad_net_spec_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(SpecError):
        NetSpec.parse(bad)
    with pytest.raises(ConfigError, match=r"ZPS_NET \(--net\)"):
        JobConfig(num_workers=1, net=bad)


@pytest.mark.unit
def test_straggler_jitter_and_kill_specs() -> None:
    assert parse_stragglers("1:2,3:1.5") == {1: 2.0, 3: 1.5}
    assert parse_jitter("0.1:0.05") == (0.1, 0.05) and parse_jitter("0.5:20ms") == (0.5, 0.02)
    assert parse_kills("worker:1@50,server:0@80") == {("worker", 1): 50, ("server", 0): 80}
    for parse, bad in ((parse_stragglers, "1:0.5"), (parse_stragglers, "x:2"), (parse_jitter, "2:1"),
                       (parse_kills, "ps:0@3"), (parse_kills, "worker:1")):
        with pytest.raises(SpecError):
            parse(bad)


@pytest.mark.unit
def test_a_queue_sends_bytes_at_its_rate_in_order_and_shares_it() -> None:
    q = Queue(1000.0)  # bytes per second
    assert q.reserve(500, 10.0) == 10.5
    assert q.reserve(500, 10.0) == 11.0  # queued behind the first
    assert q.reserve(100, 20.0) == 20.1  # an idle link starts when the bytes are ready
    assert Queue(None).reserve(10**9, 3.0) == 3.0


# -- what crosses a relay ---------------------------------------------------------------------------------
@contextlib.contextmanager
def served(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on loopback running ``handler`` on its one connection; its tcp:// address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handler(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(timeout=10)


def connect(address: str) -> socket.socket:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo(conn: socket.socket) -> None:
    while data := conn.recv(64):
        conn.sendall(data)


def round_trip(spec: str, count: int = 40) -> float:
    with Emulator(spec) as net, served(echo) as address, connect(net.relay(0, 0, address)) as sock:
        times = []
        for _ in range(count):
            began = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            times.append(time.perf_counter() - began)
    return statistics.median(times[count // 4:])


def goodput(spec: str, size: int) -> float:
    arrived: list[float] = []

    def drain(conn: socket.socket) -> None:
        got = 0
        while got < size and (data := conn.recv(1 << 20)):
            got += len(data)
        arrived.append(time.perf_counter())
        assert got == size

    with Emulator(spec) as net, served(drain) as address:
        with connect(net.relay(0, 0, address)) as sock:
            began = time.perf_counter()
            sock.sendall(bytes(size))
            for _ in range(3000):  # bounded: the drain ends by itself once every byte came
                if arrived:
                    break
                time.sleep(0.01)
    assert arrived, "the bytes did not arrive"
    return size / (arrived[0] - began)


def within(measured: Callable[[], float], check: Callable[[float], bool], tries: int = 3) -> list[float]:
    """Up to ``tries`` measurements until one passes ``check`` (a loaded CI machine may starve one of CPU)."""
    seen = []
    for _ in range(tries):
        seen.append(measured())
        if check(seen[-1]):
            break
    return seen


@pytest.mark.cluster
@pytest.mark.parametrize("latency_ms", [2.0,
                                        # a 2 ms round trip is within 0.2 ms on a quiet host (benchmarks/network.py)
                                        # but not beside another test's processes on CI's 2 cores
                                        pytest.param(0.5, marks=pytest.mark.slow)])
def test_round_trips_take_the_latency_set_within_10_percent_or_0_2_ms(latency_ms: float) -> None:
    setting = 2 * (latency_ms + latency_ms) / 1000  # out and back, each over the worker's and the server's link
    seen = within(lambda: round_trip(f"latency={latency_ms}ms"),
                  lambda rtt: abs(rtt - setting) <= max(0.1 * setting, 0.2e-3))
    assert abs(seen[-1] - setting) <= max(0.1 * setting, 0.2e-3), (setting, seen)


@pytest.mark.cluster
@pytest.mark.parametrize("bw,rate", [("10mbit", 1.25e6), ("100mbit", 12.5e6),
                                     # 1 Gbit/s keeps a relay thread busy: beside another test's processes on
                                     # CI's 2 cores it gets 0.85x (benchmarks/network.py measures it alone)
                                     pytest.param("1gbit", 125e6, marks=pytest.mark.slow)])
def test_goodput_is_the_bandwidth_set_within_10_percent(bw: str, rate: float) -> None:
    seen = within(lambda: goodput(f"bw={bw}", int(rate * 0.3)), lambda g: abs(g - rate) <= 0.1 * rate)
    assert abs(seen[-1] - rate) <= 0.1 * rate, (rate, seen)


@pytest.mark.cluster
def test_a_job_under_net_moves_every_byte_through_the_links_and_shares_the_servers_link() -> None:
    numel = 1 << 18  # 1 MiB of float32 per worker each way
    with local_cluster(1, 2, "bsp", net="bw=100mbit") as cluster:
        clients = cluster.clients()
        try:
            start = torch.arange(numel, dtype=torch.float32)
            run_parallel(lambda c: c.declare({"w": start.clone()}, ("SGD", [{"lr": 0.5}]) if c.rank == 0 else None),
                         clients)
            assert not any(c.use_shm for c in clients)
            assert all(address != cluster.coordinator.members[("server", 0)].address
                       for c in clients for address in c.topology.servers)  # each worker reaches it via a relay
            grads = [torch.full((numel,), float(r + 1)) for r in range(2)]
            outs = [torch.empty(numel) for _ in range(2)]
            began = time.perf_counter()
            run_parallel(lambda c: c.push_pull({"w": grads[c.rank]}, {"w": outs[c.rank]}, step=0).result(timeout=60),
                         clients)
            took = time.perf_counter() - began
        finally:
            close_all(clients)
    expected = start - 0.5 * (grads[0] + grads[1]) / 2
    assert all(torch.equal(out, expected) for out in outs)
    # both pushes cross the server's one link (2 MiB), then both pulls (2 MiB): at 12.5 MB/s, at least this long
    assert took >= 0.95 * 4 * 4 * numel / 12.5e6, took


@pytest.mark.cluster
def test_embedding_table_rows_cross_the_links_and_are_paced_by_them() -> None:
    """ROWS_PULL and ROWS_PUSH go through the relays like any worker-server bytes: the server's link queues count
    (deterministically) every row each way, and the steps take at least those bytes over its rate."""
    from zps.worker import EmbeddingTable

    rate, n, dim, steps = 2.5e6, 1000, 128, 3  # 20 Mbit/s; per worker and step 0.5 MB of rows each way
    with local_cluster(1, 2, "bsp", net="bw=20mbit") as cluster:
        assert cluster.network is not None
        clients = cluster.clients()
        try:
            tables = run_parallel(lambda c: EmbeddingTable("rows", dim, optimizer="sgd:lr=0.5", client=c), clients)
            assert all(address != cluster.coordinator.members[("server", 0)].address
                       for c in clients for address in c.topology.servers)  # each worker reaches it via a relay
            before = {d: cluster.network.moved("server", 0, d) for d in ("up", "down")}
            mine = [torch.arange(n) + 7 * n * r for r in range(2)]  # distinct ids, none shared by the workers

            def train(r: int) -> None:
                for _ in range(steps):
                    tables[r].lookup(mine[r]).sum().backward()
                tables[r].synchronize()

            began = time.perf_counter()
            run_parallel(train, range(2))
            took = time.perf_counter() - began
            moved = {d: cluster.network.moved("server", 0, d) - before[d] for d in ("up", "down")}
            pushed_by = [cluster.network.moved("worker", r, "up") for r in range(2)]
            counters = [t.counters for t in tables]
        finally:
            close_all(clients)
    rows = 2 * steps * n * 4 * dim  # float32 rows of both workers' steps: pulled (server up), pushed (server down)
    ids = 2 * steps * n * 8  # int64 ids: in every pull and every push (server down)
    assert [c["rows_pulled"] for c in counters] == [steps * n] * 2 and [c["rows_pushed"] for c in counters] == \
        [steps * n] * 2
    # every row crossed the server's link (and no other bytes of size: headers and ZeroMQ's framing only)
    assert rows <= moved["up"] <= rows + (64 << 10), moved
    assert rows + 2 * ids <= moved["down"] <= rows + 2 * ids + (64 << 10), moved
    assert all(steps * n * (4 * dim + 16) <= p for p in pushed_by), pushed_by  # each worker's own uplink too
    # paced: a queue lets its bytes out at its rate, so the steps took at least its bytes' time
    assert took >= 0.95 * max(moved.values()) / rate, (took, moved)
