"""Linear-layer paths on CPU at decode-sized row counts, over the default model's weight shapes.

For 1-64 activation rows, times one pass over all 121 weight matrices of SmolLM2-135M (30
layers × qkv/o/gate_up/down, plus the LM head; random weights of the same shapes) with:
- ``F.linear`` (MKL; what HF transformers uses),
- oneDNN with weights prepacked once (``tandem.models.layers.linear``'s path above 2 rows),
- Tandem's C GEMV kernel (``tandem.kernels``, used for 1-2 rows).
Prints ms per pass and the weight-streaming rate, and each path's ratio to ``F.linear``.

Usage: python benchmarks/cpu_linear_paths.py [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tandem.kernels import cpu_kernels

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def median_seconds(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,2,4,16,64")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    weights = [torch.randn(o, i, dtype=dtype) for _ in range(30) for o, i in SHAPES] + [
        torch.randn(*LM_HEAD, dtype=dtype)
    ]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
    gemvs = [cpu_kernels.Gemv(w, None) for w in weights] if cpu_kernels.load() else None
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{len(weights)} matrices, {total_bytes / 1e6:.0f} MB, {args.dtype}, {torch.get_num_threads()} threads")
    for rows in map(int, args.rows.split(",")):
        xs = {i: torch.randn(rows, i, dtype=dtype) for i in (576, 1536)}
        paths = {
            "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
            "oneDNN packed": lambda: [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                for w, p in zip(weights, packed)
            ],
        }
        if gemvs is not None:
            paths["C GEMV"] = lambda: [g(xs[g.in_features]) for g in gemvs]
        base = None
        for name, fn in paths.items():
            seconds = median_seconds(fn)
            base = base or seconds
            print(
                f"rows {rows:3d}  {name:14s} {seconds * 1e3:7.1f} ms  {total_bytes / seconds / 1e9:5.1f} GB/s  "
                f"{base / seconds:4.2f}x vs F.linear"
            )


if __name__ == "__main__":
    main()
