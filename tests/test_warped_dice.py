"""warped_dice (fused) against warp-then-Dice with one-hot + F.grid_sample."""

import pytest
import torch
from helpers import random_ddf

import deepatlas_cuda as da
import deepatlas_cuda.dice
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
        ({"source": torch.rand(1, 3, 4, 4, 4), "target": torch.full((1, 1, 4, 4, 4), 3)}, RuntimeError,
         r"target: label values must be in \[0, num_classes\) = \[0, 3\)"),
        ({"source": torch.rand(1, 3, 4, 4, 5)}, ValueError, "a probability source must be"),
        ({"source": torch.rand(2, 3, 4, 4, 4)}, ValueError, "source batch size 2 must be 1 or equal"),
        ({"source": torch.rand(1, 3, 4, 4, 4), "num_classes": None, "target": torch.rand(1, 2, 4, 4, 4)},
         ValueError, r"probability targets must be \[N, num_classes=3"),
        ({"source": torch.rand(1, 3, 4, 4, 4), "target": torch.rand(1, 3, 4, 4, 4, dtype=torch.float64)},
         ValueError, "probability targets must be"),
        ({"source": torch.rand(1, 3, 4, 4, 4), "target": torch.zeros(1, 2, 4, 4, 4, dtype=torch.long)},
         ValueError, r"label targets must be \[N, 1, D, H, W\]"),
        ({"source": torch.rand(1, 3, 4, 4, 4), "ddf": torch.zeros(1, 2, 4, 4, 4)}, ValueError,
         r"warped_dice: ddf must be \[N, 3, D, H, W\]"),
        ({"num_classes": None}, ValueError, "num_classes is required"),
        ({"target": torch.rand(1, 2, 4, 4, 4)}, ValueError, "probability targets must be"),
        ({"target": torch.zeros(1, 1, 4, 4, 5, dtype=torch.long)}, ValueError, "target must be"),
        # a wider target dtype than the source's is checked before the cast (256 would wrap to 0 in uint8)
        ({"target": torch.full((1, 1, 4, 4, 4), 256)}, RuntimeError, r"found values in \[256, 256\]"),
        ({"source": labels(1, (4, 4, 4), 3, torch.int16), "target": torch.full((1, 1, 4, 4, 4), 65537,
                                                                                  dtype=torch.int32)},
         RuntimeError, "label values must be in"),
        ({"source": torch.zeros(1, 2, 4, 4, 4, dtype=torch.long)}, ValueError,
         r"warped_dice: source must be \[N, 1, D, H, W\]"),
        ({"ddf": torch.zeros(1, 3, 4, 4, 5)}, ValueError, "warped_dice: source spatial shape"),
        ({"num_classes": None, "source": torch.rand(1, 3, 4, 4, 4), "target": torch.rand(1, 3, 4, 4)},
         ValueError, "warped_dice: target must be"),
        ({"eps": -1.0}, ValueError, "eps must be a number >= 0"),
        ({"num_classes": 0}, ValueError, "num_classes must be a positive int below 2"),
        ({"num_classes": 2**31}, ValueError, "num_classes must be a positive int below 2"),  # would wrap in 32 bits
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


@pytest.mark.cuda
def test_cuda_many_classes_without_shared_memory_matches_cpu():
    """K = 1400: a block's [3, K] double sums (33.6 KB) exceed the 32 KB of shared memory the forward uses, so it
    accumulates straight into global memory."""
    source, target = labels(2, (6, 7, 5), 1400), labels(2, (6, 7, 5), 1400)
    ddf = random_ddf(2, 6, 7, 5)
    results = []
    for device in ("cpu", "cuda"):
        u = ddf.to(device).requires_grad_()
        dice = da.warped_dice(source.to(device), u, target.to(device), num_classes=1400)
        results.append((dice, *torch.autograd.grad(dice.sum(), u)))
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


# --- Probability source, fused ---------------------------------------------------------------------------------


def probability_inputs(n_source, n, shape, k, dtype, target_kind, generator):
    """Random non-zero probability-like source (not normalised), ddf reaching outside the volume, and a label or
    probability target."""
    source = (torch.rand(n_source, k, *shape, generator=generator, dtype=torch.float64) + 0.1).to(dtype)
    ddf = ((torch.rand(n, 3, *shape, generator=generator, dtype=torch.float64) * 2 - 1) * 2.5).to(dtype)
    if target_kind == "labels":
        target = torch.randint(0, k, (n, 1, *shape), generator=generator)
    else:
        target = torch.rand(n, k, *shape, generator=generator, dtype=torch.float64).softmax(1).to(dtype)
    return source, ddf, target


