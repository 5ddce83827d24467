"""deepatlas_cuda.warp_labels against one-hot + F.grid_sample (soft) and F.grid_sample(mode='nearest') on
float-cast labels (nearest)."""

import pytest
import torch
from helpers import assert_close, random_ddf

import deepatlas_cuda as da
from deepatlas_cuda import reference

LABEL_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]


def random_labels(n, d, h, w, num_classes, dtype=torch.int64):
    return torch.randint(0, num_classes, (n, 1, d, h, w)).to(dtype)


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
@pytest.mark.parametrize("padding_value", [0, 7])
def test_nearest_matches_grid_sample_on_float_labels(dtype, padding_value):
    labels = random_labels(2, 6, 7, 5, 200 if dtype == torch.uint8 else 1000, dtype)
    ddf = random_ddf(2, 6, 7, 5, scale=3.0).round() + 0.25  # off the rounding ties
    out = da.warp_labels(labels, ddf, padding_value=padding_value)
    assert out.dtype == dtype and out.shape == labels.shape
    assert torch.equal(out, reference.warp_labels_nearest(labels, ddf, padding_value))


def test_nearest_integer_shift_is_exact():
    labels = random_labels(1, 6, 7, 8, 5)
    ddf = torch.zeros(1, 3, 6, 7, 8)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = -1, 2, 1
    out = da.warp_labels(labels, ddf, padding_value=9)
    assert torch.equal(out[..., 1:, :5, :7], labels[..., :5, 2:, 1:])
    assert torch.all(out[..., 0, :, :] == 9) and torch.all(out[..., :, 5:, :] == 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [1, 4, 9])
def test_soft_matches_one_hot_pipeline(dtype, num_classes):
    labels = random_labels(2, 6, 5, 7, num_classes, torch.int16)
    ddf = random_ddf(2, 6, 5, 7, dtype=dtype, scale=2.5).requires_grad_()
    ours = da.warp_labels(labels, ddf, "soft", num_classes=num_classes)
    ddf_ref = ddf.detach().clone().requires_grad_()
    theirs = reference.warp_labels_soft(labels, ddf_ref, num_classes)
    assert ours.dtype == dtype and ours.shape == (2, num_classes, 6, 5, 7)
    assert_close(ours, theirs, dtype)
    grad_out = torch.randn_like(theirs)
    (g_ours,) = torch.autograd.grad(ours, ddf, grad_out)
    (g_ref,) = torch.autograd.grad(theirs, ddf_ref, grad_out)
    assert_close(g_ours, g_ref, dtype)


def test_soft_integer_shift_is_exact_one_hot():
    labels = random_labels(1, 5, 6, 7, 4, torch.uint8)
    ddf = torch.zeros(1, 3, 5, 6, 7)
    ddf[:, 0], ddf[:, 2] = 1, -2
    out = da.warp_labels(labels, ddf, "soft", num_classes=4)
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), 4).permute(0, 4, 1, 2, 3).float()
    assert torch.equal(out[..., :4, :, 2:], one_hot[..., 1:, :, :5])
    assert torch.all(out[..., 4:, :, :] == 0)


def test_soft_sums_to_one_inside():
    labels = random_labels(2, 8, 8, 8, 6)
    ddf = random_ddf(2, 8, 8, 8, scale=0.45)  # every location stays within half a voxel: inside the volume
    total = da.warp_labels(labels, ddf, "soft", num_classes=6)[..., 1:-1, 1:-1, 1:-1].sum(1)
    torch.testing.assert_close(total, torch.ones_like(total))


def test_labels_broadcast_over_batched_ddf():
    labels = random_labels(1, 5, 5, 5, 3)
    ddf = random_ddf(4, 5, 5, 5)
    assert_close(da.warp_labels(labels, ddf, "soft", num_classes=3),
                 reference.warp_labels_soft(labels.expand(4, -1, -1, -1, -1), ddf, 3), torch.float32)


def test_soft_saves_only_labels_and_ddf():
    labels = random_labels(1, 6, 6, 6, 5)
    ddf = random_ddf(1, 6, 6, 6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = da.warp_labels(labels, ddf, "soft", num_classes=5)
    assert {t.data_ptr() for t in saved} <= {labels.data_ptr(), ddf.data_ptr()}
    out.sum().backward()


def test_soft_gradcheck_float64():
    labels = random_labels(2, 4, 3, 5, 3)
    ddf = (random_ddf(2, 4, 3, 5, dtype=torch.float64, scale=1.5).round() + 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: da.warp_labels(labels, u, "soft", num_classes=3), (ddf,), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 5])
