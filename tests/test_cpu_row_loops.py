"""The CPU's row loops (csrc/cpu/sample_rows.h) against the per-point functions that CUDA runs.

The CPU computes trilinear grid_sample / warp, their coordinate gradients and the image-gradient scatter a row of
points at a time, in two passes; DEEPATLAS_CPU_PER_POINT=1 makes it call the per-point functions of
deepatlas/warp.h instead, the code the CUDA kernels run. Same arithmetic in the same order, so the two must be
bit-identical: on every padding mode, both align_corners, both dtypes, broadcast images, strided and channels-last
layouts, rows that are not a multiple of the chunk (32 points), points on and far outside the borders, NaN / inf,
and the 64-bit index path. Each test runs the row loops in both of their instruction-set copies (csrc/cpu/isa.h:
AVX2 where the CPU has it, and the SSE2 baseline) against the per-point functions in the baseline copy.
"""

import itertools

import pytest
import torch

import deepatlas_cuda as da
from helpers import NO_AVX2_COPY, avx2_copy_available, random_ddf, random_grid, to_layout

PADDINGS = ("zeros", "border", "reflection")
HAS_AVX2 = avx2_copy_available()


@pytest.fixture(autouse=True, params=["avx2", "baseline"])
def loops_isa(request, monkeypatch):
    """The instruction-set copy the row loops under test run in."""
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip(NO_AVX2_COPY)
    monkeypatch.setenv("DEEPATLAS_CPU_BASELINE", "1" if request.param == "baseline" else "0")
    return request.param


def _forward_and_grads(op, image, coords, grad_out, **kw):
    """(output, grad coords, grad image) with both inputs requiring grad, then grad coords alone (the backward
    without an image gradient is a separate path)."""
    image = image.detach().requires_grad_()
    coords = coords.detach().requires_grad_()
    out = op(image, coords, **kw)
    grad_coords, grad_image = torch.autograd.grad(out, (coords, image), grad_out)
    (grad_coords_alone,) = torch.autograd.grad(op(image.detach(), coords, **kw), coords, grad_out)
    return out.detach(), grad_coords, grad_image, grad_coords_alone


def _both_paths(monkeypatch, op, image, coords, grad_out, **kw):
    """(row loops in the copy under test, per-point functions in the baseline copy)."""
    rows = _forward_and_grads(op, image, coords, grad_out, **kw)
    with monkeypatch.context() as patch:
        patch.setenv("DEEPATLAS_CPU_PER_POINT", "1")
        patch.setenv("DEEPATLAS_CPU_BASELINE", "1")
        per_point = _forward_and_grads(op, image, coords, grad_out, **kw)
    return rows, per_point


def _assert_identical(rows, per_point):
    for a, b in zip(rows, per_point):
        assert torch.equal(a, b), f"max difference {(a - b).abs().nan_to_num().max().item()}"
    # The inputs are random: a result of all zeros would make the comparison meaningless.
    assert all(t.abs().nan_to_num().sum() > 0 for t in rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding,align_corners", list(itertools.product(PADDINGS, [False, True])))
@pytest.mark.parametrize("channels", [1, 3])
def test_grid_sample_rows_equal_per_point(monkeypatch, dtype, padding, align_corners, channels):
    torch.manual_seed(0)
    image = torch.randn(2, channels, 6, 7, 9, dtype=dtype)
    grid = random_grid(2, 5, 4, 71, dtype=dtype)  # 71 = 2 full chunks + 7
    grid[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=dtype)[:, None]
    grad_out = torch.randn(2, channels, 5, 4, 71, dtype=dtype)
    rows, per_point = _both_paths(monkeypatch, da.grid_sample, image, grid, grad_out, mode="bilinear",
                                  padding_mode=padding, align_corners=align_corners)
    _assert_identical(rows, per_point)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_warp_rows_equal_per_point(monkeypatch, dtype, padding, layout):
    torch.manual_seed(1)
    image = to_layout(torch.randn(1, 2, 8, 9, 40, dtype=dtype), layout)  # N = 1 broadcasts over the ddf's batch
    ddf = random_ddf(3, 8, 9, 40, dtype=dtype, scale=4.0)
    ddf[1, :, 2, 3, 5] = torch.tensor([float("nan"), 1e12, -float("inf")], dtype=dtype)
    ddf = to_layout(ddf, layout)
    grad_out = to_layout(torch.randn(3, 2, 8, 9, 40, dtype=dtype), layout)
    rows, per_point = _both_paths(monkeypatch, da.warp, image, ddf, grad_out, mode="bilinear", padding_mode=padding)
    _assert_identical(rows, per_point)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 33), (4, 1, 31), (3, 4, 1)])
def test_thin_volumes_rows_equal_per_point(monkeypatch, shape):
    """Axes of size 1: no point has all 8 corners inside, every one takes the edge path."""
    torch.manual_seed(2)
    image = torch.randn(2, 2, *shape, dtype=torch.float64)
    ddf = random_ddf(2, *shape, dtype=torch.float64, scale=0.7)
    grad_out = torch.randn(2, 2, *shape, dtype=torch.float64)
    for padding in PADDINGS:
        rows, per_point = _both_paths(monkeypatch, da.warp, image, ddf, grad_out, padding_mode=padding)
        for a, b in zip(rows, per_point):
            assert torch.equal(a, b)


def test_64bit_index_path_rows_equal_per_point(monkeypatch):
    monkeypatch.setenv("DEEPATLAS_FORCE_INDEX64", "1")
    torch.manual_seed(3)
    image = torch.randn(2, 2, 7, 8, 45)
    ddf = random_ddf(2, 7, 8, 45, scale=3.0)
    grad_out = torch.randn(2, 2, 7, 8, 45)
    rows, per_point = _both_paths(monkeypatch, da.warp, image, ddf, grad_out)
    _assert_identical(rows, per_point)