def dice_and_grads(fn, source, ddf, target, grad_out):
    """fn's Dice and its gradients for every floating-point input (a label source or target gets none)."""
    source, ddf, target = (t.detach().requires_grad_() if t.is_floating_point() else t for t in (source, ddf, target))
    dice = fn(source, ddf, target)
    return (dice, *torch.autograd.grad(dice, [t for t in (source, ddf, target) if t.requires_grad], grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_source", [2, 1], ids=["batched", "broadcast"])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_fused_probability_source_matches_warp_then_dice(dtype, n_source, target_kind):
    generator = torch.Generator().manual_seed(11)
    source, ddf, target = probability_inputs(n_source, 2, (6, 7, 5), 4, dtype, target_kind, generator)
    grad_out = torch.randn(2, 4, generator=generator, dtype=torch.float64).to(dtype)
    ours = dice_and_grads(da.warped_dice, source, ddf, target, grad_out)
    theirs = dice_and_grads(reference.warped_probability_dice, source, ddf, target, grad_out)
    assert len(ours) == (4 if target_kind == "probabilities" else 3)  # dice, grad source, grad ddf[, grad target]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert b.abs().max() > 0  # every compared quantity is non-trivial
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_fused_probability_source_gradcheck_broadcast(target_kind):
    generator = torch.Generator().manual_seed(3)
    source, ddf, target = probability_inputs(1, 2, (3, 4, 3), 3, torch.float64, target_kind, generator)
    ddf = ddf.round() + 0.3  # away from the trilinear kinks at integer coordinates
    inputs = [source.requires_grad_(), ddf.requires_grad_()]
    if target_kind == "probabilities":
        inputs.append(target.requires_grad_())
    assert torch.autograd.gradcheck(lambda *x: da.warped_dice(x[0], x[1], x[2] if len(x) > 2 else target),
                                    inputs, eps=1e-6, atol=1e-7)


def test_fused_probability_source_label_target_of_any_dtype():
    generator = torch.Generator().manual_seed(4)
    source, ddf, target = probability_inputs(2, 2, (4, 5, 3), 3, torch.float32, "labels", generator)
    expected = da.warped_dice(source, ddf, target)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        torch.testing.assert_close(da.warped_dice(source, ddf, target.to(dtype)), expected, rtol=0, atol=0)


def test_fused_probability_source_opcheck_and_compile():
    generator = torch.Generator().manual_seed(6)
    source, ddf, target = probability_inputs(1, 2, (4, 5, 3), 3, torch.float32, "probabilities", generator)
    labels_target = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=generator, dtype=torch.int32)
    source, ddf, target = source.requires_grad_(), ddf.requires_grad_(), target.requires_grad_()
    op = torch.ops.deepatlas.warped_dice_sums.default
    torch.library.opcheck(op, (source, ddf, target, 3))
    torch.library.opcheck(op, (source, ddf, labels_target, 3))
    torch.library.opcheck(op, (source.detach(), ddf, target, 3))

    def loss(p, u, t):
        return 1 - da.warped_dice(p, u, t).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(source, ddf, target), (source, ddf, target)),
                               torch.autograd.grad(loss(source, ddf, target), (source, ddf, target)))


@pytest.mark.parametrize("n_source", [2, 1], ids=["batched", "broadcast"])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_fused_probability_source_bit_identical_across_thread_counts(n_source, target_kind):
    generator = torch.Generator().manual_seed(8)
    source, ddf, target = probability_inputs(n_source, 2, (12, 10, 9), 5, torch.float32, target_kind, generator)
    grad_out = torch.randn(2, 5, generator=generator)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(dice_and_grads(da.warped_dice, source, ddf, target, grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


class _RecordSizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_fused_probability_source_extra_memory_is_per_class_only(target_kind):
    generator = torch.Generator().manual_seed(9)
    n, k = 2, 6
    source, ddf, target = probability_inputs(1, n, (6, 6, 6), k, torch.float32, target_kind, generator)
    source, ddf = source.requires_grad_(), ddf.requires_grad_()
    if target_kind == "probabilities":
        target.requires_grad_()
    inputs = {source.data_ptr(), ddf.data_ptr(), target.data_ptr()}
    saved = []
    recorder = _RecordSizes()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), recorder:
        dice = da.warped_dice(source, ddf, target)
    assert all(t.data_ptr() in inputs or t.numel() <= n * 3 * k for t in saved)
    # Nothing the forward computes is larger than the [N, 3, K] sums: no warped (or one-hot) volume ever exists.
    assert max(size for _, size in recorder.sizes) <= n * 3 * k, recorder.sizes
    recorder = _RecordSizes()
    with recorder:
        grads = torch.autograd.grad(dice.sum(), [source, ddf] + ([target] if target.requires_grad else []))
    # The backward allocates the gradients themselves and O(N * K) more.
    grad_sizes = {g.numel() for g in grads}
    assert all(size <= n * 3 * k or size in grad_sizes for _, size in recorder.sizes), recorder.sizes


def test_fused_probability_source_nan_ddf_points_count_as_outside():
    generator = torch.Generator().manual_seed(10)
    source, ddf, target = probability_inputs(2, 2, (4, 5, 6), 3, torch.float64, "probabilities", generator)
    ddf_nan, ddf_far = ddf.clone(), ddf.clone()
    ddf_nan[0, 1, 1, 2, 3] = float("nan")
    ddf_far[0, :, 1, 2, 3] = 1e6
    grad_out = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    with_nan = dice_and_grads(da.warped_dice, source, ddf_nan, target, grad_out)
    with_far = dice_and_grads(da.warped_dice, source, ddf_far, target, grad_out)
    for a, b in zip(with_nan, with_far):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_op_calls_check_probability_sources():
    source, ddf, target = torch.rand(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), torch.rand(1, 3, 4, 4, 4)
    sums = torch.ops.deepatlas.warped_dice_sums
    with pytest.raises(RuntimeError, match=r"a probability source must be \[N or 1, num_classes=4"):
        sums(source, ddf, torch.rand(1, 4, 4, 4, 4), 4)
    with pytest.raises(RuntimeError, match="a probability source must have the ddf's dtype"):
        sums(source.double(), ddf, target, 3)
    with pytest.raises(RuntimeError, match="source spatial shape"):
        sums(torch.rand(1, 3, 4, 4, 5), ddf, target, 3)
    labels_source = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"num_classes must be below 2\^31, got 2147483648"):
        sums(labels_source, ddf, labels_source, 2**31)
    with pytest.raises(RuntimeError, match="integer label sources have no gradient"):
        torch.ops.deepatlas.warped_dice_sums_backward(torch.ones(1, 3, 3, dtype=torch.float64), labels_source, ddf,
                                                      target, 3, [False, False, True])


