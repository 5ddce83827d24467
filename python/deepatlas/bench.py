"""``deepatlas bench``: a quick side-by-side timing of the ops the model uses against the plain-PyTorch way
(deepatlas_cuda.reference), forward + backward, median of ``repeats`` runs. The full benchmark suite with memory
measurements lives in benchmarks/ (docs/benchmarks.md)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

import deepatlas_cuda as da
from deepatlas_cuda import reference


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: kernel loading, thread pool, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fwd_bwd(op: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in inputs:
            t.grad = None
        op(*inputs).sum().backward()
    return run


def bench_table(size: int = 96, repeats: int = 5, device: str = "cpu", num_classes: int = 16
                ) -> tuple[list[dict], str]:
    """Rows {"op", "ours_ms", "torch_ms", "speedup"} and the same as a markdown table."""
    if size < 4 or repeats < 1:
        raise ValueError(f"size must be >= 4 and repeats >= 1, got {size} and {repeats}")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, size, size, size)
    image = torch.rand(shape, generator=g).to(dev)
    ddf = (torch.randn((1, 3, size, size, size), generator=g) * 2).to(dev).requires_grad_()
    labels = torch.randint(0, num_classes, shape, generator=g).to(dev)
    target = torch.randint(0, num_classes, shape, generator=g).to(dev)
    cases = [
        ("warp (grad ddf)", _fwd_bwd(da.warp, image, ddf), _fwd_bwd(reference.warp, image, ddf)),
        (f"soft label warp, K={num_classes}",
         _fwd_bwd(lambda d: da.warp_labels(labels, d, "soft", num_classes), ddf),
         _fwd_bwd(lambda d: reference.warp_labels_soft(labels, d, num_classes), ddf)),
        (f"warped Dice, K={num_classes}",
         _fwd_bwd(lambda d: da.warped_dice(labels, d, target, num_classes), ddf),
         _fwd_bwd(lambda d: reference.warped_dice(labels, d, target, num_classes), ddf)),
        ("jacobian_det", _fwd_bwd(da.jacobian_det, ddf), _fwd_bwd(reference.jacobian_det, ddf)),
    ]
    rows = []
    for name, ours, theirs in cases:
        ours_ms = _median_ms(ours, repeats, dev)
        torch_ms = _median_ms(theirs, repeats, dev)
        rows.append({"op": name, "ours_ms": ours_ms, "torch_ms": torch_ms, "speedup": torch_ms / ours_ms})
    lines = [f"fwd + bwd at {size}^3 on {device} ({torch.get_num_threads()} threads), median of {repeats}:", "",
             "| op | deepatlas_cuda (ms) | plain PyTorch (ms) | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['ours_ms']:.1f} | {r['torch_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    return rows, "\n".join(lines)
