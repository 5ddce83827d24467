"""CUDA kernels against the CPU kernels (the same per-voxel code) and against torch; skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ddf, random_grid, to_layout

import deepatlas_cuda as da

pytestmark = pytest.mark.cuda

PADDINGS = ["zeros", "border", "reflection"]


def _forward_backward(fn, tensors, grad_out=None):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out.to(out)
    return out, torch.autograd.grad(out, tensors, grad_out), grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_cuda_matches_cpu(dtype, mode, padding, align_corners):
    input = torch.randn(2, 3, 5, 6, 7, dtype=dtype)
    grid = random_grid(2, 4, 5, 3, dtype=dtype)
    fn = lambda i, g: da.grid_sample(i, g, mode, padding, align_corners)  # noqa: E731
    out_cpu, grads_cpu, grad_out = _forward_backward(fn, [input, grid])
    out_gpu, grads_gpu, _ = _forward_backward(fn, [input.cuda(), grid.cuda()], grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)
    torch.testing.assert_close(out_gpu, F.grid_sample(input.cuda(), grid.cuda(), mode, padding, align_corners), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_cuda_matches_cpu(dtype, padding):
    image = torch.randn(1, 2, 6, 7, 5, dtype=dtype)  # broadcast over the ddf batch
    ddf = random_ddf(3, 6, 7, 5, dtype=dtype)
    fn = lambda i, u: da.warp(i, u, "bilinear", padding)  # noqa: E731
    out_cpu, grads_cpu, grad_out = _forward_backward(fn, [image, ddf])
    out_gpu, grads_gpu, _ = _forward_backward(fn, [image.cuda(), ddf.cuda()], grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("image_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ddf_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_accumulates_in_float32(image_dtype, ddf_dtype):
    image = torch.randn(2, 2, 8, 8, 8).to(image_dtype)
    ddf = random_ddf(2, 8, 8, 8).to(ddf_dtype)
    fn = lambda i, u: da.warp(i, u, "bilinear", "border")  # noqa: E731
    out, grads, grad_out = _forward_backward(fn, [image.cuda(), ddf.cuda()])
    assert out.dtype == image_dtype and grads[0].dtype == image_dtype and grads[1].dtype == ddf_dtype
    # Reference: the same (rounded) values in float32 on the CPU.
    out_ref, grads_ref, _ = _forward_backward(fn, [image.float(), ddf.float()], grad_out.float().cpu())
    tol = dict(rtol=2e-2, atol=2e-2) if torch.bfloat16 in (image_dtype, ddf_dtype) else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.float().cpu(), out_ref, **tol)
    torch.testing.assert_close(grads[0].float().cpu(), grads_ref[0], **tol)
    torch.testing.assert_close(grads[1].float().cpu(), grads_ref[1], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_cuda(layout):
    input = to_layout(torch.randn(2, 3, 6, 5, 4, device="cuda"), layout)
    grid = to_layout(random_grid(2, 3, 4, 5, device="cuda"), layout)
    torch.testing.assert_close(da.grid_sample(input, grid), F.grid_sample(input, grid, align_corners=False))


def test_gradcheck_cuda_float64():
    image = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    ddf = (random_ddf(1, 4, 5, 3, dtype=torch.float64, device="cuda").round() + 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, u: da.warp(i, u, "bilinear", "zeros"), (image, ddf), eps=1e-6,
                                    atol=1e-6)


def test_forced_64_bit_indexing_cuda(monkeypatch):
    input = torch.randn(2, 3, 5, 6, 7, device="cuda")
    grid = random_grid(2, 4, 4, 4, device="cuda")
    expected = da.grid_sample(input, grid)
    monkeypatch.setenv("DEEPATLAS_FORCE_INDEX64", "1")
    torch.testing.assert_close(da.grid_sample(input, grid), expected, rtol=0, atol=0)


def test_runs_on_the_current_stream():
    """The kernel runs on the current (side) stream, after the work queued there before it: its input is written
    by a slow side-stream op, so a launch on another stream would read it unwritten."""
    image = torch.randn(1, 1, 32, 32, 32, device="cuda")
    ddf = random_ddf(1, 32, 32, 32, device="cuda")
    expected = da.warp(image + 1, ddf)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000_000)  # delays the side stream's next op by about half a second
        shifted = image + 1
        out = da.warp(shifted, ddf)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_does_not_wait_for_the_default_stream():
    """On a side stream the op neither blocks the host nor waits for the busy default stream (compute-sanitizer
    serialises kernels, so scripts/gpu_check.sh leaves this test out of its sanitizer runs)."""
    image = torch.randn(1, 1, 32, 32, 32, device="cuda")
    ddf = random_ddf(1, 32, 32, 32, device="cuda")
    expected = da.warp(image, ddf)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    torch.cuda._sleep(2_000_000_000)  # keeps the default stream busy for about a second
    with torch.cuda.stream(stream):
        out = da.warp(image, ddf)
    stream.synchronize()
    assert not torch.cuda.default_stream().query(), "the warp waited for the default stream"
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_reflection_of_huge_coordinates_cuda_matches_cpu(align_corners):
    """Coordinates far beyond 2^63 voxels reflect the same way on both (no float-to-integer cast out of range: it
    saturates on a GPU and is undefined on the CPU)."""
    input = torch.randn(1, 2, 4, 5, 6)
    grid = random_grid(1, 4, 4, 4)
    huge = torch.tensor([1e12, -1e12, 1e20, -1e20, 3e38, -3e38])
    mask = torch.rand(grid.shape) < 0.5
    grid[mask] = huge[torch.randint(len(huge), (int(mask.sum()),))]
    fn = lambda i, g: da.grid_sample(i, g, "bilinear", "reflection", align_corners)  # noqa: E731
    out_cpu, grads_cpu, grad_out = _forward_backward(fn, [input, grid])
    out_gpu, grads_gpu, _ = _forward_backward(fn, [input.cuda(), grid.cuda()], grad_out)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_opcheck_cuda():
    input = torch.randn(2, 3, 4, 5, 6, device="cuda")
    grid = random_grid(2, 3, 4, 2, special=False, device="cuda")
    torch.library.opcheck(torch.ops.deepatlas.grid_sample_3d.default, (input, grid, 0, 1, False))
    ddf = random_ddf(2, 4, 5, 6, device="cuda")
    torch.library.opcheck(torch.ops.deepatlas.warp.default, (input, ddf, 0, 1))


@pytest.mark.parametrize("op", ["warp", "grid_sample"])
def test_deterministic_input_gradient_cuda(op):
    """Under torch.use_deterministic_algorithms(True) the input gradient takes the pair path (no atomics): two runs
    are bit-identical, and both match the CPU."""
    image = torch.randn(1 if op == "warp" else 2, 2, 24, 20, 16)  # warp: an image broadcast over the batch
    coords = random_ddf(2, 24, 20, 16, scale=3.0) if op == "warp" else random_grid(2, 24, 20, 16)
    fn = (lambda i, u: da.warp(i, u, "bilinear", "zeros")) if op == "warp" else da.grid_sample  # noqa: E731
    _, grads_cpu, grad_out = _forward_backward(fn, [image, coords])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_forward_backward(fn, [image.cuda(), coords.cuda()], grad_out)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][0].cpu(), grads_cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1].cpu(), grads_cpu[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source_kind", ["labels", "probabilities"])
def test_warped_dice_is_deterministic_under_deterministic_algorithms(source_kind):
    """Under torch.use_deterministic_algorithms(True), warped_dice takes the unfused path (no atomics): no error, two
    runs bit-identical in value and gradients, equal to the CPU."""
    generator = torch.Generator().manual_seed(2)
    shape, k = (10, 9, 8), 5
    ddf = random_ddf(2, *shape, scale=2.0)
    target = torch.rand(2, k, *shape, generator=generator).softmax(1)
    source = (torch.randint(0, k, (1, 1, *shape), generator=generator) if source_kind == "labels"
              else torch.rand(1, k, *shape, generator=generator))

    def run(device):
        inputs = [t.to(device) for t in (source, ddf, target)]
        inputs = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
        dice = da.warped_dice(*inputs, num_classes=k)
        return (dice, *torch.autograd.grad(dice.sum(), [t for t in inputs if t.requires_grad]))

    cpu = run("cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run("cuda") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(*runs, cpu):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_grid_sample_reduced_precision_cuda(dtype, mode, padding):
    """grid_sample in float16 / bfloat16 against float32 on the CPU from the same rounded values."""
    input = torch.randn(2, 3, 5, 6, 7).to(dtype)
    grid = random_grid(2, 4, 5, 3, special=False).to(dtype)
    fn = lambda i, g: da.grid_sample(i, g, mode, padding, False)  # noqa: E731
    out, grads, grad_out = _forward_backward(fn, [input.cuda(), grid.cuda()])
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    out_ref, grads_ref, _ = _forward_backward(fn, [input.float(), grid.float()], grad_out.float().cpu())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.float().cpu(), out_ref, **tol)
    torch.testing.assert_close(grads[0].float().cpu(), grads_ref[0], **tol)
    if mode == "bilinear":  # nearest has no grid gradient
        torch.testing.assert_close(grads[1].float().cpu(), grads_ref[1], rtol=5e-2, atol=5e-2)
