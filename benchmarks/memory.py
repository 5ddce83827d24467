"""Memory measurements for the benchmark cases.

(a) ``saved_for_backward(case, impl)``: the bytes autograd keeps for backward after one forward, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` as unique storages (by data_ptr). Reported as "saved total" and
    "saved beyond inputs" (storages that are not the user's image / ddf / grid).

(b) ``peak_memory(case, impl)``: the peak memory of ONE step of the case (forward, or forward + backward) in a
    FRESH process (``python benchmarks/memory.py --child ...``), as the increase over the memory held once the
    inputs exist. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS (see
    ``peak_memory``).
    CPU: resident set size. The child creates its inputs, runs the op once on a tiny volume (loads the kernels
    and starts the thread pool), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5) and reads
    the RSS; after the step it reads the peak (VmHWM in /proc/self/status, the same counter
    ``getrusage(RUSAGE_SELF).ru_maxrss`` reports). The reported number is peak - RSS after inputs.
    Why not ru_maxrss alone: Linux carries the parent's peak RSS into a vfork+exec child (exec stores the old mm's
    high-water mark in the process's ``signal->maxrss``), so a child started from a report process that has
    already run the 128^3 cases would show that process's peak. The child reports ru_maxrss too, and uses it
    only when /proc/self/clear_refs cannot be written (flagged as ``method: ru_maxrss``).
    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated
    once the inputs exist (the caching allocator's reserved memory is not counted).

    python benchmarks/memory.py [--sizes 64] [--device cpu] [--threads 2]   # prints a table for every case
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cases  # noqa: E402
from cases import Case  # noqa: E402

MB = 1e6


# ---- (a) saved for backward ------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_for_backward(case: Case, impl: str, inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Bytes autograd saves for backward in one forward of the case (a backward variant).

    Returns {"saved_total": bytes, "saved_beyond_inputs": bytes, "tensors": number of saved tensors,
    "storages": number of unique storages}. Storages are deduplicated by data_ptr, so a tensor saved twice, or
    a view of an input, is counted once (a view of an input counts as the input)."""
    if not case.backward:
        raise ValueError("saved_for_backward needs a backward variant")
    if inputs is None:
        inputs = cases.make_inputs(case)
    image, coords = inputs["image"], inputs["coords"]
    input_ptrs = {_storage_key(image)[0], _storage_key(coords)[0]}
    storages: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        ptr, nbytes = _storage_key(t)
        if nbytes:
            storages[ptr] = max(nbytes, storages.get(ptr, 0))
        return t

    f = cases.op_function(case.op, impl)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(image, coords)
    total = sum(storages.values())
    beyond = sum(n for ptr, n in storages.items() if ptr not in input_ptrs)
    del out
    return {"saved_total": total, "saved_beyond_inputs": beyond, "tensors": count, "storages": len(storages)}


# ---- (b) peak memory in a fresh process ------------------------------------------------------------------------


def proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux


def _child(case: Case, impl: str, threads: int) -> dict:
    """Runs in the fresh process: one step of the case, returns the peak increase in bytes."""
    torch.set_num_threads(threads)
    # load the kernels, the autograd machinery and the thread pool on a tiny volume first
    tiny = dataclasses.replace(case, size="8")
    cases.make_runner(tiny, impl, cases.make_inputs(tiny))()

    inputs = cases.make_inputs(case)
    run = cases.make_runner(case, impl, inputs)
    gc.collect()
    result: dict = {"case": case.id, "impl": impl, "threads": threads}
    if case.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        result.update(method="cuda.max_memory_allocated", baseline_bytes=base,
                      peak_increase_bytes=torch.cuda.max_memory_allocated() - base)
        return result
    reset = reset_peak_rss()
    base_rss_kb = proc_status_kb("VmRSS")
    base_maxrss_kb = _maxrss_kb()
    run()
    hwm_kb = proc_status_kb("VmHWM")
    maxrss_kb = _maxrss_kb()
    result.update(baseline_bytes=(base_rss_kb or 0) * 1024, ru_maxrss_before_kb=base_maxrss_kb,
                  ru_maxrss_after_kb=maxrss_kb)
    if reset and hwm_kb is not None and base_rss_kb is not None:
        result.update(method="VmHWM after clear_refs", peak_increase_bytes=(hwm_kb - base_rss_kb) * 1024)
    else:  # may include the parent's / the setup's peak: see the module docstring
        result.update(method="ru_maxrss", peak_increase_bytes=(maxrss_kb - (base_rss_kb or base_maxrss_kb)) * 1024)
    return result


def peak_memory(case: Case, impl: str, threads: int | None = None, timeout: float = 600) -> dict:
    """Peak memory increase of one step of ``case`` run by ``impl``, measured in a fresh Python process.
    Returns the child's dict: "peak_increase_bytes", "baseline_bytes", "method", ..."""
    threads = threads or torch.get_num_threads()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--op", case.op, "--size", case.size,
           "--channels", str(case.channels), "--variant", case.variant, "--device", case.device,
           "--impl", impl, "--threads", str(threads)]
    # A fixed glibc mmap threshold (setting it also turns off glibc's dynamic threshold): every allocation of
    # 64 KiB or more is its own mmap and leaves the RSS when freed. Without it, glibc raises the threshold after
    # the first large free, later tensors come from the brk heap, and memory freed while the inputs were generated
    # stays resident and is silently reused by the step: the peak would be undercounted.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed for {case.id} {impl}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory_many(jobs: list[tuple[Case, str]], threads: int, workers: int = 1) -> dict[tuple[Case, str], dict]:
    """peak_memory for many (case, impl), ``workers`` child processes at a time (each is its own process, so the
    numbers do not depend on the parallelism; only the wall time does)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {job: pool.submit(peak_memory, job[0], job[1], threads) for job in jobs}
        return {job: fut.result() for job, fut in futures.items()}


# ---- command line ----------------------------------------------------------------------------------------------


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=cases.OPS)
    parser.add_argument("--size", choices=list(cases.SIZES))
    parser.add_argument("--channels", type=int)
    parser.add_argument("--variant", choices=list(cases.VARIANTS))
    parser.add_argument("--impl", choices=cases.IMPLS)
    parser.add_argument("--sizes", nargs="+", default=["64"], choices=list(cases.SIZES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="child processes at a time")
    args = parser.parse_args(argv)

    if args.child:
        case = Case(args.op, args.size, args.channels, args.variant, args.device)
        print(json.dumps(_child(case, args.impl, args.threads)))
        return

    torch.set_num_threads(args.threads)
    todo = [c for c in cases.all_cases(args.sizes, [args.device]) if c.backward]
    peaks = peak_memory_many([(c, i) for c in todo for i in cases.IMPLS], args.threads, args.jobs)
    print("| case | saved total MB (ours / torch) | saved beyond inputs MB (ours / torch) | peak MB (ours / torch) |")
    print("|---|---|---|---|")
    for c in todo:
        inputs = cases.make_inputs(c)
        saved = {i: saved_for_backward(c, i, inputs) for i in cases.IMPLS}
        print(f"| {c.id} | {saved['ours']['saved_total'] / MB:.1f} / {saved['torch']['saved_total'] / MB:.1f} "
              f"| {saved['ours']['saved_beyond_inputs'] / MB:.1f} / {saved['torch']['saved_beyond_inputs'] / MB:.1f} "
              f"| {peaks[(c, 'ours')]['peak_increase_bytes'] / MB:.1f} / "
              f"{peaks[(c, 'torch')]['peak_increase_bytes'] / MB:.1f} |")


if __name__ == "__main__":
    _main()
