"""Evaluation metrics: hand examples, absent classes, shifted cubes, numpy/torch inputs."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from deepatlas.metrics import (dice_per_class, hausdorff95, mean_foreground_dice, registration_metrics,
                               segmentation_metrics)


def random_labels(*shape, k=4):
    return torch.randint(0, k, shape, dtype=torch.int64)


def test_dice_hand_example():
    target = torch.tensor([0, 1, 1, 2]).view(1, 1, 4)
    pred = torch.tensor([0, 1, 2, 2]).view(1, 1, 4)
    dice = dice_per_class(pred, target, 4)
    assert dice.dtype == torch.float64 and dice.shape == (4,)
    torch.testing.assert_close(dice[:3], torch.tensor([1.0, 2 / 3, 2 / 3], dtype=torch.float64))
    assert math.isnan(dice[3])  # absent from both maps
    assert mean_foreground_dice(pred, target, 4).item() == pytest.approx(2 / 3)


def test_identical_maps_and_absent_classes():
    labels = random_labels(12, 10, 8, k=4)
    labels[labels == 2] = 3  # class 2 absent from both maps
    dice = dice_per_class(labels, labels, 5)
    assert dice[[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]
    assert math.isnan(dice[2]) and math.isnan(dice[4])
    assert mean_foreground_dice(labels, labels, 5).item() == 1.0  # skipped, not NaN
    other = random_labels(12, 10, 8, k=4)
    score = mean_foreground_dice(labels, other, 5).item()
    assert 0 < score < 1 and not math.isnan(score)


def test_no_foreground_gives_nan_and_class_in_one_map_gives_zero():
    background = torch.zeros(4, 4, 4, dtype=torch.int64)
    assert math.isnan(mean_foreground_dice(background, background, 3).item())
    one = background.clone()
    one[1, 1, 1] = 2
    assert dice_per_class(one, background, 3)[2].item() == 0.0
    assert mean_foreground_dice(one, background, 3).item() == 0.0


def test_batched_and_numpy_inputs():
    pred, target = random_labels(3, 1, 6, 7, 8), random_labels(3, 1, 6, 7, 8)
    batched = dice_per_class(pred, target, 4)
    assert batched.shape == (3, 4)
    for n in range(3):
        torch.testing.assert_close(batched[n], dice_per_class(pred[n, 0], target[n, 0], 4))
    torch.testing.assert_close(dice_per_class(pred.numpy().astype(np.int16), target.numpy(), 4), batched)
    assert mean_foreground_dice(pred, target, 4).shape == (3,)


def test_dice_errors():
    labels = random_labels(4, 4, 4)
    with pytest.raises(ValueError, match="num_classes=3"):
        dice_per_class(labels, labels, 3)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(labels, labels[:2], 4)
    with pytest.raises(ValueError, match="integer labels"):
        dice_per_class(labels.float(), labels, 4)
    with pytest.raises(ValueError, match=r"\[D, H, W\] or \[N, 1, D, H, W\]"):
        dice_per_class(labels[None], labels[None], 4)


def cube(shape, start, size, label=1):
    volume = np.zeros(shape, dtype=np.int64)
    volume[tuple(slice(s, s + size) for s in start)] = label
    return volume


@pytest.mark.parametrize("spacing, expected", [((1.0, 1.0, 1.0), 3.0), ((1.0, 2.0, 1.0), 6.0)])
def test_hausdorff95_of_shifted_cube_is_the_shift(spacing, expected):
    target = cube((24, 24, 24), (6, 6, 6), 10)
    pred = cube((24, 24, 24), (6, 9, 6), 10)  # shifted by 3 voxels along H
    hd = hausdorff95(pred, target, 2, spacing)
    assert math.isnan(hd[0])  # background skipped by default
    assert hd[1].item() == pytest.approx(expected)
    assert hausdorff95(target, target, 2)[1].item() == 0.0


def brute_force_hd95(pred, target):
    def surface_points(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0)).astype(float)

    distances = cdist(surface_points(pred), surface_points(target))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_hausdorff95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    pred = ndimage.binary_dilation(rng.random((12, 12, 12)) > 0.97, iterations=2)
    target = ndimage.binary_dilation(rng.random((12, 12, 12)) > 0.97, iterations=2)
    hd = hausdorff95(pred.astype(np.int64), target.astype(np.int64), 2, include_background=True)
    assert hd[1].item() == pytest.approx(brute_force_hd95(pred, target))
    assert hd[0].item() == pytest.approx(brute_force_hd95(~pred, ~target))


def test_hausdorff95_absent_and_one_sided_classes_batched():
    target = cube((12, 12, 12), (2, 2, 2), 5, label=1)
    pred = target.copy()
    pred[8:10, 8:10, 8:10] = 2  # class 2 only in pred; class 3 in neither
    hd = hausdorff95(pred[None, None], target[None, None], 4)
    assert hd.shape == (1, 4)
    assert hd[0, 1].item() == 0.0 and math.isinf(hd[0, 2]) and math.isnan(hd[0, 3])


def test_registration_metrics():
    moving = random_labels(1, 1, 8, 8, 8, k=3)
    fixed = random_labels(1, 1, 8, 8, 8, k=3)
    identity = torch.zeros(1, 3, 8, 8, 8)
    result = registration_metrics(moving, moving, identity, 3)
    assert result == {"reg_dice": 1.0, "folding_pct": 0.0, "std_log_det": 0.0}
    shift = identity.clone()
    shift[:, 2] = 1.0  # out[x] = moving[x + e_W]; label 0 comes in from outside
    shifted = torch.zeros_like(moving)
    shifted[..., :-1] = moving[..., 1:]
    result = registration_metrics(moving, fixed, shift, 3)
    assert result["reg_dice"] == pytest.approx(mean_foreground_dice(shifted, fixed, 3).item())
    assert result["folding_pct"] == 0.0
    with_classes = registration_metrics(moving, fixed, shift, 3, per_class=True)
    torch.testing.assert_close(with_classes.pop("reg_dice_per_class"), dice_per_class(shifted, fixed, 3),
                               equal_nan=True)
    assert with_classes == result
    flip = identity.clone()
    flip[:, 0] = -2 * torch.arange(8.0).view(8, 1, 1)  # det = -1 everywhere
    assert registration_metrics(moving, fixed, flip, 3)["folding_pct"] == 100.0
    broken = torch.cat([identity, identity])
    broken[1, 0, 3, 3, 3] = float("nan")  # a diverged network: its folding is unknown, never 0 or skipped
    two = registration_metrics(torch.cat([moving, moving]), torch.cat([moving, moving]), broken, 3)
    assert math.isnan(two["folding_pct"]) and math.isnan(two["std_log_det"])


def test_segmentation_metrics():
    pred, labels = random_labels(2, 1, 6, 6, 6, k=3), random_labels(2, 1, 6, 6, 6, k=3)
    expected = mean_foreground_dice(pred, labels, 3).mean().item()
    assert segmentation_metrics(pred, labels, 3) == {"seg_dice": pytest.approx(expected)}
    assert segmentation_metrics(labels.numpy(), labels.numpy(), 3)["seg_dice"] == 1.0
    with_classes = segmentation_metrics(pred, labels, 3, per_class=True)
    torch.testing.assert_close(with_classes.pop("seg_dice_per_class"), dice_per_class(pred, labels, 3),
                               equal_nan=True)
    assert with_classes == segmentation_metrics(pred, labels, 3)
