"""deepatlas_cuda.grid_sample against torch.nn.functional.grid_sample: forward, both gradients, every option."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, grads, random_grid, to_layout

import deepatlas_cuda as da

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]
SHAPES = [  # (N, C, D, H, W), grid (D', H', W')
    ((2, 3, 5, 6, 7), (4, 5, 3)),
    ((1, 1, 8, 8, 8), (8, 8, 8)),
    ((3, 2, 1, 4, 5), (2, 3, 4)),  # size-1 depth
    ((1, 4, 3, 1, 1), (5, 1, 2)),  # size-1 height and width
]


def _compare(input, grid, mode, padding, align_corners, dtype):
    input = input.detach().requires_grad_()
    grid = grid.detach().requires_grad_()
    ours = da.grid_sample(input, grid, mode, padding, align_corners)
    theirs = F.grid_sample(input, grid, mode, padding, align_corners)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype)
    grad_out = torch.randn_like(theirs)
    assert_close(grads(ours, (input, grid), grad_out), grads(theirs, (input, grid), grad_out), dtype)


@pytest.mark.parametrize("mode,padding,align_corners", list(itertools.product(MODES, PADDINGS, [False, True])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_matches_torch(mode, padding, align_corners, dtype, shapes):
    (n, c, d, h, w), out = shapes
    input = torch.randn(n, c, d, h, w, dtype=dtype)
    grid = random_grid(n, *out, dtype=dtype)
    _compare(input, grid, mode, padding, align_corners, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_layouts(layout, padding):
    input = to_layout(torch.randn(2, 3, 6, 5, 4), layout)
    grid = to_layout(random_grid(2, 3, 4, 5), layout)
    _compare(input, grid, "bilinear", padding, False, torch.float32)


def test_expanded_grad_output():
    input = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    grid = random_grid(1, 3, 3, 3).requires_grad_()
    grad_out = torch.randn(1, 1, 1, 1, 1).expand(1, 2, 3, 3, 3)  # zero strides
    ours = grads(da.grid_sample(input, grid), (input, grid), grad_out)
    theirs = grads(F.grid_sample(input, grid, align_corners=False), (input, grid), grad_out)
    assert_close(ours, theirs, torch.float32)


def test_empty_batch_and_channels():
    for n, c in [(0, 2), (2, 0)]:
        input = torch.randn(n, c, 3, 4, 5, requires_grad=True)
        grid = random_grid(n, 2, 2, 2).requires_grad_()
        out = da.grid_sample(input, grid)
        assert out.shape == (n, c, 2, 2, 2)
        out.sum().backward()
        assert input.grad.shape == input.shape and grid.grad.shape == grid.shape
        assert torch.all(grid.grad == 0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_non_finite_grid_never_reads_outside(padding):
    """NaN samples 0 with gradient 0. +-inf: border padding clamps it to the edge (as torch does); zeros and
    reflection padding sample 0. Finite points are unaffected."""
    input = torch.randn(1, 2, 4, 5, 6, requires_grad=True)
    grid = random_grid(1, 6, 6, 6, special=False)
    kind = torch.randint(0, 4, grid.shape[:-1])  # 0: finite, 1: nan, 2: +inf, 3: -inf, in the y coordinate
    grid[..., 1] = torch.where(kind == 1, float("nan"), grid[..., 1])
    grid[..., 1] = torch.where(kind == 2, float("inf"), grid[..., 1])
    grid[..., 1] = torch.where(kind == 3, -float("inf"), grid[..., 1])
    grid.requires_grad_()
    out = da.grid_sample(input, grid, padding_mode=padding)
    per_point = out.permute(0, 2, 3, 4, 1)  # [N, D', H', W', C]
    expected = F.grid_sample(input, grid, padding_mode=padding, align_corners=False).permute(0, 2, 3, 4, 1)
    assert torch.all(per_point[kind == 1] == 0)
    matches_torch = (kind == 0) | ((kind >= 2) & (padding == "border"))
    assert_close(per_point[matches_torch], expected[matches_torch], torch.float32)
    if padding != "border":
        assert torch.all(per_point[kind >= 2] == 0)
    g_input, g_grid = torch.autograd.grad(out.sum(), (input, grid))
    assert torch.isfinite(g_input).all() and torch.isfinite(g_grid).all()
    assert torch.all(g_grid[kind == 1] == 0)


def test_four_d_input_is_handed_to_torch():
    input = torch.randn(2, 3, 8, 9)
    grid = torch.rand(2, 5, 4, 2) * 2 - 1
    for mode in ["bilinear", "nearest", "bicubic"]:
        torch.testing.assert_close(da.grid_sample(input, grid, mode=mode, align_corners=True),
                                   F.grid_sample(input, grid, mode=mode, align_corners=True))


def test_default_arguments_match_torch():
    input = torch.randn(1, 2, 4, 5, 6)
    grid = random_grid(1, 3, 3, 3)
    torch.testing.assert_close(da.grid_sample(input, grid), F.grid_sample(input, grid, align_corners=False))


def test_forced_64_bit_indexing_matches_32_bit(monkeypatch):
    input = torch.randn(2, 3, 5, 6, 7, requires_grad=True)
    grid = random_grid(2, 4, 4, 4).requires_grad_()
    out32 = da.grid_sample(input, grid, padding_mode="reflection")
    g32 = torch.autograd.grad(out32.square().sum(), (input, grid))
    monkeypatch.setenv("DEEPATLAS_FORCE_INDEX64", "1")
    out64 = da.grid_sample(input, grid, padding_mode="reflection")
    g64 = torch.autograd.grad(out64.square().sum(), (input, grid))
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)
    torch.testing.assert_close(g64, g32, rtol=0, atol=0)


def test_gradcheck_float64():
    input = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    # Stay away from integer voxel coordinates, where trilinear interpolation has kinks.
    for padding in PADDINGS:
        for align_corners in [False, True]:
            grid = random_grid(2, 3, 2, 3, dtype=torch.float64, spread=0.9, special=False)
            grid.requires_grad_()
            assert torch.autograd.gradcheck(
                lambda i, g: da.grid_sample(i, g, "bilinear", padding, align_corners), (input, grid), eps=1e-6,
                atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    input = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    grid = random_grid(2, 3, 4, 2, special=False).requires_grad_()
    torch.library.opcheck(torch.ops.deepatlas.grid_sample_3d.default, (input, grid, ["bilinear", "nearest"].index(mode),
                                                                        1, False))
    grad_out = torch.randn(2, 3, 3, 4, 2)
    torch.library.opcheck(torch.ops.deepatlas.grid_sample_3d_backward.default,
                          (grad_out, input.detach(), grid.detach(), 0, 2, True, [True, True]))
    torch.library.opcheck(torch.ops.deepatlas.grid_sample_3d_backward.default,
                          (grad_out, input.detach(), grid.detach(), 0, 0, False, [False, True]))


def test_torch_compile_fullgraph():
    def loss(input, grid):
        return da.grid_sample(input, grid, padding_mode="border", align_corners=True).square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    input = torch.randn(1, 2, 5, 5, 5, requires_grad=True)
    grid = random_grid(1, 4, 4, 4).requires_grad_()
    expected = torch.autograd.grad(loss(input, grid), (input, grid))
    actual = torch.autograd.grad(compiled(input, grid), (input, grid))
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    "input_shape,grid_shape,kwargs,error,match",
    [
        ((2, 3, 4, 4, 4), (2, 3, 3, 3, 2), {}, ValueError, r"grid must be \[N, D', H', W', 3\]"),
        ((2, 3, 4, 4, 4), (1, 3, 3, 3, 3), {}, ValueError, "grid batch size 1 must equal input batch size 2"),
        ((2, 3, 4, 4, 4), (2, 3, 3, 3, 3), {"mode": "cubic"}, ValueError, "mode must be one of"),
        ((2, 3, 4, 4, 4), (2, 3, 3, 3, 3), {"padding_mode": "wrap"}, ValueError, "padding_mode must be one of"),
        ((2, 3, 0, 4, 4), (2, 3, 3, 3, 3), {}, ValueError, "non-empty spatial dimensions"),
        ((2, 3, 4, 4, 4), (2, 3, 3, 3), {}, ValueError, "grid must be 5-D"),
    ],
)
def test_bad_arguments(input_shape, grid_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.grid_sample(torch.randn(input_shape), torch.rand(grid_shape), **kwargs)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        da.grid_sample(torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="both float32 or both float64"):
        da.grid_sample(torch.randn(1, 1, 2, 2, 2), torch.rand(1, 2, 2, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="both float32 or both float64"):
        da.grid_sample(torch.randn(1, 1, 2, 2, 2).half(), torch.rand(1, 2, 2, 2, 3).half())


def test_native_op_rejects_bad_shapes_without_crashing():
    with pytest.raises(RuntimeError, match="grid must be"):
        torch.ops.deepatlas.grid_sample_3d(torch.randn(1, 1, 2, 2, 2), torch.rand(1, 2, 2, 2, 4), 0, 0, False)
    with pytest.raises(RuntimeError, match="interpolation code"):
        torch.ops.deepatlas.grid_sample_3d(torch.randn(1, 1, 2, 2, 2), torch.rand(1, 2, 2, 2, 3), 7, 0, False)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_pair_scatter_equals_scatter(monkeypatch, mode, align_corners):
    """grid_sample's input gradient by pairs (the deterministic CUDA path, forced on the CPU) equals the scatter."""
    input = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    grid = random_grid(2, 4, 5, 3, dtype=torch.float64, spread=1.3).requires_grad_()
    grad_out = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    expected = grads(da.grid_sample(input, grid, mode, "zeros", align_corners), (input, grid), grad_out)
    monkeypatch.setenv("DEEPATLAS_FORCE_PAIR_SCATTER", "1")
    actual = grads(da.grid_sample(input, grid, mode, "zeros", align_corners), (input, grid), grad_out)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(actual[1], expected[1])