def test_out_of_range_labels_are_rejected(bad):
    labels = random_labels(1, 4, 4, 4, 5, torch.int32)
    labels[0, 0, 1, 2, 3] = bad
    with pytest.raises(RuntimeError, match=r"label values must be in \[0, num_classes\) = \[0, 5\)"):
        da.warp_labels(labels, torch.zeros(1, 3, 4, 4, 4), "soft", num_classes=5)


@pytest.mark.parametrize(
    "labels,ddf,kwargs,error,match",
    [
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), {}, TypeError, "integer label map"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.int8), torch.zeros(1, 3, 4, 4, 4), {}, TypeError, "int8"),
        (torch.zeros(1, 2, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 4), {}, ValueError,
         r"labels must be \[N, 1, D, H, W\]"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 4).half(), {}, TypeError,
         "ddf must be float32 or float64"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 5), {}, ValueError,
         "spatial shape"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 4), {"mode": "soft"}, ValueError,
         "needs num_classes"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 4), {"mode": "linear"}, ValueError,
         "mode must be"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8), torch.zeros(1, 3, 4, 4, 4), {"padding_value": 300},
         ValueError, "padding_value"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8), torch.zeros(1, 3, 4, 4, 4), {"padding_value": True},
         ValueError, "padding_value"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4, 4),
         {"mode": "soft", "num_classes": 2.0}, ValueError, "needs num_classes"),
    ],
)
def test_bad_arguments(labels, ddf, kwargs, error, match):
    with pytest.raises(error, match=match):
        da.warp_labels(labels, ddf, **kwargs)


def test_numpy_integers_are_accepted():
    import numpy as np
    labels, ddf = random_labels(1, 4, 5, 3, 4), random_ddf(1, 4, 5, 3)
    torch.testing.assert_close(da.warp_labels(labels, ddf, padding_value=np.int64(2)),
                               da.warp_labels(labels, ddf, padding_value=2))
    torch.testing.assert_close(da.warp_labels(labels, ddf, "soft", num_classes=np.int32(4)),
                               da.warp_labels(labels, ddf, "soft", num_classes=4))


def test_opcheck():
    labels = random_labels(2, 4, 5, 3, 4, torch.int32)
    ddf = random_ddf(2, 4, 5, 3)
    torch.library.opcheck(torch.ops.deepatlas.warp_labels_nearest.default, (labels, ddf, 3))
    torch.library.opcheck(torch.ops.deepatlas.warp_labels_soft.default, (labels, ddf.requires_grad_(), 4))
    torch.library.opcheck(torch.ops.deepatlas.warp_labels_soft_backward.default,
                          (torch.randn(2, 4, 4, 5, 3), labels, ddf.detach(), 4))


def test_torch_compile_fullgraph():
    labels = random_labels(1, 6, 6, 6, 3)

    def loss(ddf):
        soft = da.warp_labels(labels, ddf, "soft", num_classes=3)
        return soft[:, 1:].square().mean()

    ddf = random_ddf(1, 6, 6, 6).requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(ddf), ddf), torch.autograd.grad(loss(ddf), ddf))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_cuda_matches_cpu(dtype):
    labels = random_labels(2, 5, 6, 7, 6, dtype)
    ddf = random_ddf(2, 5, 6, 7)
    assert torch.equal(da.warp_labels(labels.cuda(), ddf.cuda(), padding_value=3).cpu(),
                       da.warp_labels(labels, ddf, padding_value=3))
    ddf_gpu = ddf.cuda().requires_grad_()
    ddf_cpu = ddf.clone().requires_grad_()
    soft_gpu = da.warp_labels(labels.cuda(), ddf_gpu, "soft", num_classes=6)
    soft_cpu = da.warp_labels(labels, ddf_cpu, "soft", num_classes=6)
    torch.testing.assert_close(soft_gpu.cpu(), soft_cpu)
    grad_out = torch.randn_like(soft_cpu)
    (g_gpu,) = torch.autograd.grad(soft_gpu, ddf_gpu, grad_out.cuda())
    (g_cpu,) = torch.autograd.grad(soft_cpu, ddf_cpu, grad_out)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu)
