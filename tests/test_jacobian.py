"""jacobian_det and folding_stats against plain finite differences, analytic fields, and gradients."""

import pytest
import torch
from helpers import random_ddf

import deepatlas_cuda as da
from deepatlas_cuda import reference

SCHEMES = ["central", "forward", "backward"]


def affine_ddf(matrix, shape, dtype=torch.float64):
    """u(x) = (A - I) x, so that x + u(x) = A x."""
    grid = reference.identity_grid(shape, dtype)  # [3, D, H, W]
    moved = torch.einsum("ij,jdhw->idhw", matrix.to(dtype), grid)
    return (moved - grid).unsqueeze(0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 6, 7), (2, 3, 4), (1, 4, 5)], ids=str)
def test_matches_plain_finite_differences(scheme, dtype, shape):
    ddf = random_ddf(2, *shape, dtype=dtype)
    spacing = (1.0, 2.0, 0.5)
    ours = da.jacobian_det(ddf, spacing, scheme)
    torch.testing.assert_close(ours, reference.jacobian_det(ddf, spacing, scheme),
                               **({"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_matches_autograd_through_the_reference(scheme):
    ddf = random_ddf(2, 4, 5, 6, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(2, 1, 4, 5, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad(da.jacobian_det(ddf, (1.0, 0.5, 2.0), scheme), ddf, grad_out)
    (theirs,) = torch.autograd.grad(reference.jacobian_det(ddf, (1.0, 0.5, 2.0), scheme), ddf, grad_out)
    torch.testing.assert_close(ours, theirs)


def mixed_reference(ddf, spacing, schemes):
    """reference.jacobian_det with its own scheme per axis (the op accepts one code per axis)."""
    names = {0: "central", 1: "forward", 2: "backward"}
    columns = [reference._difference(ddf, 2 + j, names[schemes[j]]) / spacing[j] for j in range(3)]
    jac = torch.stack(columns, dim=2) + torch.eye(3, dtype=ddf.dtype).view(1, 3, 3, 1, 1, 1)
    return torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2)).unsqueeze(1)


# Every axis length from 1 to 7 (the one-sided borders and the interior loop meet differently on each), and sizes
# with a long interior.
GRADIENT_SHAPES = [(1, 2, 3), (2, 1, 7), (3, 4, 1), (4, 5, 6), (5, 6, 7), (7, 3, 2), (6, 9, 12), (11, 8, 10)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", GRADIENT_SHAPES, ids=str)
def test_gradient_matches_reference_for_every_border_layout(scheme, shape):
    torch.manual_seed(sum(shape))
    ddf = random_ddf(2, *shape, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(2, 1, *shape, dtype=torch.float64)
    spacing = (0.7, 1.3, 2.0)
    det = da.jacobian_det(ddf, spacing, scheme)
    expected = reference.jacobian_det(ddf, spacing, scheme)
    torch.testing.assert_close(det, expected)
    (ours,) = torch.autograd.grad(det, ddf, grad_out)
    (theirs,) = torch.autograd.grad(expected, ddf, grad_out)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("schemes", [[0, 1, 2], [2, 0, 1], [1, 2, 0]], ids=str)
def test_mixed_schemes_per_axis_match_reference(schemes):
    ddf = random_ddf(1, 6, 7, 9, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(1, 1, 6, 7, 9, dtype=torch.float64)
    spacing = [1.5, 0.5, 1.0]
    det = torch.ops.deepatlas.jacobian_det(ddf, spacing, schemes)
    expected = mixed_reference(ddf, spacing, schemes)
    torch.testing.assert_close(det, expected)
    torch.testing.assert_close(torch.autograd.grad(det, ddf, grad_out)[0],
                               torch.autograd.grad(expected, ddf, grad_out)[0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_gradient_on_a_smooth_field(scheme):
    # A field like the benchmarks' (smooth, several voxels of displacement): float32 against the float64 reference.
    coarse = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64) * 3
    ddf64 = torch.nn.functional.interpolate(coarse, size=(20, 24, 28), mode="trilinear", align_corners=True)
    grad_out = torch.randn(1, 1, 20, 24, 28, dtype=torch.float64)
    ddf32 = ddf64.float().requires_grad_()
    det = da.jacobian_det(ddf32, (1.0, 1.5, 0.8), scheme)
    (ours,) = torch.autograd.grad(det, ddf32, grad_out.float())
    ddf64.requires_grad_()
    expected = reference.jacobian_det(ddf64, (1.0, 1.5, 0.8), scheme)
    (theirs,) = torch.autograd.grad(expected, ddf64, grad_out)
    torch.testing.assert_close(det.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_for_any_thread_count(scheme, dtype, restore_threads):
    # Batch 2 and 37 planes: the backward's chunks of z-planes start and end at different planes (and cross the
    # batch boundary) for every thread count.
    ddf = random_ddf(2, 37, 9, 20, dtype=dtype, scale=3.0)
    grad_out = torch.randn(2, 1, 37, 9, 20, dtype=dtype)
    results = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        u = ddf.clone().requires_grad_()
        det = da.jacobian_det(u, (1.0, 0.5, 2.0), scheme)
        (grad,) = torch.autograd.grad(det, u, grad_out)
        results.append((det, grad))
    for det, grad in results[1:]:
        assert torch.equal(det, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_inputs_and_expanded_grad(layout):
    from helpers import to_layout

    ddf = random_ddf(2, 5, 6, 7, dtype=torch.float64)
    grad_out = torch.randn(2, 1, 5, 6, 7, dtype=torch.float64)
    u = ddf.clone().requires_grad_()
    det = da.jacobian_det(u, (1.0, 2.0, 0.5))
    (grad,) = torch.autograd.grad(det, u, grad_out)
    v = to_layout(ddf, layout).requires_grad_()
    det_v = da.jacobian_det(v, (1.0, 2.0, 0.5))
    assert torch.equal(det_v, det)
    assert torch.equal(torch.autograd.grad(det_v, v, to_layout(grad_out, layout))[0], grad)
    # The gradient of a sum arrives expanded (all strides 0).
    (grad_sum,) = torch.autograd.grad(da.jacobian_det(u, (1.0, 2.0, 0.5)).sum(), u)
    det = da.jacobian_det(u, (1.0, 2.0, 0.5))
    assert torch.equal(grad_sum, torch.autograd.grad(det, u, torch.ones_like(grad_out))[0])


def test_identity_field_has_determinant_exactly_one():
    det = da.jacobian_det(torch.zeros(2, 3, 4, 5, 6))
    assert torch.equal(det, torch.ones(2, 1, 4, 5, 6))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_affine_field_has_determinant_det_a_everywhere(scheme):
    matrix = torch.tensor([[1.2, 0.1, -0.2], [0.05, 0.9, 0.1], [0.3, -0.1, 1.1]], dtype=torch.float64)
    det = da.jacobian_det(affine_ddf(matrix, (6, 7, 5)), scheme=scheme)
    torch.testing.assert_close(det, torch.full_like(det, torch.linalg.det(matrix).item()))


def test_folding_field_is_negative_where_it_folds():
    ddf = torch.zeros(1, 3, 8, 8, 12, dtype=torch.float64)
    x = torch.arange(12, dtype=torch.float64)
    ddf[:, 2] = torch.where((x >= 4) & (x < 8), -2.0 * (x - 4), torch.where(x >= 8, -8.0, 0.0))  # x + u runs back
    det = da.jacobian_det(ddf, scheme="forward")[0, 0]
    assert torch.all(det[..., 4:7] < 0) and torch.all(det[..., :3] > 0) and torch.all(det[..., 8:] > 0)


def test_spacing_scales_derivatives():
    ddf = affine_ddf(torch.diag(torch.tensor([2.0, 1.0, 1.0])), (4, 4, 4))  # du_z/dz = 1 per voxel
    det = da.jacobian_det(ddf, spacing=(2.0, 1.0, 1.0))  # ... = 0.5 per unit of spacing
    torch.testing.assert_close(det, torch.full_like(det, 1.5))


def test_gradcheck_float64():
    ddf = random_ddf(1, 3, 4, 5, dtype=torch.float64).requires_grad_()
    for scheme in SCHEMES:
        assert torch.autograd.gradcheck(lambda u: da.jacobian_det(u, (1.0, 2.0, 1.5), scheme), (ddf,))


def test_saves_only_the_ddf():
    ddf = random_ddf(1, 4, 4, 4).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        det = da.jacobian_det(ddf)
    assert {t.data_ptr() for t in saved} <= {ddf.data_ptr()}
    det.sum().backward()


def test_folding_stats_counts_and_log_det_spread():
    ddf = random_ddf(2, 6, 6, 6, dtype=torch.float64, scale=0.6)
    stats = da.folding_stats(ddf)
    det = reference.jacobian_det(ddf).flatten(1)
    torch.testing.assert_close(stats["num_folded"], (det <= 0).sum(1))
    torch.testing.assert_close(stats["fraction_folded"], (det <= 0).double().mean(1))
    expected = torch.stack([row[row > 0].log().std(unbiased=False) for row in det])
    torch.testing.assert_close(stats["std_log_det"], expected)


def test_folding_stats_of_a_field_with_nan_are_nan_not_zero():
    """A NaN displacement (a diverged network) must not read as a field without folds."""
    ddf = random_ddf(2, 6, 6, 6, dtype=torch.float64, scale=0.1)
    ddf[1, 0, 2, 3, 3] = float("nan")
    for strict in (False, True):
        stats = da.folding_stats(ddf, strict=strict)
        det = reference.jacobian_det(ddf).flatten(1)
        assert stats["num_nonfinite"].tolist() == [0, int(det[1].isnan().sum())] and det[1].isnan().sum() > 1
        assert stats["fraction_folded"][1].isnan() and stats["std_log_det"][1].isnan()
        assert stats["fraction_folded"][0] == 0 and 0 < stats["std_log_det"][0] < 1  # the other element: as before


def test_strict_check_catches_folds_central_differences_miss():
    ddf = torch.zeros(1, 3, 4, 4, 10, dtype=torch.float64)
    ddf[:, 2] = 0.75 * (-1.0) ** torch.arange(10, dtype=torch.float64)  # zig-zag: central differences cancel
    # Central differences see folds only in the two border columns, where they fall back to one-sided ones.
    assert da.folding_stats(ddf)["num_folded"].item() == 2 * 4 * 4
    assert da.folding_stats(ddf, strict=True)["num_folded"].item() == 4 * 4 * 10


def test_opcheck():
    ddf = random_ddf(2, 3, 4, 5).requires_grad_()
    torch.library.opcheck(torch.ops.deepatlas.jacobian_det.default, (ddf, [1.0, 2.0, 1.0], [0, 1, 2]))
    torch.library.opcheck(torch.ops.deepatlas.jacobian_det_backward.default,
                          (torch.randn(2, 1, 3, 4, 5), ddf.detach(), [1.0, 1.0, 1.0], [0, 0, 0]))


def test_torch_compile_fullgraph():
    def folding_penalty(ddf):
        return torch.relu(-da.jacobian_det(ddf)).mean() + ddf.square().mean()

    ddf = random_ddf(1, 5, 5, 5, scale=1.5).requires_grad_()
    compiled = torch.compile(folding_penalty, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(ddf), ddf),
                               torch.autograd.grad(folding_penalty(ddf), ddf))


@pytest.mark.parametrize(
    "ddf,kwargs,error,match",
    [
        (torch.zeros(1, 2, 4, 4, 4), {}, ValueError, r"ddf must be \[N, 3, D, H, W\]"),
        (torch.zeros(1, 3, 4, 4, 4, dtype=torch.int32), {}, TypeError, "float32 or float64"),
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (1.0, 0.0, 1.0)}, ValueError, "three positive finite numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (1.0, 1.0)}, ValueError, "three positive finite numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (True, True, True)}, ValueError, "positive finite numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (1.0, float("inf"), 1.0)}, ValueError, "finite numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"scheme": "upwind"}, ValueError, "scheme must be one of"),
    ],
)
def test_bad_arguments(ddf, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.jacobian_det(ddf, **kwargs)


def test_spacing_from_nibabel_numpy_scalars():
    """nibabel's get_zooms() gives numpy float32 scalars: accepted as they are."""
    import numpy as np
    ddf = random_ddf(1, 4, 5, 6, scale=0.5)
    zooms = (np.float32(1.5), np.float32(0.75), np.float64(2.0))
    torch.testing.assert_close(da.jacobian_det(ddf, spacing=zooms), da.jacobian_det(ddf, spacing=(1.5, 0.75, 2.0)))
    assert da.folding_stats(ddf, spacing=zooms)["num_folded"].shape == (1,)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_matches_cpu(scheme, dtype):
    ddf = random_ddf(2, 5, 6, 7, dtype=dtype)
    grad_out = torch.randn(2, 1, 5, 6, 7, dtype=dtype)
    cpu = ddf.clone().requires_grad_()
    gpu = ddf.cuda().requires_grad_()
    det_cpu = da.jacobian_det(cpu, (1.0, 2.0, 0.5), scheme)
    det_gpu = da.jacobian_det(gpu, (1.0, 2.0, 0.5), scheme)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}  # float32: nvcc fuses multiply-adds
    torch.testing.assert_close(det_gpu.cpu(), det_cpu, **tol)
    torch.testing.assert_close(torch.autograd.grad(det_gpu, gpu, grad_out.cuda())[0].cpu(),
                               torch.autograd.grad(det_cpu, cpu, grad_out)[0], **tol)