@pytest.mark.cuda
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_cuda_probability_source_matches_cpu(target_kind):
    generator = torch.Generator().manual_seed(12)
    source, ddf, target = probability_inputs(1, 2, (6, 7, 5), 40, torch.float32, target_kind, generator)
    grad_out = torch.randn(2, 40, generator=generator)
    cpu = dice_and_grads(da.warped_dice, source, ddf, target, grad_out)
    cuda = dice_and_grads(da.warped_dice, source.cuda(), ddf.cuda(), target.cuda(), grad_out.cuda())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


# --- Unfused path (CUDA under torch.use_deterministic_algorithms(True)), forced on the CPU ---------------------------


def dice_inputs(source_kind, n_source, target_kind, dtype, generator, shape=(6, 7, 5), k=4):
    source, ddf, target = probability_inputs(n_source, 2, shape, k, dtype, target_kind, generator)
    if source_kind == "labels":
        source = torch.randint(0, k, (n_source, 1, *shape), generator=generator, dtype=torch.int32)
        if target_kind == "labels":
            target = target.to(torch.int32)  # a label source needs a label target of its dtype
    return source, ddf, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source_kind", ["labels", "probabilities"])
@pytest.mark.parametrize("n_source", [2, 1], ids=["batched", "broadcast"])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_unfused_path_equals_the_fused_op(monkeypatch, dtype, source_kind, n_source, target_kind):
    generator = torch.Generator().manual_seed(21)
    source, ddf, target = dice_inputs(source_kind, n_source, target_kind, dtype, generator)
    grad_out = torch.randn(2, 4, generator=generator, dtype=torch.float64).to(dtype)

    def run(source, ddf, target):
        return da.warped_dice(source, ddf, target, num_classes=4)

    fused = dice_and_grads(run, source, ddf, target, grad_out)
    monkeypatch.setattr(deepatlas_cuda.dice, "_FORCE_UNFUSED", True)
    calls = []
    unfused_sums = deepatlas_cuda.dice._unfused_sums
    monkeypatch.setattr(deepatlas_cuda.dice, "_unfused_sums", lambda *a: calls.append(1) or unfused_sums(*a))
    unfused = dice_and_grads(run, source, ddf, target, grad_out)
    assert calls, "the unfused path was not taken"
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert len(fused) == len(unfused) == 2 + (source_kind == "probabilities") + (target_kind == "probabilities")
    for a, b in zip(fused, unfused):
        assert b.abs().max() > 0
        torch.testing.assert_close(b, a, **tolerance)


def test_unfused_path_rejects_out_of_range_target_labels(monkeypatch):
    monkeypatch.setattr(deepatlas_cuda.dice, "_FORCE_UNFUSED", True)
    target = labels(1, (4, 4, 4), 3)
    target[0, 0, 1, 2, 3] = -2
    with pytest.raises(RuntimeError, match=r"label values must be in \[0, num_classes\) = \[0, 3\), found values in "
                                           r"\[-2, 2\]"):
        da.warped_dice(torch.rand(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), target)
