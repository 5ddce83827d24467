"""Every op called concurrently from 4 Python threads on different inputs gives, call after call, the same bits as
the same call made alone: forward values and every gradient. The native kernels hold no shared mutable state, and
each call's own OpenMP team runs inside whichever thread made it."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deepatlas_cuda as da

THREADS = 4
INPUTS = 8  # distinct inputs per op, each run ROUNDS times concurrently
ROUNDS = 6
SHAPE = (2, 2, 10, 11, 9)  # N, C, D, H, W: large enough that calls overlap
CLASSES = 4


def _inputs(seed):
    """One call's inputs, from its own generator: image, grid, ddf, two label maps, a probability target and the
    output gradients, all float32 (where summation order shows most) apart from the labels."""
    generator = torch.Generator().manual_seed(seed)
    n, c, *spatial = SHAPE

    def uniform(*shape, scale=1.0):
        return (torch.rand(*shape, generator=generator, dtype=torch.float32) * 2 - 1) * scale

    return {
        "image": torch.randn(n, c, *spatial, generator=generator, dtype=torch.float32),
        "grid": uniform(n, *spatial, 3, scale=1.2),
        "ddf": uniform(n, 3, *spatial, scale=3.0),
        "labels": torch.randint(0, CLASSES, (n, 1, *spatial), generator=generator, dtype=torch.int32),
        "target": torch.randint(0, CLASSES, (n, 1, *spatial), generator=generator, dtype=torch.int32),
        "probabilities": torch.softmax(torch.randn(n, CLASSES, *spatial, generator=generator, dtype=torch.float32), 1),
        "seed": seed,
    }


def _grad_out(output, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(output.shape, generator=generator, dtype=output.dtype)


def _with_grads(forward, differentiable, seed):
    """forward(*differentiable) and the gradients of a fixed random projection of it, as a tuple of tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in differentiable]
    output = forward(*leaves)
    grads = torch.autograd.grad(output, leaves, _grad_out(output, seed)) if leaves else ()
    return (output.detach(), *grads)


OPS = {
    "grid_sample": lambda x: _with_grads(
        lambda image, grid: da.grid_sample(image, grid, "bilinear", "reflection", False), (x["image"], x["grid"]),
        x["seed"]),
    "warp": lambda x: _with_grads(lambda image, ddf: da.warp(image, ddf, "bilinear", "zeros"),
                                  (x["image"], x["ddf"]), x["seed"]),
    "warp_labels_nearest": lambda x: (da.warp_labels(x["labels"], x["ddf"], padding_value=CLASSES),),
    "warp_labels_soft": lambda x: _with_grads(
        lambda ddf: da.warp_labels(x["labels"], ddf, "soft", num_classes=CLASSES), (x["ddf"],), x["seed"]),
    "warped_dice_labels": lambda x: _with_grads(
        lambda ddf: da.warped_dice(x["labels"], ddf, x["target"], num_classes=CLASSES), (x["ddf"],), x["seed"]),
    "warped_dice_probabilities": lambda x: _with_grads(
        lambda ddf, target: da.warped_dice(x["labels"], ddf, target), (x["ddf"], x["probabilities"]), x["seed"]),
    "jacobian_det": lambda x: _with_grads(lambda ddf: da.jacobian_det(ddf, (1.0, 2.0, 0.5), "central"),
                                          (x["ddf"],), x["seed"]),
    "folding_stats": lambda x: tuple(da.folding_stats(x["ddf"], strict=True).values()),
}


def _assert_bit_identical(results, expected):
    for result, reference in zip(results, expected):
        assert len(result) == len(reference)
        for a, b in zip(result, reference):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _run_concurrently(calls):
    """[(op name, inputs index)] run on a pool of THREADS threads; results in the order of ``calls``."""
    inputs = [_inputs(seed) for seed in range(INPUTS)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [pool.submit(OPS[name], inputs[index]) for name, index in calls]
        return [future.result() for future in futures]


@pytest.mark.parametrize("name", list(OPS))
def test_concurrent_calls_match_single_threaded(name):
    expected = [OPS[name](_inputs(seed)) for seed in range(INPUTS)]
    calls = [(name, index) for _ in range(ROUNDS) for index in range(INPUTS)]
    results = _run_concurrently(calls)
    _assert_bit_identical(results, [expected[index] for _, index in calls])


def test_all_ops_interleaved():
    """Different ops at the same time on the 4 threads: no state shared between ops either."""
    expected = {(name, index): OPS[name](_inputs(index)) for name in OPS for index in range(INPUTS)}
    calls = [key for _ in range(2) for key in expected]
    results = _run_concurrently(calls)
    _assert_bit_identical(results, [expected[key] for key in calls])
