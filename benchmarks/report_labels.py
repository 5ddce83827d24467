"""Side-by-side report for the label, Dice and Jacobian ops against the plain-PyTorch way (deepatlas_cuda.reference).

    python benchmarks/report_labels.py [--sizes 128 full] [--cases ...] [--threads 2] [--repeats 3] [--no-peak]
                                       [--out FILE]

Cases (batch 1, smooth displacement from cases.py, random integer labels):
  soft K      warp_labels(mode='soft')    vs one-hot + F.grid_sample            forward, and fwd+bwd (grad ddf)
  dice K      warped_dice (label target)  vs one-hot + F.grid_sample + soft Dice fwd+bwd (grad ddf)
  pdice K     warped_dice (probability source, label target) vs F.grid_sample + soft Dice, fwd+bwd (grad ddf and
              grad source): the fused op never builds the warped K-channel volume
  nearest     warp_labels (uint8)         vs F.grid_sample(nearest) on float-cast labels, forward
  jacobian    jacobian_det                vs plain finite differences + torch.linalg.det, fwd+bwd
Peak memory: the increase of peak RSS over the inputs for one step, in a fresh process (memory.py's method).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import deepatlas_cuda as da  # noqa: E402
from deepatlas_cuda import reference  # noqa: E402

import cases  # noqa: E402
import memory  # noqa: E402
from report import cpu_model, fmt_ms  # noqa: E402

CASES = ["soft4-fwd", "soft4-fwdbwd", "soft32-fwd", "soft32-fwdbwd", "dice4-fwdbwd", "dice32-fwdbwd",
         "pdice32-fwdbwd", "nearest-fwd", "jacobian-fwdbwd"]


def make_inputs(case: str, shape) -> dict:
    classes = 32 if "32" in case else 4
    generator = torch.Generator().manual_seed(cases.SEED)
    labels = torch.randint(0, classes, (1, 1, *shape), generator=generator)
    target = torch.randint(0, classes, (1, 1, *shape), generator=generator)
    if case.startswith("nearest"):
        labels = labels.to(torch.uint8)
    inputs = {"labels": labels, "target": target, "ddf": cases.smooth_ddf(shape), "classes": classes}
    if case.startswith("pdice"):  # a softmax-like probability source in place of the labels
        inputs["labels"] = torch.randn(1, classes, *shape, generator=generator).softmax(1)
    return inputs


def make_step(case: str, impl: str, inputs: dict):
    labels, target, ddf, classes = inputs["labels"], inputs["target"], inputs["ddf"], inputs["classes"]
    backward = case.endswith("fwdbwd")
    ours = impl == "ours"

    def step():
        u = ddf.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            if case.startswith("pdice"):
                p = labels.detach().requires_grad_(backward)
                out = 1 - (da.warped_dice(p, u, target) if ours
                           else reference.warped_probability_dice(p, u, target)).mean()
            elif case.startswith("soft"):
                out = (da.warp_labels(labels, u, "soft", num_classes=classes) if ours
                       else reference.warp_labels_soft(labels, u, classes))
            elif case.startswith("dice"):
                out = 1 - (da.warped_dice(labels, u, target, num_classes=classes) if ours
                           else reference.warped_dice(labels, u, target, classes)).mean()
            elif case.startswith("nearest"):
                out = da.warp_labels(labels, u) if ours else reference.warp_labels_nearest(labels, u)
            else:
                out = da.jacobian_det(u) if ours else reference.jacobian_det(u)
            if backward:
                out.sum().backward()

    return step


def time_pair(case: str, inputs: dict, repeats: int) -> dict:
    steps = {impl: make_step(case, impl, inputs) for impl in ("ours", "torch")}
    for step in steps.values():
        step()
    times = {"ours": [], "torch": []}
    for i in range(repeats):
        for impl in (("ours", "torch") if i % 2 == 0 else ("torch", "ours")):
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(values) for impl, values in times.items()}


def peak_in_child(case: str, impl: str, size: str, threads: int) -> float | None:
    command = [sys.executable, __file__, "--child", case, impl, size, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, ValueError, KeyError):
        return None


def child(case: str, impl: str, size: str, threads: int) -> None:
    torch.set_num_threads(threads)
    step = make_step(case, impl, make_inputs(case, cases.size_shape(size)))
    before = memory.proc_status_kb("VmRSS")
    if not memory.reset_peak_rss():
        before = memory._maxrss_kb()
    step()
    peak = memory.proc_status_kb("VmHWM") or memory._maxrss_kb()
    print(json.dumps({"peak_mb": (peak - before) / 1024}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["128", "full"], choices=["64", "128", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--no-peak", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.threads)
        return
    torch.set_num_threads(args.threads)
    lines = ["# deepatlas_cuda label / Dice / Jacobian report", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average at start: "
             f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"- torch {torch.__version__}, threads {args.threads}; median of {args.repeats} repeats, ours and torch "
             f"interleaved in one process; batch 1, float32 ddf, int64 labels (uint8 for nearest; a float32 softmax "
             f"source for pdice)", "",
             "| case | size | ours ms | torch ms | speed-up | peak MB ours / torch | peak ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        shape = cases.size_shape(size)
        for case in args.cases:
            inputs = make_inputs(case, shape)
            times = time_pair(case, inputs, args.repeats)
            del inputs
            peaks = {} if args.no_peak else {impl: peak_in_child(case, impl, size, args.threads)
                                               for impl in ("ours", "torch")}
            peak_text, ratio = "-", "-"
            if peaks and None not in peaks.values():
                peak_text = f"{peaks['ours']:.1f} / {peaks['torch']:.1f}"
                ratio = f"{peaks['torch'] / max(peaks['ours'], 0.1):.1f}x lower"
            row = (f"| {case} | {'x'.join(map(str, shape))} | {fmt_ms(times['ours'])} | {fmt_ms(times['torch'])} | "
                   f"{times['torch'] / times['ours']:.2f}x | {peak_text} | {ratio} |")
            print(row, file=sys.stderr, flush=True)
            lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
