"""warped_dice (fused) against warp-then-Dice with one-hot + F.grid_sample."""

import pytest
import torch
from helpers import random_ddf

import deepatlas_cuda as da
from deepatlas_cuda import reference


def labels(n, shape, k, dtype=torch.int64):
    return torch.randint(0, k, (n, 1, *shape)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_target_matches_unfused_reference(dtype, label_dtype):
    source, target = labels(2, (6, 7, 5), 4, label_dtype), labels(2, (6, 7, 5), 4, label_dtype)
    ddf = random_ddf(2, 6, 7, 5, dtype=dtype).requires_grad_()
    ours = da.warped_dice(source, ddf, target, num_classes=4)
    theirs = reference.warped_dice(source, ddf, target, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(2, 4, dtype=dtype)
    torch.testing.assert_close(torch.autograd.grad(ours, ddf, grad_out), torch.autograd.grad(theirs, ddf, grad_out),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_target_gets_gradients(dtype):
    source = labels(1, (5, 6, 7), 3)  # broadcast over the ddf batch
    target = torch.softmax(torch.randn(2, 3, 5, 6, 7, dtype=dtype), 1).requires_grad_()
    ddf = random_ddf(2, 5, 6, 7, dtype=dtype).requires_grad_()
    ours = da.warped_dice(source, ddf, target)
    theirs = reference.warped_dice(source.expand(2, -1, -1, -1, -1), ddf, target, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(2, 3, dtype=dtype)
    for a, b in zip(torch.autograd.grad(ours, (ddf, target), grad_out),
                    torch.autograd.grad(theirs, (ddf, target), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_identity_warp_of_the_target_itself_is_perfect():
    segmentation = labels(2, (6, 6, 6), 5)
    dice = da.warped_dice(segmentation, torch.zeros(2, 3, 6, 6, 6), segmentation, num_classes=5)
    torch.testing.assert_close(dice, torch.ones(2, 5))


def test_without_background():
    source, target = labels(1, (4, 4, 4), 3), labels(1, (4, 4, 4), 3)
    ddf = random_ddf(1, 4, 4, 4)
    full = da.warped_dice(source, ddf, target, num_classes=3)
    torch.testing.assert_close(da.warped_dice(source, ddf, target, num_classes=3, include_background=False),
                               full[:, 1:])


def test_gradcheck_float64():
    source, target = labels(1, (3, 4, 3), 3), labels(1, (3, 4, 3), 3)
    ddf = (random_ddf(1, 3, 4, 3, dtype=torch.float64).round() + 0.3).requires_grad_()
    probs = torch.softmax(torch.randn(1, 3, 3, 4, 3, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: da.warped_dice(source, u, target, num_classes=3), (ddf,))
    assert torch.autograd.gradcheck(lambda u, p: da.warped_dice(source, u, p), (ddf, probs))


def test_extra_memory_is_per_class_only():
    source, target = labels(1, (6, 6, 6), 4), labels(1, (6, 6, 6), 4)
    ddf = random_ddf(1, 6, 6, 6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dice = da.warped_dice(source, ddf, target, num_classes=4)
    big = [t for t in saved if t.data_ptr() not in {source.data_ptr(), ddf.data_ptr(), target.data_ptr()}]
    assert all(t.numel() <= 3 * 4 for t in big)
    dice.sum().backward()


def test_bit_identical_across_thread_counts():
    source, target = labels(2, (12, 10, 9), 6), labels(2, (12, 10, 9), 6)
    ddf = random_ddf(2, 12, 10, 9)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(da.warped_dice(source, ddf, target, num_classes=6))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"source": torch.rand(1, 3, 4, 4, 4, dtype=torch.float64)}, ValueError, "the ddf's dtype"),
        ({"source": torch.rand(1, 2, 4, 4, 4)}, ValueError, "num_classes=3 but the probability source has 2"),
        ({"source": torch.rand(1, 3, 4, 4, 4), "target": torch.full((1, 1, 4, 4, 4), 3)}, ValueError,
         r"target labels must lie in \[0, 3\)"),
        ({"num_classes": None}, ValueError, "num_classes is required"),
        ({"target": torch.rand(1, 2, 4, 4, 4)}, ValueError, "probability targets must be"),
        ({"target": torch.zeros(1, 1, 4, 4, 5, dtype=torch.long)}, ValueError, "target must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"source": labels(1, (4, 4, 4), 3), "ddf": torch.zeros(1, 3, 4, 4, 4),
            "target": labels(1, (4, 4, 4), 3), "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        da.warped_dice(**args)


def test_out_of_range_target_labels_are_rejected():
    target = labels(1, (4, 4, 4), 3)
    target[0, 0, 0, 0, 0] = 7
    with pytest.raises(RuntimeError, match=r"label values must be in \[0, num_classes\)"):
        da.warped_dice(labels(1, (4, 4, 4), 3), torch.zeros(1, 3, 4, 4, 4), target, num_classes=3)


def test_opcheck_and_compile():
    source, target = labels(2, (4, 5, 3), 3, torch.int32), labels(2, (4, 5, 3), 3, torch.int32)
    ddf = random_ddf(2, 4, 5, 3).requires_grad_()
    probs = torch.softmax(torch.randn(2, 3, 4, 5, 3), 1).requires_grad_()
    torch.library.opcheck(torch.ops.deepatlas.warped_dice_sums.default, (source, ddf, target, 3))
    torch.library.opcheck(torch.ops.deepatlas.warped_dice_sums.default, (source, ddf, probs, 3))

    def loss(u, p):
        return 1 - da.warped_dice(source, u, p).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(ddf, probs), (ddf, probs)),
                               torch.autograd.grad(loss(ddf, probs), (ddf, probs)))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    source, target = labels(2, (6, 7, 5), 40), torch.softmax(torch.randn(2, 40, 6, 7, 5), 1)
    ddf = random_ddf(2, 6, 7, 5)
    results = []
    for device in ("cpu", "cuda"):
        u = ddf.to(device).requires_grad_()
        p = target.to(device).requires_grad_()
        dice = da.warped_dice(source.to(device), u, p)
        results.append((dice, *torch.autograd.grad(dice.sum(), (u, p))))
    for a, b in zip(*results):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_probability_source_matches_warp_then_dice_and_gradchecks(target_kind):
    generator = torch.Generator().manual_seed(5)
    shape, k = (5, 4, 6), 3
    source = torch.rand(2, k, *shape, generator=generator, dtype=torch.float64).softmax(1).requires_grad_()
    ddf = (torch.randn(2, 3, *shape, generator=generator, dtype=torch.float64) * 1.5).requires_grad_()
    if target_kind == "labels":
        target = torch.randint(0, k, (2, 1, *shape), generator=generator)
        dense = torch.nn.functional.one_hot(target[:, 0], k).movedim(-1, 1).double()
    else:
        target = torch.rand(2, k, *shape, generator=generator, dtype=torch.float64).softmax(1).requires_grad_()
        dense = target
    ours = da.warped_dice(source, ddf, target)
    expected = reference.soft_dice(reference.warp(source, ddf, padding_mode="zeros"), dense)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    inputs = (source, ddf) + ((target,) if target_kind == "probabilities" else ())
    assert torch.autograd.gradcheck(lambda *x: da.warped_dice(x[0], x[1], x[2] if len(x) > 2 else target),
                                    inputs, eps=1e-6, atol=1e-6)
    assert da.warped_dice(source, ddf, target, include_background=False).shape == (2, k - 1)
