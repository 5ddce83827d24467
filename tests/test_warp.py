"""deepatlas_cuda.warp against the plain-PyTorch pipeline (identity + ddf, normalise, permute, F.grid_sample)."""

import itertools

import pytest
import torch
from helpers import assert_close, grads, random_ddf, to_layout

import deepatlas_cuda as da
from deepatlas_cuda import reference

MODES = ["bilinear", "nearest"]
PADDINGS = ["border", "zeros", "reflection"]


def _compare(image, ddf, mode, padding, dtype, image_grad=True):
    image = image.detach().requires_grad_(image_grad)
    ddf = ddf.detach().requires_grad_()
    ours = da.warp(image, ddf, mode, padding)
    theirs = reference.warp(image, ddf, mode, padding)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype)
    grad_out = torch.randn_like(theirs)
    inputs = (image, ddf) if image_grad else (ddf,)
    assert_close(grads(ours, inputs, grad_out), grads(theirs, inputs, grad_out), dtype)


@pytest.mark.parametrize("mode,padding", list(itertools.product(MODES, PADDINGS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 1, 8, 8, 8), (3, 2, 2, 4, 3)], ids=str)
def test_matches_pipeline(mode, padding, dtype, shape):
    n, c, d, h, w = shape
    # Displacements are kept off exact integers so that nearest rounding cannot differ between the pipeline's
    # normalise/unnormalise round trip and our direct voxel coordinates.
    ddf = random_ddf(n, d, h, w, dtype=dtype, scale=3.0)
    if mode == "nearest":
        ddf = ddf.round() + 0.25
    _compare(torch.randn(n, c, d, h, w, dtype=dtype), ddf, mode, padding, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    image = to_layout(torch.randn(2, 3, 6, 5, 4), layout)
    ddf = to_layout(random_ddf(2, 6, 5, 4), layout)
    _compare(image, ddf, "bilinear", "border", torch.float32)


def test_image_broadcasts_over_batched_ddf():
    image = torch.randn(1, 2, 6, 7, 5)
    ddf = random_ddf(3, 6, 7, 5)
    _compare(image, ddf, "bilinear", "zeros", torch.float32)


def test_only_ddf_requires_grad():
    _compare(torch.randn(2, 2, 5, 5, 5), random_ddf(2, 5, 5, 5), "bilinear", "border", torch.float32,
             image_grad=False)


def test_zero_displacement_is_identity():
    image = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(da.warp(image, torch.zeros(2, 3, 4, 5, 6)), image, rtol=0, atol=0)


def test_integer_shift_moves_the_volume():
    image = torch.randn(1, 1, 6, 7, 8)
    ddf = torch.zeros(1, 3, 6, 7, 8)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 1, -2, 3  # sample at (z + 1, y - 2, x + 3)
    out = da.warp(image, ddf, padding_mode="zeros")
    torch.testing.assert_close(out[..., :5, 2:, :5], image[..., 1:, :5, 3:], rtol=0, atol=0)
    assert torch.all(out[..., 5:, :, :] == 0) and torch.all(out[..., :, :2, :] == 0)


def test_size_one_axis_samples_at_the_displaced_location():
    """With one slice along an axis the pipeline's normalisation divides by zero; warp samples at x + u."""
    image = torch.randn(1, 2, 1, 4, 5)
    ddf = torch.zeros(1, 3, 1, 4, 5)
    ddf[:, 0] = 0.25  # a quarter voxel off the only slice
    torch.testing.assert_close(da.warp(image, ddf, padding_mode="zeros"), 0.75 * image)
    torch.testing.assert_close(da.warp(image, ddf, padding_mode="border"), image)


def test_saves_only_its_inputs_for_backward():
    image = torch.randn(1, 2, 6, 6, 6, requires_grad=True)
    ddf = random_ddf(1, 6, 6, 6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = da.warp(image, ddf)
    assert {t.data_ptr() for t in saved} <= {image.data_ptr(), ddf.data_ptr()}
    out.sum().backward()


def test_gradcheck_float64():
    image = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    for padding in PADDINGS:
        ddf = (random_ddf(2, 4, 5, 3, dtype=torch.float64, scale=1.5).round() + 0.3).requires_grad_()
        assert torch.autograd.gradcheck(lambda i, u: da.warp(i, u, "bilinear", padding), (image, ddf), eps=1e-6,
                                        atol=1e-6)


def test_broadcast_gradcheck_float64():
    image = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    ddf = (random_ddf(3, 3, 4, 3, dtype=torch.float64).round() + 0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, u: da.warp(i, u, "bilinear", "zeros"), (image, ddf), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("scale", [0.5, 4.0, 40.0])
@pytest.mark.parametrize("image_batch,batch,channels", [(2, 2, 2), (1, 1, 1), (1, 3, 1)])
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "reflection")])
def test_scatter_is_bit_identical_across_thread_counts(scale, image_batch, batch, channels, mode, padding):
    """No atomics, and each input voxel sums its contributions in output-point order whatever the thread count
    (with N = C = 1 the scatter splits the input's z-planes between threads)."""
    image = torch.randn(image_batch, channels, 24, 20, 16, requires_grad=True)
    ddf = random_ddf(batch, 24, 20, 16, scale=scale).requires_grad_()
    grad_out = torch.randn(batch, channels, 24, 20, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            results.append(grads(da.warp(image, ddf, mode, padding), (image, ddf), grad_out))
    finally:
        torch.set_num_threads(threads)
    image64 = image.detach().double().requires_grad_()
    expected = grads(reference.warp(image64, ddf.detach().double(), mode, padding), (image64,), grad_out.double())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    torch.testing.assert_close(results[0][0].double(), expected[0], rtol=1e-5, atol=1e-5)


def test_opcheck():
    image = torch.randn(2, 3, 4, 5, 6)
    ddf = random_ddf(2, 4, 5, 6)
    torch.library.opcheck(torch.ops.deepatlas.warp.default, (image, ddf, 0, 1))
    torch.library.opcheck(torch.ops.deepatlas.warp.default, (image[:1], ddf, 1, 0))
    grad_out = torch.randn(2, 3, 4, 5, 6)
    torch.library.opcheck(torch.ops.deepatlas.warp_backward.default, (grad_out, image, ddf, 0, 2, [True, True]))
    torch.library.opcheck(torch.ops.deepatlas.warp_backward.default, (grad_out, image, ddf, 0, 1, [False, True]))


def test_torch_compile_fullgraph():
    def loss(image, ddf):
        moved = da.warp(image, ddf)
        return (moved - image).square().mean() + ddf.square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    image = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    ddf = random_ddf(1, 6, 6, 6).requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(compiled(image, ddf), (image, ddf)),
                               torch.autograd.grad(loss(image, ddf), (image, ddf)))


