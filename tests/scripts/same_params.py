"""Exit 0 when two safetensors files hold the same tensors within a tolerance; else print the largest difference.

    python tests/scripts/same_params.py A.safetensors B.safetensors [--atol 1e-5]

(zps chaos --check uses it: the parameters after a run with failures against a failure-free run's.)
"""
import argparse
import sys

from safetensors.torch import load_file

parser = argparse.ArgumentParser()
parser.add_argument("a")
parser.add_argument("b")
parser.add_argument("--atol", type=float, default=1e-5)
args = parser.parse_args()
a, b = load_file(args.a), load_file(args.b)
if a.keys() != b.keys():
    sys.exit(f"different tensors: {sorted(a.keys() ^ b.keys())}")
worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
print(f"largest difference {worst[0]:.3g} ({worst[1]}); tolerance {args.atol:g}")
sys.exit(0 if worst[0] <= args.atol else 1)
