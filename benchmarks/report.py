"""Side-by-side report: deepatlas_cuda ("ours") against plain PyTorch ("torch") for every benchmark case.

    python benchmarks/report.py [--sizes 64 128 full] [--threads 2] [--repeats N] [--device cpu|cuda] [--out FILE]

For each case (op x size x channels x variant, see cases.py) both implementations run on the same inputs in this
process, interleaved (ours, torch, torch, ours, ...) after a warm-up, and the median of N repeats is reported,
together with:
  * saved-for-backward bytes (unique storages autograd keeps; total and beyond the user's inputs),
  * peak memory of one step measured in a fresh process (memory.py),
  * a correctness check of ours against torch on the same inputs,
  * the bytes-moved floor (cases.bytes_moved_floor), the time it implies on an H100 at 3.0 TB/s (a MODEL number,
    not a measurement) and on this machine at the bandwidth of a large Tensor.copy_ measured here, and how far
    ours and torch are from that measured floor.

The default (--sizes 64 128) is meant to finish in a few minutes on a 2-core machine; `full` adds 160x192x224.
Timings from a shared or busy machine are noise: the header prints the load average for that reason.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import deepatlas_cuda  # noqa: E402

import cases  # noqa: E402
import memory  # noqa: E402
from cases import Case  # noqa: E402

MB = 1e6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- machine -----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(args, bandwidth: float) -> list[str]:
    info = deepatlas_cuda.build_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [
        "# deepatlas_cuda benchmark report",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}",
        f"- deepatlas_cuda {info['version']} loaded from: {info['loaded_from']} "
        f"(cuda kernels: {info['cuda_kernels']}, CPU loops: {info['cpu_loops']})",
    ]
    if args.device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    lines += [
        f"- timing: median of {args.repeats} repeats after {args.warmup} warm-up, ours and torch interleaved in one "
        "process, inputs float32, batch 1, smooth displacement field (see benchmarks/cases.py)",
        f"- measured copy bandwidth on this machine (large Tensor.copy_, read + write bytes / time): "
        f"{bandwidth / 1e9:.1f} GB/s",
        "",
    ]
    return lines


def measure_copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by a large contiguous float32 Tensor.copy_ (the machine's practical
    streaming bandwidth with the current thread count)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / statistics.median(times)


# ---- timing ------------------------------------------------------------------------------------------------------


def time_case(case: Case, repeats: int, warmup: int) -> dict:
    impls = [i for i in cases.IMPLS if i == "torch" or cases.ours_supported(case.device)]
    inputs = cases.make_inputs(case)
    runners = {impl: cases.make_runner(case, impl, inputs) for impl in impls}
    for _ in range(warmup):
        for impl in impls:
            runners[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            t0 = time.perf_counter()
            runners[impl]()
            times[impl].append(time.perf_counter() - t0)
    result = {"median_s": {impl: statistics.median(t) for impl, t in times.items()}, "times_s": times}
    if case.backward:
        result["saved"] = {impl: memory.saved_for_backward(case, impl, inputs) for impl in impls}
    if "ours" in impls:
        result["check"] = check_case(case, inputs)
    del runners, inputs
    gc.collect()
    return result


def check_case(case: Case, inputs: dict) -> str:
    """ours against torch on the same inputs: max |diff| of the output (forward); for each gradient the relative
    L2 difference ||ours - torch|| / ||torch||, plus how many elements differ by more than 1e-3 of torch's largest
    gradient. Such elements are expected where a sampled location lies (within float32 rounding) on an integer
    voxel coordinate: the bilinear weights have a kink there, and ours (voxel units) and torch (normalised, then
    unnormalised) can land on different sides of it, i.e. take different one-sided derivatives."""
    image, coords = inputs["image"], inputs["coords"]
    if not case.backward:
        with torch.no_grad():
            a = cases.op_function(case.op, "ours")(image, coords)
            b = cases.op_function(case.op, "torch")(image, coords)
        return f"out {(a - b).abs().max().item():.1e}"
    leaves = [(name, t) for name, t in (("img", image), ("crd", coords)) if t.requires_grad]
    grads = {}
    for impl in cases.IMPLS:
        image.grad = coords.grad = None
        cases.op_function(case.op, impl)(image, coords).backward(inputs["grad_out"])
        grads[impl] = [t.grad.clone() for _, t in leaves]
    image.grad = coords.grad = None
    parts = []
    for (name, _), a, b in zip(leaves, grads["ours"], grads["torch"]):
        diff = (a - b).abs()
        rel_l2 = (diff.norm() / b.norm().clamp_min(1e-30)).item()
        outliers = int((diff > 1e-3 * b.abs().max()).sum())
        parts.append(f"{name} {rel_l2:.1e}" + (f" ({outliers} el > 1e-3 max)" if outliers else ""))
    return ", ".join(parts)


# ---- tables ------------------------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MB:.1f}"


def pair(values: dict, key=None, fmt=fmt_mb) -> str:
    def get(impl):
        v = values.get(impl)
        return v if key is None or v is None else v[key]
    return f"{fmt(get('ours'))} / {fmt(get('torch'))}"


def main_table(results: dict[Case, dict], peaks: dict) -> list[str]:
    lines = [
        "## Time and memory (ours vs torch)",
        "",
        "ms = median wall time of one step; speed-up = torch / ours; saved = bytes autograd keeps for backward "
        "(unique storages); beyond inputs = of those, what is not the user's image / ddf / grid; peak = increase "
        "of peak memory over the inputs for one step in a fresh process (CPU: RSS; CUDA: max_memory_allocated); "
        "check = ours vs torch (forward: max |out diff|; backward: relative L2 difference of each grad, img = image, "
        "crd = ddf/grid, and the count of elements off by > 1e-3 of the largest grad: one-sided derivatives at "
        "integer sample locations, see report.check_case).",
        "",
        "| op | size | C | variant | ours ms | torch ms | speed-up | saved MB ours / torch | "
        "saved beyond inputs MB ours / torch | peak MB ours / torch | check |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, r in results.items():
        med = r["median_s"]
        ours, torch_t = med.get("ours"), med.get("torch")
        speedup = f"{torch_t / ours:.2f}x" if ours else "n/a"
        saved = r.get("saved")
        saved_total = pair(saved, "saved_total") if saved else "-"
        saved_beyond = pair(saved, "saved_beyond_inputs") if saved else "-"
        peak = {impl: peaks[(case, impl)]["peak_increase_bytes"] for impl in cases.IMPLS if (case, impl) in peaks}
        peak_s = pair(peak) if peak else "-"
        lines.append(f"| {case.op} | {'x'.join(map(str, case.shape))} | {case.channels} | "
                     f"{cases.VARIANT_LABELS[case.variant]} | {fmt_ms(ours)} | {fmt_ms(torch_t)} | {speedup} | "
                     f"{saved_total} | {saved_beyond} | {peak_s} | {r.get('check', 'n/a')} |")
    return lines + [""]


def floor_table(results: dict[Case, dict], bandwidth: float, device: str) -> list[str]:
    where = "this GPU" if device == "cuda" else "this machine"
    lines = [
        "## Bytes-moved floor",
        "",
        "floor MB = the minimal bytes one step must read + write (cases.bytes_moved_floor: every tensor once per "
        "pass, separate forward and backward passes). H100 model = floor / 3.0 TB/s: a MODEL number for an H100's "
        "HBM bandwidth, NOT a measurement. Measured floor = floor / the copy bandwidth measured on "
        f"{where} ({bandwidth / 1e9:.1f} GB/s); x = measured time / measured floor.",
        "",
        "| op | size | C | variant | floor MB | H100 model floor us (not measured) | "
        f"{where} floor ms | ours ms | ours x floor | torch ms | torch x floor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in results.items():
        floor = cases.case_floor_bytes(case)
        floor_s = floor / bandwidth
        med = r["median_s"]
        ours, torch_t = med.get("ours"), med.get("torch")
        lines.append(f"| {case.op} | {'x'.join(map(str, case.shape))} | {case.channels} | "
                     f"{cases.VARIANT_LABELS[case.variant]} | {floor / MB:.1f} | "
                     f"{floor / cases.H100_BANDWIDTH * 1e6:.1f} | {fmt_ms(floor_s)} | {fmt_ms(ours)} | "
                     f"{f'{ours / floor_s:.1f}x' if ours else 'n/a'} | {fmt_ms(torch_t)} | "
                     f"{torch_t / floor_s:.1f}x |")
    return lines + [""]


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["64", "128"], choices=list(cases.SIZES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", nargs="+", default=list(cases.OPS), choices=list(cases.OPS))
    parser.add_argument("--channels", nargs="+", type=int, default=list(cases.CHANNELS))
    parser.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak-memory runs")
    parser.add_argument("--peak-variants", nargs="+", default=["bwd_coords", "bwd_both"], choices=list(cases.VARIANTS),
                        help="variants whose peak memory is measured (one fresh process of ~2-4 s per case and "
                             "implementation; add fwd for the forward-only peaks)")
    parser.add_argument("--peak-jobs", type=int, default=2,
                        help="peak-memory child processes at a time (after all timing; does not change the numbers)")
    parser.add_argument("--copy-mb", type=int, default=None,
                        help="size of the copy used to measure bandwidth (default 256 MB CPU, 1024 MB CUDA)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("report.py: --device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    copy_mb = args.copy_mb or (1024 if args.device == "cuda" else 256)
    bandwidth = measure_copy_bandwidth(args.device, copy_mb * 2**20)
    log(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s")

    todo = cases.all_cases(args.sizes, [args.device], args.ops, args.channels)
    results: dict[Case, dict] = {}
    for n, case in enumerate(todo, 1):
        t0 = time.perf_counter()
        results[case] = time_case(case, args.repeats, args.warmup)
        med = results[case]["median_s"]
        log(f"[{n}/{len(todo)}] {case.id}: " + ", ".join(f"{k} {fmt_ms(v)} ms" for k, v in med.items())
            + f" ({time.perf_counter() - t0:.1f} s)")

    peaks: dict = {}
    if not args.no_peak:
        jobs = [(c, impl) for c in todo if c.variant in args.peak_variants
                for impl in cases.IMPLS if impl == "torch" or cases.ours_supported(c.device)]
        log(f"peak memory: {len(jobs)} fresh processes, {args.peak_jobs} at a time ...")
        t0 = time.perf_counter()
        peaks = memory.peak_memory_many(jobs, args.threads, args.peak_jobs)
        log(f"peak memory done ({time.perf_counter() - t0:.1f} s)")

    lines = machine_header(args, bandwidth)
    lines += main_table(results, peaks)
    lines += floor_table(results, bandwidth, args.device)
    lines.append(f"_report took {time.perf_counter() - started:.0f} s_")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        log(f"written to {args.out}")


if __name__ == "__main__":
    main()