@pytest.mark.parametrize(
    "image_shape,ddf_shape,kwargs,error,match",
    [
        ((2, 1, 4, 4, 4), (2, 2, 4, 4, 4), {}, ValueError, "3 displacement channels"),
        ((2, 1, 4, 4, 4), (2, 3, 4, 4, 5), {}, ValueError, "image spatial shape"),
        ((2, 1, 4, 4, 4), (3, 3, 4, 4, 4), {}, ValueError, "image batch size 2 must be 1 or equal the ddf batch"),
        ((2, 1, 4, 4), (2, 3, 4, 4, 4), {}, ValueError, r"image must be 5-D"),
        ((2, 1, 4, 4, 4), (2, 3, 4, 4, 4), {"mode": "bicubic"}, ValueError, "mode must be one of"),
        ((2, 1, 4, 4, 4), (2, 3, 4, 4, 4), {"padding_mode": "circular"}, ValueError, "padding_mode must be one of"),
    ],
)
def test_bad_arguments(image_shape, ddf_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.warp(torch.randn(image_shape), torch.randn(ddf_shape), **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        da.warp([1, 2, 3], torch.randn(1, 3, 2, 2, 2))
    with pytest.raises(TypeError, match="ddf must be a floating-point tensor"):
        da.warp(torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="same device"):
        da.warp(torch.randn(1, 1, 2, 2, 2), torch.randn(1, 3, 2, 2, 2, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("bilinear", "reflection"),
                                          ("nearest", "zeros"), ("nearest", "border")])
@pytest.mark.parametrize("image_batch", [1, 2])
def test_pair_scatter_equals_scatter(monkeypatch, dtype, mode, padding, image_batch):
    """The deterministic pair path that CUDA takes under use_deterministic_algorithms, run on the CPU: the same
    per-point code writes (index, value) pairs that index_put_ sums; it must equal the plain scatter."""
    image = torch.randn(image_batch, 3, 7, 8, 9, dtype=dtype)
    ddf = random_ddf(2, 7, 8, 9, dtype=dtype, scale=3.0)
    grad_out = torch.randn(2, 3, 7, 8, 9, dtype=dtype)
    inputs = (image.requires_grad_(), ddf.requires_grad_())
    expected = grads(da.warp(*inputs, mode, padding), inputs, grad_out)
    monkeypatch.setenv("DEEPATLAS_FORCE_PAIR_SCATTER", "1")
    actual = grads(da.warp(*inputs, mode, padding), inputs, grad_out)
    only_image = grads(da.warp(image, ddf.detach(), mode, padding), (image,), grad_out)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(actual[1], expected[1])
    assert torch.equal(only_image[0], actual[0])
