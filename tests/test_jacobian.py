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
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (1.0, 0.0, 1.0)}, ValueError, "three positive numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"spacing": (1.0, 1.0)}, ValueError, "three positive numbers"),
        (torch.zeros(1, 3, 4, 4, 4), {"scheme": "upwind"}, ValueError, "scheme must be one of"),
    ],
)
def test_bad_arguments(ddf, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.jacobian_det(ddf, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_matches_cpu(scheme):
    ddf = random_ddf(2, 5, 6, 7, dtype=torch.float64)
    grad_out = torch.randn(2, 1, 5, 6, 7, dtype=torch.float64)
    cpu = ddf.clone().requires_grad_()
    gpu = ddf.cuda().requires_grad_()
    det_cpu = da.jacobian_det(cpu, (1.0, 2.0, 0.5), scheme)
    det_gpu = da.jacobian_det(gpu, (1.0, 2.0, 0.5), scheme)
    torch.testing.assert_close(det_gpu.cpu(), det_cpu)
    torch.testing.assert_close(torch.autograd.grad(det_gpu, gpu, grad_out.cuda())[0].cpu(),
                               torch.autograd.grad(det_cpu, cpu, grad_out)[0])
