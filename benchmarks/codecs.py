"""Codec throughput and wire size, beside a plain memory copy measured in the same run.

For each codec: encode and decode speed (float32 input bytes / median time), the bytes that cross the wire
(buffers plus the msgpack-serialised meta), the size ratio against ``none``, and each speed as a fraction of
``Tensor.copy_`` of the same tensor into a preallocated one. Then top-k selection three ways on the same
tensor: ``torch.topk``, this library's sampled-threshold top-k, and a full sort.

    python benchmarks/codecs.py --numel 25000000 --repeats 3 [--codecs none topk:ratio=0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from zps.protocol.codecs import available_codecs, make_codec  # noqa: E402
from zps.protocol.codecs.sparse import topk_indices  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_codec(spec: str, x: torch.Tensor, repeats: int) -> dict:
    codec, decoder = make_codec(spec), make_codec(spec)
    encoded = codec.encode(x)
    t_enc = median_time(lambda: codec.encode(x), repeats, x.device)
    t_dec = median_time(lambda: decoder.decode(encoded, x.numel(), x.dtype, x.device), repeats, x.device)
    y = decoder.decode(encoded, x.numel(), x.dtype, x.device)
    meta_bytes = len(msgpack.packb(encoded.meta))
    return {
        "codec": spec,
        "encode_s": t_enc,
        "decode_s": t_dec,
        "wire_bytes": encoded.nbytes + meta_bytes,
        "meta_bytes": meta_bytes,
        "rel_error": ((y.float() - x).norm() / x.norm()).item(),
    }


def bench_topk(x: torch.Tensor, ratio: float, repeats: int) -> dict:
    magnitude = x.abs()
    k = max(1, int(ratio * x.numel()))
    gen = torch.Generator(device=x.device).manual_seed(0)
    codec = make_codec(f"topk:ratio={ratio}")
    return {
        "k": k,
        "torch.topk_s": median_time(lambda: torch.topk(magnitude, k, sorted=False), repeats, x.device),
        "sampled_topk_s": median_time(lambda: topk_indices(magnitude, k, gen), repeats, x.device),
        "topk_encode_s": median_time(lambda: codec.encode(x), repeats, x.device),
        "full_sort_s": median_time(lambda: torch.sort(magnitude), repeats, x.device),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codecs", nargs="+", default=None, help="codec specs (default: every registered codec)")
    parser.add_argument("--topk-ratio", type=float, default=0.01)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=device)
    gb = x.numel() * x.element_size() / 1e9
    target = torch.empty_like(x)
    t_copy = median_time(lambda: target.copy_(x), args.repeats, device)
    copy_gbps = gb / t_copy

    specs = args.codecs or available_codecs()
    if "none" not in specs:
        specs = ["none", *specs]
    rows = [bench_codec(spec, x, args.repeats) for spec in specs]
    none_bytes = next(r["wire_bytes"] for r in rows if r["codec"] == "none")
    for r in rows:
        r["encode_gbps"], r["decode_gbps"] = gb / r["encode_s"], gb / r["decode_s"]
        r["encode_vs_copy"], r["decode_vs_copy"] = r["encode_gbps"] / copy_gbps, r["decode_gbps"] / copy_gbps
        r["size_vs_none"] = r["wire_bytes"] / none_bytes

    print(
        f"{args.numel:,} float32 elements ({gb * 1e3:.0f} MB) on {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}; copy_: {t_copy * 1e3:.1f} ms = {copy_gbps:.2f} GB/s\n"
    )
    print("| codec | encode GB/s | x copy | decode GB/s | x copy | wire bytes | vs none | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['codec']} | {r['encode_gbps']:.2f} | {r['encode_vs_copy']:.3f} | {r['decode_gbps']:.2f} | "
            f"{r['decode_vs_copy']:.3f} | {r['wire_bytes']:,} | {r['size_vs_none']:.4f} | {r['rel_error']:.3f} |"
        )

    print(
        "\n`none` encodes a contiguous tensor without copying it (the buffer is a view), so its encode is free; "
        "decoders allocate their output, which `copy_` into a preallocated tensor does not."
    )

    topk = bench_topk(x, args.topk_ratio, args.repeats)
    sort_s = topk["full_sort_s"]
    print(f"\ntop-k selection of k = {topk['k']:,} from |x| (ratio {args.topk_ratio}):\n")
    print("| method | ms | vs full sort |")
    print("|---|---:|---:|")
    for label, key in (
        ("full sort (torch.sort)", "full_sort_s"),
        ("torch.topk", "torch.topk_s"),
        ("sampled-threshold top-k (exact)", "sampled_topk_s"),
        ("topk codec encode (abs + select + gather)", "topk_encode_s"),
    ):
        print(f"| {label} | {topk[key] * 1e3:.1f} | {topk[key] / sort_s:.3f} |")

    result = {
        "numel": args.numel,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "copy_s": t_copy,
        "copy_gbps": copy_gbps,
        "codecs": rows,
        "topk": topk,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
