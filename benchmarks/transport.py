"""Push+pull round-trip goodput of one tensor: zps beside raw pyzmq and a plain TCP socket, same run, loopback.

Every contender does the same round trip between two processes: send N bytes, receive N bytes back. Goodput is
(bytes sent + bytes received) / median round-trip time.

- tcp: ``sendall`` of N bytes, the peer ``recv_into`` a preallocated buffer and ``sendall`` s it back; the client
  ``recv_into`` its own preallocated buffer.
- pyzmq: DEALER -> ROUTER echo of one N-byte frame, zero-copy on both sides (``copy=False``).
- pyzmq + work: what zps must do beyond moving bytes, written with bare pyzmq and torch: N bytes as messages of
  4 MiB, all in flight; the peer adds each part into its own float32 tensor (SGD's update with lr=0) and sends that
  tensor back zero-copy; the client receives each reply into its destination tensor (``recv_into``). It is the
  ceiling for any parameter server built on pyzmq here, so "zps / pyzmq + work" is zps's own overhead.
- zps: 1 worker + 1 server, BSP, ``push_pull`` of one float32 tensor per iteration (cut into 4 MiB chunks by the
  plan), server optimizer SGD with lr=0 (the update is computed, the values stay put); over ZeroMQ/TCP
  (``ZPS_SHM=0``), and, as a separate column, through zps's same-host shared-memory path (``ZPS_SHM=1``).

    python benchmarks/transport.py [--quick] [--sizes-mib 1 16 64] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

MIB = 1 << 20
FULL_SIZES = [1, 4, 16, 64, 256]
QUICK_SIZES = [1, 16, 64]
CHUNK = 4 * MIB  # zps's default chunk size (protocol.plan.DEFAULT_CHUNK_BYTES)


def repeats_for(mib: int, repeats: int) -> int:
    """Fewer repeats for the largest tensors keeps a full run within minutes."""
    return max(5, repeats if mib <= 64 else repeats // 2)


# -- helper processes (the echo peers) -------------------------------------------------------------------------
def tcp_echo_server(max_bytes: int) -> None:
    buf = bytearray(max_bytes)
    view = memoryview(buf)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                header = _recv_exact(conn, memoryview(bytearray(8)))
                if header is None:
                    return
                (n,) = struct.unpack("!Q", header)
                if n == 0:
                    return
                if _recv_exact(conn, view[:n]) is None:
                    return
                conn.sendall(view[:n])


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview | None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return view


def zmq_echo_server() -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    C.echo_until_empty(sock)


def zmq_work_server() -> None:
    """The peer of "pyzmq + work": keeps one float32 tensor per part, adds each received part into it, "
    "replies with it."""
    import numpy as np
    import torch
    import zmq

    torch.set_num_threads(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    params: dict[tuple[int, int], torch.Tensor] = {}
    while True:
        identity, index, data = sock.recv_multipart(copy=False)
        if len(data) == 0:
            break
        grad = torch.from_numpy(np.frombuffer(data.buffer, dtype=np.float32))
        param = params.setdefault((len(data), int(index.bytes)), torch.zeros(grad.numel()))
        param.add_(grad, alpha=-0.0)
        sock.send_multipart([identity, index, param.numpy().data], copy=False)
    sock.close()
    ctx.term()


# -- the client side of the baselines ---------------------------------------------------------------------------
def bench_tcp(sizes: list[int], repeats: int) -> dict[int, list[float]]:
    max_bytes = max(sizes) * MIB
    out: dict[int, list[float]] = {}
    with C.Helper([sys.executable, __file__, "--role-tcp-echo", str(max_bytes)]) as helper:
        port = int(helper.ready_line)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send = memoryview(bytearray(b"\x01" * max_bytes))
            recv = memoryview(bytearray(max_bytes))
            for mib in sizes:
                n = mib * MIB

                def round_trip(n: int = n) -> None:
                    conn.sendall(struct.pack("!Q", n))
                    conn.sendall(send[:n])
                    if _recv_exact(conn, recv[:n]) is None:
                        raise RuntimeError("tcp echo peer closed the connection")

                out[mib] = C.time_calls(round_trip, repeats_for(mib, repeats), warmup=2)
            conn.sendall(struct.pack("!Q", 0))
    return out


def bench_zmq(sizes: list[int], repeats: int, frame_bytes: int | None = None) -> dict[int, list[float]]:
    """One N-byte frame per message, or (``frame_bytes``) N bytes as a multipart message of frames that size."""
    import zmq

    out: dict[int, list[float]] = {}
    with C.zmq_peer([sys.executable, __file__, "--role-zmq-echo"], zmq.DEALER) as sock:
        payload = memoryview(bytearray(b"\x01" * (max(sizes) * MIB)))
        for mib in sizes:
            data = payload[: mib * MIB]
            step = frame_bytes or len(data)
            parts = [data[i : i + step] for i in range(0, len(data), step)]

            def round_trip(parts: list[memoryview] = parts) -> None:
                sock.send_multipart(parts, copy=False)
                sock.recv_multipart(copy=False)

            out[mib] = C.time_calls(round_trip, repeats_for(mib, repeats), warmup=2)
        sock.send(b"")
        time.sleep(0.1)
    return out


def bench_zmq_work(sizes: list[int], repeats: int) -> dict[int, list[float]]:
    """N bytes as 4 MiB messages, all in flight; the peer applies each; replies land in the destination."""
    import torch
    import zmq

    torch.set_num_threads(1)
    out: dict[int, list[float]] = {}
    with C.zmq_peer([sys.executable, __file__, "--role-zmq-work"], zmq.DEALER) as sock:
        for mib in sizes:
            grad = torch.full((mib * MIB // 4,), 0.5)
            dest = torch.zeros_like(grad)
            parts = [memoryview(p.numpy()) for p in grad.split(CHUNK // 4)]
            targets = [memoryview(p.numpy()).cast("B") for p in dest.split(CHUNK // 4)]
            indexes = [str(i).encode() for i in range(len(parts))]

            def round_trip(
                parts: list[memoryview] = parts, targets: list[memoryview] = targets, indexes: list[bytes] = indexes
            ) -> None:
                for index, part in zip(indexes, parts, strict=False):
                    sock.send_multipart([index, part], copy=False)
                for _ in parts:
                    sock.recv_into(targets[int(sock.recv())])

            out[mib] = C.time_calls(round_trip, repeats_for(mib, repeats), warmup=2)
        sock.send_multipart([b"0", b""])
        time.sleep(0.1)
    return out


# -- zps ------------------------------------------------------------------------------------------------------
def zps_worker(sizes: list[int], repeats: int) -> None:
    """Runs inside ``zps run``: one tensor per size, declared together; ``push_pull`` of one tensor at a time."""
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    values = {f"t{mib}": torch.zeros(mib * MIB // 4) for mib in sizes}
    client.declare(values, ("SGD", [{"lr": 0.0}]) if client.rank == 0 else None)
    times: dict[str, list[float]] = {}
    for mib in sizes:
        name = f"t{mib}"
        grad = torch.full_like(values[name], 0.5)
        step = 0

        def round_trip(name: str = name, grad: torch.Tensor = grad) -> None:
            nonlocal step
            client.push_pull({name: grad}, {name: values[name]}, step).result()
            step += 1

        times[str(mib)] = C.time_calls(round_trip, repeats_for(mib, repeats), warmup=2)
    if client.rank == 0:
        C.emit_result({"times": times})
    worker.shutdown()


def bench_zps(sizes: list[int], repeats: int, env: dict[str, str] | None = None) -> dict[int, list[float]]:
    args = ["--role-worker", "--sizes-mib", *map(str, sizes), "--repeats", str(repeats)]
    result = C.run_zps(__file__, args, servers=1, workers=1, mode="bsp", env=env, timeout=900)
    return {int(k): v for k, v in result["times"].items()}


# -- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="round trips timed per size (median reported)")
    parser.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the zps jobs only, e.g. MALLOC_TRIM_THRESHOLD_=2147483647 (diagnosis)",
    )
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)  # inside zps run
    parser.add_argument("--role-tcp-echo", type=int, default=None, help=argparse.SUPPRESS)  # the tcp peer
    parser.add_argument("--role-zmq-echo", action="store_true", help=argparse.SUPPRESS)  # the pyzmq peer
    parser.add_argument("--role-zmq-work", action="store_true", help=argparse.SUPPRESS)  # the pyzmq + work peer
    args = parser.parse_args(argv)
    if args.role_tcp_echo is not None:
        tcp_echo_server(args.role_tcp_echo)
        return {}
    if args.role_zmq_echo:
        zmq_echo_server()
        return {}
    if args.role_zmq_work:
        zmq_work_server()
        return {}
    sizes = args.sizes_mib or (QUICK_SIZES if args.quick else FULL_SIZES)
    repeats = args.repeats or (7 if args.quick else 25)
    if args.role_worker:
        zps_worker(sizes, repeats)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    results: dict[str, dict[int, list[float]]] = {}
    loads: dict[str, str] = {}
    shm_env, no_shm_env, shm_note = C.shm_option()
    extra_env = dict(item.split("=", 1) for item in args.env)
    no_shm_env = {**no_shm_env, **extra_env}
    shm_env = {**shm_env, **extra_env} if shm_env is not None else None
    contenders = [
        ("tcp", lambda: bench_tcp(sizes, repeats)),
        ("pyzmq", lambda: bench_zmq(sizes, repeats)),
        ("pyzmq-4MiB", lambda: bench_zmq(sizes, repeats, CHUNK)),
        ("pyzmq+work", lambda: bench_zmq_work(sizes, repeats)),
        ("zps", lambda: bench_zps(sizes, repeats, no_shm_env)),
    ]
    if shm_env is not None:
        contenders.append(("zps-shm", lambda: bench_zps(sizes, repeats, shm_env)))
    for name, fn in contenders:
        loads[name] = C.load_avg()
        print(f"measuring {name} (load {loads[name]}) ...", flush=True)
        results[name] = fn()

    def gbps(name: str, mib: int) -> float | None:
        times = results.get(name, {}).get(mib)
        return 2 * mib * MIB / C.median(times) / 1e9 if times else None

    headers = ["size", "tcp GB/s", "pyzmq GB/s", "pyzmq 4 MiB frames GB/s", "pyzmq + work GB/s", "zps GB/s"]
    if "zps-shm" in results:
        headers.append("zps-shm GB/s")
    headers += ["zps / best pyzmq", "zps / pyzmq + work", "zps / tcp", "pyzmq / tcp", "zps ms / round trip"]
    rows = []
    summary = {}
    for mib in sizes:
        t, z, z4, p = gbps("tcp", mib), gbps("pyzmq", mib), gbps("pyzmq-4MiB", mib), gbps("zps", mib)
        w = gbps("pyzmq+work", mib)
        best = max(x for x in (z, z4) if x is not None) if (z or z4) else None
        row = [f"{mib} MiB", C.fmt(t), C.fmt(z), C.fmt(z4), C.fmt(w), C.fmt(p)]
        if "zps-shm" in results:
            row.append(C.fmt(gbps("zps-shm", mib)))
        row += [
            C.ratio(p, best),
            C.ratio(p, w),
            C.ratio(p, t),
            C.ratio(z, t),
            C.fmt(C.median(results["zps"][mib]) * 1e3, 1),
        ]
        rows.append(row)
        summary[mib] = {
            "tcp_gbps": t,
            "pyzmq_gbps": z,
            "pyzmq_4mib_gbps": z4,
            "zps_gbps": p,
            "zps_shm_gbps": gbps("zps-shm", mib),
            "zps_over_best_pyzmq": p / best if p and best else None,
            "pyzmq_work_gbps": w,
            "zps_over_pyzmq_work": p / w if p and w else None,
            "zps_over_pyzmq": p / z if p and z else None,
            "zps_over_tcp": p / t if p and t else None,
        }
    big = [float(r) for m in sizes if m >= 16 and (r := summary[m]["zps_over_best_pyzmq"])]
    verdict = (
        f"target zps >= 0.90x raw pyzmq at >= 16 MiB (against the better of the two pyzmq columns): "
        f"{'met' if big and min(big) >= 0.9 else 'MISSED'} (lowest {min(big):.2f}x)"
        if big
        else "no size >= 16 MiB measured"
    )
    work = [float(r) for m in sizes if m >= 16 and (r := summary[m]["zps_over_pyzmq_work"])]
    if work:
        verdict += f"; against pyzmq doing the same work (apply + copy into the destination): lowest {min(work):.2f}x"
    shm_big = [
        (summary[m]["zps_shm_gbps"] or 0) / max(summary[m]["pyzmq_gbps"] or 0, summary[m]["pyzmq_4mib_gbps"] or 0)
        for m in sizes
        if m >= 16 and summary[m]["zps_shm_gbps"]
    ]
    if shm_big:
        verdict += f"; zps-shm against the same: lowest {min(shm_big):.2f}x at >= 16 MiB"
    md = "\n".join(
        [
            "### transport: push+pull round-trip goodput, 1 worker + 1 server, loopback",
            "",
            f"Goodput = (bytes sent + bytes received) / median round trip; {repeats} round trips per size "
            f"(half of that above 64 MiB, at least 5) after 2 warm-up ones. zps: BSP, SGD lr=0, 4 MiB chunks. "
            "pyzmq: one frame of N bytes; pyzmq 4 MiB frames: the same N bytes as one multipart message of 4 "
            "MiB frames "
            "(zps's chunk size), both zero-copy; pyzmq + work: 4 MiB messages all in flight, the peer adds "
            "each into its "
            "own tensor and replies with it, the client receives into its destination (what zps must do). "
            "Above 32 MiB glibc serves every fresh receive buffer with a new mmap, so "
            "raw pyzmq's single-frame goodput there is dominated by page faults and varies a lot from run to run.",
            "",
            C.md_table(headers, rows),
            "",
            f"- {verdict}",
            f"- {shm_note}; the plain zps row runs with it off (ZeroMQ over loopback TCP)"
            if shm_env
            else f"- {shm_note}",
            "- load average at the start of each contender: " + "; ".join(f"{k} {v}" for k, v in loads.items()),
            *([f"- extra environment of the zps jobs: {' '.join(args.env)}"] if args.env else []),
        ]
    )
    return C.finish(
        "transport",
        md,
        {
            "sizes_mib": sizes,
            "repeats": repeats,
            "times": {k: {str(m): v for m, v in r.items()} for k, r in results.items()},
            "summary": {str(k): v for k, v in summary.items()},
            "loads": loads,
            "shm": shm_note,
        },
        args.json,
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
