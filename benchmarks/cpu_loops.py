"""The AVX2 copy of the CPU loops against the SSE2 baseline copy, side by side in one process.

    python benchmarks/cpu_loops.py [--sizes 64 128 full] [--threads 2] [--repeats 9]

The default build holds both copies of every flattened CPU loop and runs the AVX2 one where the CPU has it
(csrc/cpu/isa.h); DEEPATLAS_CPU_BASELINE=1 selects the baseline at run time. Each case alternates the two (the order
flipping every repeat) on the same inputs: the benchmark's smooth displacement (cases.py), C = 1, batch 1. Prints a
markdown table of medians and their ratio; the last row of each size is a control (an op without an AVX2 copy). Both
copies give bit-identical results (tests/test_all_ops.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import cases
import deepatlas_cuda as da


def case_functions(shape) -> dict:
    image = cases.smooth_image(shape, 1)
    ddf = cases.smooth_ddf(shape)
    grid = cases.ddf_to_normalised_grid(ddf)
    labels = (image * 8).clamp(0, 7).to(torch.uint8)  # 8 classes, following the image's smooth structure

    def fwd_bwd(op, x, coords, grad_x):
        x = x.detach().requires_grad_(grad_x)
        coords = coords.detach().requires_grad_()
        op(x, coords).sum().backward()

    return {
        "warp forward": lambda: da.warp(image, ddf),
        "warp fwd+bwd, grad ddf": lambda: fwd_bwd(da.warp, image, ddf, False),
        "warp fwd+bwd, grad image + ddf": lambda: fwd_bwd(da.warp, image, ddf, True),
        "grid_sample fwd+bwd, grad input + grid": lambda: fwd_bwd(da.grid_sample, image, grid, True),
        "warp_labels nearest": lambda: da.warp_labels(labels, ddf),
        # No AVX2 copy (it measured 2-3% slower): both columns run the same code, the noise of the comparison.
        "control: warp_labels soft (K = 8) fwd+bwd": lambda: fwd_bwd(
            lambda x, u: da.warp_labels(labels, u, "soft", num_classes=8), image, ddf, False),
    }


def time_case(run, repeats: int) -> dict[str, float]:
    times = {"avx2": [], "baseline": []}
    for copy in times:  # warm-up
        os.environ["DEEPATLAS_CPU_BASELINE"] = "1" if copy == "baseline" else "0"
        run()
    for repeat in range(repeats):
        for copy in (("avx2", "baseline") if repeat % 2 == 0 else ("baseline", "avx2")):
            os.environ["DEEPATLAS_CPU_BASELINE"] = "1" if copy == "baseline" else "0"
            start = time.perf_counter()
            run()
            times[copy].append(time.perf_counter() - start)
    os.environ.pop("DEEPATLAS_CPU_BASELINE")
    return {copy: statistics.median(values) * 1e3 for copy, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["64", "128"], choices=list(cases.SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if da.build_info()["cpu_loops"] != "avx2":
        raise SystemExit("this build or CPU has no AVX2 copy of the loops (build_info()['cpu_loops'] is "
                         "'baseline'): nothing to compare")
    print(f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| case | size | baseline (ms) | AVX2 (ms) | speed-up |\n|---|---|---:|---:|---:|")
    for size in args.sizes:
        shape = cases.size_shape(size)
        for name, run in case_functions(shape).items():
            t = time_case(run, args.repeats)
            print(f"| {name} | {'x'.join(map(str, shape))} | {t['baseline']:.1f} | {t['avx2']:.1f} | "
                  f"{t['baseline'] / t['avx2']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
