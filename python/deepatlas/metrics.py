"""Evaluation metrics (no gradients): hard Dice, 95th-percentile Hausdorff distance, and the registration /
segmentation summaries of DeepAtlas.

Label maps are integer numpy arrays or torch tensors, either one volume ``[D, H, W]`` or a batch
``[N, 1, D, H, W]``; per-class results are float64 tensors ``[K]`` or ``[N, K]`` respectively, indexed by label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

import deepatlas_cuda as da

__all__ = ["dice_per_class", "hausdorff95", "mean_foreground_dice", "registration_metrics", "segmentation_metrics"]


def _labels(labels, name: str, op: str) -> Tensor:
    """Integer label map (numpy or torch) ``[D, H, W]`` or ``[N, 1, D, H, W]`` -> int64 tensor ``[N, D, H, W]``."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must hold integer labels, got {labels.dtype}")
    if labels.dim() == 3:
        return labels.long().unsqueeze(0)
    if labels.dim() == 5 and labels.shape[1] == 1:
        return labels.long()[:, 0]
    raise ValueError(f"{op}: {name} must be [D, H, W] or [N, 1, D, H, W], got {tuple(labels.shape)}")


def _pair(pred, target, num_classes: int, op: str) -> tuple[Tensor, Tensor, bool]:
    """Both maps as int64 ``[N, D, H, W]`` on the same device, checked; plus whether the input was batched."""
    batched = torch.as_tensor(pred).dim() == 5
    pred, target = _labels(pred, "pred", op), _labels(target, "target", op)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be a positive int, got {num_classes!r}")
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{op}: {name} values must lie in [0, num_classes={num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    return pred, target.to(pred.device), batched


@torch.no_grad()
def dice_per_class(pred, target, num_classes: int) -> Tensor:
    """Hard Dice ``2 |P_k & T_k| / (|P_k| + |T_k|)`` per class k in [0, K): float64 ``[K]`` for ``[D, H, W]`` maps,
    ``[N, K]`` for ``[N, 1, D, H, W]`` ones. NaN where class k is absent from both maps (undefined, not a failure:
    average with :func:`mean_foreground_dice` or ``torch.nanmean``)."""
    pred, target, batched = _pair(pred, target, num_classes, "dice_per_class")
    n = pred.shape[0]
    codes = (target * num_classes + pred).flatten(1) + torch.arange(n, device=pred.device)[:, None] * num_classes**2
    confusion = torch.bincount(codes.flatten(), minlength=n * num_classes**2).view(n, num_classes, num_classes)
    confusion = confusion.double()  # [N, target class, predicted class]
    intersection = confusion.diagonal(dim1=1, dim2=2)
    total = confusion.sum(2) + confusion.sum(1)
    dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.full_like(total, float("nan")))
    return (dice if batched else dice[0]).cpu()


@torch.no_grad()
def mean_foreground_dice(pred, target, num_classes: int) -> Tensor:
    """Mean of :func:`dice_per_class` over the foreground classes 1..K-1 present in at least one of the two maps
    (absent classes are skipped): float64 scalar tensor for ``[D, H, W]`` maps, ``[N]`` for a batch. NaN only when
    no foreground class is present in either map (Dice is undefined there)."""
    return _foreground_mean(dice_per_class(pred, target, num_classes))


def _foreground_mean(dice: Tensor) -> Tensor:
    """``[..., K]`` per-class Dice -> ``[...]``: the mean over classes 1..K-1, skipping NaN (absent) entries."""
    return torch.nanmean(dice[..., 1:], dim=-1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the volume's outside counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _hd95_one(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 between two non-empty binary masks: max of the two directed 95th-percentile surface distances."""
    pred_surface, target_surface = _surface(pred), _surface(target)
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return float(max(np.percentile(to_target[pred_surface], 95), np.percentile(to_pred[target_surface], 95)))


@torch.no_grad()
def hausdorff95(pred, target, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                include_background: bool = False) -> Tensor:
    """95th-percentile symmetric Hausdorff distance per class, in the units of ``spacing`` (voxel size along D, H,
    W): float64 ``[K]`` for ``[D, H, W]`` maps, ``[N, K]`` for a batch.

    Per class, surfaces are the mask voxels with a face neighbour outside the mask; the distance of every surface
    voxel of one map to the nearest surface voxel of the other comes from a Euclidean distance transform
    (scipy.ndimage), and the result is the larger of the two directed 95th percentiles (MONAI's definition).
    NaN when the class is absent from both maps (and for class 0 unless ``include_background``); ``inf`` when it is
    present in only one of them.
    """
    pred, target, batched = _pair(pred, target, num_classes, "hausdorff95")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"hausdorff95: spacing must be three positive numbers (D, H, W), got {spacing!r}")
    pred, target = pred.cpu().numpy(), target.cpu().numpy()
    result = np.full((pred.shape[0], num_classes), np.nan)
    for n in range(pred.shape[0]):
        for k in range(0 if include_background else 1, num_classes):
            pred_mask, target_mask = pred[n] == k, target[n] == k
            if pred_mask.any() and target_mask.any():
                result[n, k] = _hd95_one(pred_mask, target_mask, spacing)
            elif pred_mask.any() or target_mask.any():
                result[n, k] = np.inf
    result = torch.from_numpy(result)
    return result if batched else result[0]


def _batch_mean(values: Tensor) -> float:
    return float(torch.nanmean(values.double()))


@torch.no_grad()
def registration_metrics(moving_labels, fixed_labels, ddf: Tensor, num_classes: int,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0), per_class: bool = False) -> dict:
    """Registration quality of ``ddf`` ``[N, 3, D, H, W]`` (voxels, the ``warp`` convention), averaged over the
    batch (NaN Dice entries, from classes absent in both maps, skipped):

    - ``reg_dice``: :func:`mean_foreground_dice` between ``warp_labels(moving_labels, ddf, 'nearest')`` and
      ``fixed_labels`` (integer ``[N or 1, 1, D, H, W]`` and ``[N, 1, D, H, W]``, numpy or torch);
    - ``folding_pct``: 100 x the fraction of voxels with det(I + grad u) <= 0 (central differences);
    - ``std_log_det``: standard deviation of log det over the non-folded voxels (both NaN when any determinant
      is NaN or infinite: a broken field, see :func:`deepatlas_cuda.folding_stats`);
    - with ``per_class=True`` also ``reg_dice_per_class``: the :func:`dice_per_class` ``[N, K]`` tensor behind
      ``reg_dice`` (the labels are warped once for both).

    ``spacing`` is the voxel size used by the Jacobian; keep the default for a ddf in voxels.
    """
    moving_labels = torch.as_tensor(moving_labels, device=ddf.device)
    fixed_labels = torch.as_tensor(fixed_labels, device=ddf.device)
    warped = da.warp_labels(moving_labels, ddf, mode="nearest")
    dice = dice_per_class(warped, fixed_labels, num_classes)  # [N, K]
    stats = da.folding_stats(ddf, spacing)
    result = {
        "reg_dice": _batch_mean(_foreground_mean(dice)),
        "folding_pct": 100 * float(stats["fraction_folded"].double().mean()),  # NaN: a non-finite field
        "std_log_det": float(stats["std_log_det"].double().mean()),
    }
    if per_class:
        result["reg_dice_per_class"] = dice
    return result


@torch.no_grad()
def segmentation_metrics(pred_labels, labels, num_classes: int, per_class: bool = False) -> dict:
    """``seg_dice``: :func:`mean_foreground_dice` of ``pred_labels`` against ``labels`` (integer ``[D, H, W]`` or
    ``[N, 1, D, H, W]``), averaged over the batch (NaN entries skipped); with ``per_class=True`` also
    ``seg_dice_per_class``, the :func:`dice_per_class` tensor behind it."""
    dice = dice_per_class(pred_labels, labels, num_classes)
    result = {"seg_dice": _batch_mean(_foreground_mean(dice))}
    if per_class:
        result["seg_dice_per_class"] = dice
    return result
