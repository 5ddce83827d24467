"""Evaluation on labelled held-out images: registration Dice over test pairs (moving labels warped with nearest
``warp_labels``), segmentation Dice of F_S, folding from ``folding_stats``. Dice is the mean over foreground
structures; structures absent from both maps are skipped, never NaN."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import metrics


def test_pairs(count: int, max_pairs: int) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` ordered pairs (moving, fixed) of distinct test images, spread over all of them
    deterministically (every image appears as moving and as fixed before any pair repeats an image's role)."""
    pairs = [(m, (m + shift) % count) for shift in range(1, count) for m in range(count)]
    return pairs[:max_pairs]


@torch.no_grad()
def evaluate_registration(reg_net: nn.Module, images: Tensor, labels: Tensor, num_classes: int,
                          max_pairs: int = 12) -> dict[str, float]:
    """``images`` [T, 1, D, H, W], ``labels`` [T, 1, D, H, W] int. Means over the test pairs of ``reg_dice``,
    ``folding_pct`` and ``std_log_det``, the per-structure Dice ``reg_dice_per_class`` (K entries, NaN for
    structures absent from every pair), and ``reg_dice_before``: the Dice of the unregistered pairs."""
    if images.shape[0] < 2:
        raise ValueError(f"registration evaluation needs at least 2 test images, got {images.shape[0]}")
    was_training = reg_net.training
    reg_net.eval()
    rows, per_class, before = [], [], []
    for moving, fixed in test_pairs(images.shape[0], max_pairs):
        before.append(float(metrics.mean_foreground_dice(labels[moving, 0], labels[fixed, 0], num_classes)))
        ddf = reg_net(images[moving:moving + 1], images[fixed:fixed + 1]).float()
        row = metrics.registration_metrics(labels[moving:moving + 1], labels[fixed:fixed + 1], ddf, num_classes,
                                           per_class=True)
        per_class.append(row.pop("reg_dice_per_class").reshape(-1))
        rows.append(row)
    reg_net.train(was_training)
    result = {"reg_dice": _mean([float(row["reg_dice"]) for row in rows])}
    # A NaN folding figure is a broken field (non-finite determinants), not a missing value: it is not skipped.
    result.update({key: sum(float(row[key]) for row in rows) / len(rows) for key in ("folding_pct", "std_log_det")})
    result["reg_dice_per_class"] = _nanmean_rows(per_class)
    result["reg_dice_before"] = _mean(before)
    return result


@torch.no_grad()
def evaluate_segmentation(seg_net: nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Mean over test images of F_S's foreground Dice (``seg_dice``) and the per-structure Dice."""
    was_training = seg_net.training
    seg_net.eval()
    scores, per_class = [], []
    for index in range(images.shape[0]):
        prediction = seg_net(images[index:index + 1]).argmax(1, keepdim=True)
        row = metrics.segmentation_metrics(prediction, labels[index:index + 1], num_classes, per_class=True)
        scores.append(row["seg_dice"])
        per_class.append(row["seg_dice_per_class"].reshape(-1))
    seg_net.train(was_training)
    return {"seg_dice": _mean(scores), "seg_dice_per_class": _nanmean_rows(per_class)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nanmean_rows(rows: list[Tensor]) -> list[float]:
    stacked = torch.stack(rows).double()  # [P, K]
    present = ~stacked.isnan()
    sums = torch.where(present, stacked, torch.zeros_like(stacked)).sum(0)
    counts = present.sum(0)
    return [float(s / c) if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())]

