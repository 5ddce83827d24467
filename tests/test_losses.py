"""Losses against hand-computed values and straightforward references (CPU, float64, tiny volumes)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from deepatlas_cuda.reference import ddf_to_grid, identity_grid
from deepatlas import losses
from deepatlas.losses import (LocalNCCLoss, anatomy_loss, bending_energy_loss, confidence, diffusion_loss,
                              folding_penalty, global_ncc_loss, mse_loss, regulariser_loss, similarity_loss,
                              soft_dice_loss, supervised_loss, weighted_anatomy_loss)

F64 = torch.float64


def rand(*shape):
    return torch.rand(*shape, dtype=F64)


def affine_field(matrix, offset, shape, spacing=(1.0, 1.0, 1.0)):
    """u(x) = matrix @ x + offset with x the physical coordinates (index * spacing), as a ddf [1, 3, *shape]."""
    x = identity_grid(shape, F64) * torch.tensor(spacing, dtype=F64).view(3, 1, 1, 1)
    return (torch.einsum("ij,jdhw->idhw", matrix, x) + offset.view(3, 1, 1, 1)).unsqueeze(0)


# ---- similarity ---------------------------------------------------------------------------------------------------


def test_global_ncc_hand_values():
    x = rand(2, 1, 8, 8, 8)
    assert global_ncc_loss(x, 2.5 * x - 1.0).item() == pytest.approx(0.0, abs=1e-4)
    assert global_ncc_loss(x, -3 * x + 2).item() == pytest.approx(2.0, abs=1e-4)
    noise = rand(2, 1, 16, 16, 16)
    assert global_ncc_loss(rand(2, 1, 16, 16, 16), noise).item() == pytest.approx(1.0, abs=0.05)
    # per batch element, then averaged: one perfectly correlated pair and one anti-correlated pair -> 1
    paired = torch.cat([x[:1], -x[1:]])
    assert global_ncc_loss(x, paired).item() == pytest.approx(1.0, abs=1e-4)
    # against numpy's Pearson correlation
    a, b = rand(1, 2, 4, 5, 6), rand(1, 2, 4, 5, 6)
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert global_ncc_loss(a, b, eps=0).item() == pytest.approx(1 - r.item(), abs=1e-12)


def naive_local_ncc(a, b, window, eps, squared):
    """1 - mean local NCC by explicit loops over voxels and their (clipped) windows, in VoxelMorph's form: eps
    added to the product of the window sums of squared deviations."""
    radius = window // 2
    values = []
    for n, c in itertools.product(range(a.shape[0]), range(a.shape[1])):
        D, H, W = a.shape[2:]
        for z, y, x in itertools.product(range(D), range(H), range(W)):
            box = (slice(max(z - radius, 0), z + radius + 1), slice(max(y - radius, 0), y + radius + 1),
                   slice(max(x - radius, 0), x + radius + 1))
            pa, pb = a[n, c][box].flatten(), b[n, c][box].flatten()
            cross = ((pa - pa.mean()) * (pb - pb.mean())).sum()
            var = ((pa - pa.mean()) ** 2).sum() * ((pb - pb.mean()) ** 2).sum()
            values.append(cross**2 / (var + eps) if squared else cross / (var + eps).sqrt())
    return 1 - torch.stack(values).mean()


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("window", [3, 5])
def test_local_ncc_matches_naive_loops(window, squared):
    a, b = rand(2, 1, 4, 5, 6), rand(2, 1, 4, 5, 6)
    b = 0.5 * a + b  # partly correlated
    loss = LocalNCCLoss(window, eps=1e-2, squared=squared)(a, b)  # an eps large enough to change the result
    torch.testing.assert_close(loss, naive_local_ncc(a, b, window, 1e-2, squared), rtol=1e-10, atol=1e-10)


def test_default_local_ncc_is_zero_for_aligned_images_of_any_contrast():
    """On a smooth image in [0, 1] (local variances ~1e-3), the default eps must not bias the loss: an image
    against itself scores ~0 and a contrast change does not matter (it once scored 0.42, and 0.30 vs 0.53)."""
    noise = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    image = torch.nn.functional.interpolate(noise, size=(24, 24, 24), mode="trilinear", align_corners=True)
    image = (image - image.min()) / (image.max() - image.min())
    loss = LocalNCCLoss(9)
    assert loss(image, image).item() < 1e-4
    assert loss(2 * image, image).item() == pytest.approx(loss(0.5 * image, image).item(), abs=1e-4)
    shifted = torch.roll(image, 2, dims=2)
    assert loss(shifted, image).item() > 0.05  # misaligned images still score worse


def test_local_ncc_properties_and_gradient():
    a = rand(1, 1, 6, 6, 6)
    assert LocalNCCLoss(3, eps=0)(a, 2 * a + 1).item() == pytest.approx(0.0, abs=1e-9)
    assert LocalNCCLoss(3, eps=0, squared=False)(a, -a).item() == pytest.approx(2.0, abs=1e-9)
    # a window covering the whole volume everywhere: the squared global correlation
    b = rand(1, 1, 4, 4, 4)
    c = rand(1, 1, 4, 4, 4)
    r = torch.corrcoef(torch.stack([b.flatten(), c.flatten()]))[0, 1]
    assert LocalNCCLoss(9, eps=0)(b, c).item() == pytest.approx(1 - r.item() ** 2, abs=1e-10)
    moving, fixed = rand(1, 1, 4, 4, 5).requires_grad_(), rand(1, 1, 4, 4, 5)
    assert torch.autograd.gradcheck(lambda m: LocalNCCLoss(3)(m, fixed), (moving,))
    with pytest.raises(ValueError, match="window"):
        LocalNCCLoss(4)


def test_mse_and_similarity_factory():
    a, b = rand(2, 1, 4, 4, 4), rand(2, 1, 4, 4, 4)
    assert mse_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel())
    assert similarity_loss("mse")(a, b) == mse_loss(a, b)
    assert similarity_loss("ncc")(a, b) == global_ncc_loss(a, b)
    assert similarity_loss("lncc", window=3)(a, b) == LocalNCCLoss(3)(a, b)
    with pytest.raises(ValueError, match="name must be"):
        similarity_loss("mi")
    with pytest.raises(ValueError, match="shape"):
        mse_loss(a, b[:1])


# ---- regularisers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_diffusion_of_linear_field_is_sum_of_squared_coefficients(spacing):
    matrix = torch.randn(3, 3, dtype=F64)
    ddf = affine_field(matrix, torch.randn(3, dtype=F64), (5, 6, 7), spacing)
    expected = matrix.square().sum()
    torch.testing.assert_close(diffusion_loss(ddf, spacing), expected, rtol=1e-10, atol=1e-12)


def test_diffusion_of_constant_field_is_zero_and_gradient_is_finite_difference():
    constant = torch.randn(2, 3, 1, 1, 1, dtype=F64).expand(2, 3, 4, 5, 6).contiguous()
    assert diffusion_loss(constant).item() == 0.0  # the original code's "+ neighbour" bug gives > 0 here
    ddf = torch.randn(1, 3, 3, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(diffusion_loss, (ddf,))
    # one axis by hand: the mean over its (n - 1) differences
    field = torch.zeros(1, 3, 2, 1, 1, dtype=F64)
    field[0, 1, 1] = 3.0
    assert diffusion_loss(field).item() == pytest.approx(9.0)


def test_bending_energy_of_affine_field_is_zero():
    ddf = affine_field(torch.randn(3, 3, dtype=F64), torch.randn(3, dtype=F64), (5, 6, 7))
    assert bending_energy_loss(ddf).abs().item() < 1e-10


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.5)])
def test_bending_energy_of_quadratic_field(spacing):
    a, b, c, d = 0.3, -0.7, 1.1, 0.4
    x = identity_grid((5, 6, 7), F64) * torch.tensor(spacing, dtype=F64).view(3, 1, 1, 1)
    ddf = torch.stack([a * x[0] ** 2 + b * x[0] * x[1], c * x[2] ** 2, d * x[1] * x[2]]).unsqueeze(0)
    expected = (2 * a) ** 2 + 2 * b**2 + (2 * c) ** 2 + 2 * d**2
    assert bending_energy_loss(ddf, spacing).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match=">= 3"):
        bending_energy_loss(ddf[..., :2])


def test_folding_penalty():
    identity = torch.zeros(1, 3, 6, 6, 6, dtype=F64)
    assert folding_penalty(identity).item() == 0.0
    scale = torch.diag(torch.tensor([-2.0, 0.0, 0.0], dtype=F64))  # x0 -> -x0: det = -1 everywhere
    folded = affine_field(scale, torch.zeros(3, dtype=F64), (6, 6, 6)).requires_grad_()
    penalty = folding_penalty(folded)
    assert penalty.item() == pytest.approx(1.0)
    penalty.backward()
    assert folded.grad.abs().sum() > 0
    squeeze = affine_field(torch.diag(torch.tensor([-0.7, 0.0, 0.0], dtype=F64)), torch.zeros(3, dtype=F64),
                           (6, 6, 6))  # det = 0.3
    assert folding_penalty(squeeze).item() == 0.0
    assert folding_penalty(squeeze, eps=0.5).item() == pytest.approx(0.2)


def test_regulariser_factory():
    ddf = torch.randn(1, 3, 4, 4, 4, dtype=F64)
    assert regulariser_loss("diffusion")(ddf) == diffusion_loss(ddf)
    assert regulariser_loss("bending", spacing=(2, 2, 2))(ddf) == bending_energy_loss(ddf, (2, 2, 2))
    with pytest.raises(ValueError, match="name must be"):
        regulariser_loss("elastic")


# ---- Dice losses --------------------------------------------------------------------------------------------------


def reference_dice_loss(warped, target, eps=1e-6):
    intersection = (warped * target).flatten(2).sum(-1)
    dice = (2 * intersection + eps) / (warped.flatten(2).sum(-1) + target.flatten(2).sum(-1) + eps)
    return 1 - dice.mean()


def reference_warp(volume, ddf):
    """One-hot / probability maps warped with F.grid_sample (trilinear, zeros outside, align_corners=True)."""
    return F.grid_sample(volume, ddf_to_grid(ddf), mode="bilinear", padding_mode="zeros", align_corners=True)


def one_hot(labels, k):
    return F.one_hot(labels[:, 0].long(), k).permute(0, 4, 1, 2, 3).to(F64)


@pytest.mark.parametrize("source_kind", ["labels", "probabilities"])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_anatomy_loss_matches_reference_and_gradients(source_kind, target_kind):
    k, shape = 4, (2, 1, 6, 7, 8)
    labels = torch.randint(0, k, shape, dtype=torch.int32)
    source = labels if source_kind == "labels" else torch.randn(2, k, *shape[2:], dtype=F64).softmax(1)
    if source_kind == "probabilities":
        source.requires_grad_()
    target = (torch.randint(0, k, shape, dtype=torch.int32) if target_kind == "labels"
              else torch.randn(2, k, *shape[2:], dtype=F64).softmax(1).requires_grad_())
    ddf = (torch.randn(2, 3, *shape[2:], dtype=F64) * 1.5).requires_grad_()

    loss = anatomy_loss(source, ddf, target, k)
    warped_ref = reference_warp(one_hot(source, k) if source_kind == "labels" else source, ddf)
    expected = reference_dice_loss(warped_ref, one_hot(target, k) if target_kind == "labels" else target)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)

    inputs = [t for t in (source, ddf, target) if t.requires_grad]
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(expected, inputs)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_anatomy_loss_identity_and_errors():
    labels = torch.randint(0, 3, (1, 1, 6, 6, 6), dtype=torch.int64)
    zero = torch.zeros(1, 3, 6, 6, 6, dtype=F64)
    assert anatomy_loss(labels, zero, labels, 3).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="num_classes=3"):
        anatomy_loss(torch.rand(1, 2, 6, 6, 6, dtype=F64), zero, labels, 3)
    with pytest.raises(ValueError, match="ddf"):
        anatomy_loss(labels, zero[:, :2], labels, 3)


@pytest.mark.parametrize("source_kind", ["labels", "probabilities"])
def test_weighted_anatomy_loss_is_anatomy_loss_at_weight_one_and_a_weighted_dice_otherwise(source_kind):
    k, shape = 4, (2, 1, 6, 7, 8)
    labels = torch.randint(0, k, shape, dtype=torch.int32)
    source = labels if source_kind == "labels" else torch.randn(2, k, *shape[2:], dtype=F64).softmax(1)
    target = torch.randn(2, k, *shape[2:], dtype=F64).softmax(1)
    ddf = (torch.randn(2, 3, *shape[2:], dtype=F64) * 1.5).requires_grad_()
    ones = torch.ones(shape, dtype=F64)
    torch.testing.assert_close(weighted_anatomy_loss(source, ddf, target, ones, k),
                               anatomy_loss(source, ddf, target, k), rtol=1e-9, atol=1e-12)

    weight = rand(*shape)
    loss = weighted_anatomy_loss(source, ddf, target, weight, k)
    warped = reference_warp(one_hot(source, k) if source_kind == "labels" else source, ddf)
    dice = (2 * (weight * warped * target).sum((2, 3, 4)) + 1e-6) / (
        (weight * warped).sum((2, 3, 4)) + (weight * target).sum((2, 3, 4)) + 1e-6)
    torch.testing.assert_close(loss, 1 - dice.mean(), rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, ddf)
    assert grad.abs().sum() > 0
    # a voxel of weight 0 does not count: a target that is wrong there changes nothing
    zeroed = weight.clone()
    zeroed[:, :, 2:4] = 0
    wrong = target.clone()
    wrong[:, :, 2:4] = target[:, :, 2:4].roll(1, dims=1)
    torch.testing.assert_close(weighted_anatomy_loss(source, ddf, target, zeroed, k),
                               weighted_anatomy_loss(source, ddf, wrong, zeroed, k), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="weight"):
        weighted_anatomy_loss(source, ddf, target, weight[:, :, 1:], k)


def test_confidence_is_zero_for_a_uniform_and_one_for_a_certain_prediction():
    uniform = torch.full((1, 4, 2, 2, 2), 0.25, dtype=F64)
    certain = one_hot(torch.randint(0, 4, (1, 1, 2, 2, 2)), 4)
    assert torch.equal(confidence(uniform), torch.zeros(1, 1, 2, 2, 2, dtype=F64))
    assert torch.equal(confidence(certain), torch.ones(1, 1, 2, 2, 2, dtype=F64))
    halves = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64).view(1, 4, 1, 1, 1)
    assert confidence(halves).item() == pytest.approx((0.5 - 0.25) / 0.75)


def test_soft_dice_loss_values():
    labels = torch.randint(0, 3, (2, 1, 4, 5, 6))
    assert soft_dice_loss(one_hot(labels, 3), labels, 3).item() == pytest.approx(0.0, abs=1e-9)
    # hand example: two classes, half of the voxels each, constant prediction 0.5 -> Dice 0.5 for both classes
    halves = torch.zeros(1, 1, 2, 2, 2, dtype=torch.int64)
    halves[..., 1] = 1
    uniform = torch.full((1, 2, 2, 2, 2), 0.5, dtype=F64)
    assert soft_dice_loss(uniform, halves, 2, eps=0).item() == pytest.approx(0.5)
    probs = torch.randn(2, 3, 4, 5, 6, dtype=F64).softmax(1)
    target = torch.randn(2, 3, 4, 5, 6, dtype=F64).softmax(1)
    torch.testing.assert_close(soft_dice_loss(probs, target), reference_dice_loss(probs, target))
    with pytest.raises(ValueError, match="num_classes=4"):
        soft_dice_loss(probs, labels, 4)


def test_supervised_loss():
    logits = torch.randn(2, 3, 4, 4, 4, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    dice = soft_dice_loss(logits.softmax(1), labels, 3)
    torch.testing.assert_close(supervised_loss(logits, labels), dice)
    expected = dice + 0.5 * F.cross_entropy(logits, labels[:, 0])
    loss = supervised_loss(logits, labels, ce_weight=0.5)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_label_soft_dice_equals_the_one_hot_way_in_value_and_gradient():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, 7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 1, 6, 7, 5), generator=generator)
    labels[1][labels[1] == 3] = 0  # a class absent from one target
    ours = losses.label_soft_dice(logits.softmax(1), labels)
    expected = losses.soft_dice(logits.softmax(1), losses.one_hot(labels, 5, torch.float64))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_expected,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(g_ours, g_expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        losses.label_soft_dice(logits.softmax(1), labels + 1)
