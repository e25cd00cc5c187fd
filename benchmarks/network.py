"""How faithful the ``--net`` emulator is: goodput against the rate set, round trips against the latency set.

    .venv/bin/python benchmarks/network.py [--reps 5] [--json out.json]

Through one emulated worker->server path (the relays ``zps run --net`` puts between a worker and a server), this
process sends 0.3 s worth of bytes at each rate to a sink and times the last byte's arrival (goodput), and
ping-pongs one byte 40 times at each latency (median round trip; the setting is out and back over the worker's and
the server's link: 4 x the per-link latency). The baseline is the setting itself; each figure is the median of
``--reps`` measurements. The targets (issue 13): goodput and round trip within 10% (round trip: or 0.2 ms).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from tests.test_network import goodput, round_trip  # noqa: E402

RATES = (("10mbit", 1.25e6), ("100mbit", 12.5e6), ("1gbit", 125e6))
LATENCIES_MS = (0.25, 0.5, 1.0, 2.0, 5.0)


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    started, load_before = time.monotonic(), C.load_avg()
    rows: list[list[str]] = []
    data: dict[str, dict[str, float]] = {"goodput": {}, "rtt": {}}
    for bw, rate in RATES:
        got = C.median(goodput(f"bw={bw}", int(rate * 0.3)) for _ in range(args.reps))
        data["goodput"][bw] = got
        rows.append([f"bw={bw}", f"{rate * 8 / 1e6:g} Mbit/s", f"{got * 8 / 1e6:.1f} Mbit/s", C.ratio(got, rate)])
    for ms in LATENCIES_MS:
        setting = 4 * ms / 1000
        got = C.median(round_trip(f"latency={ms}ms") for _ in range(args.reps))
        data["rtt"][f"{ms}ms"] = got
        rows.append([f"latency={ms}ms", f"{setting * 1e3:.2f} ms RTT", f"{got * 1e3:.3f} ms", C.ratio(got, setting)])
    table = C.md_table(["--net", "setting", f"measured (median of {args.reps})", "measured / setting"], rows)
    C.finish("network", table, data, args.json, started, load_before)


if __name__ == "__main__":
    main()
