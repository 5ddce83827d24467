"""Training losses of DeepAtlas: image similarity (L_i), deformation regularity (L_r), anatomy (L_a) and supervised
segmentation (L_sp).

Volumes are ``[N, C, D, H, W]``; displacement fields ``[N, 3, D, H, W]`` in voxels, channel i along spatial axis i
(the :func:`deepatlas_cuda.warp` convention). Every loss returns a scalar, the mean over the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deepatlas_cuda as da

__all__ = ["LocalNCCLoss", "anatomy_loss", "bending_energy_loss", "confidence", "diffusion_loss",
           "folding_penalty", "global_ncc_loss", "mse_loss", "one_hot", "regulariser_loss", "similarity_loss",
           "soft_dice", "soft_dice_loss", "supervised_loss", "weighted_anatomy_loss"]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str], op: str) -> None:
    if a.dim() != 5:
        raise ValueError(f"{op}: {names[0]} must be [N, C, D, H, W], got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{op}: {names[1]} must have the shape of {names[0]} {tuple(a.shape)}, got {tuple(b.shape)}")


def _check_ddf(ddf: Tensor, op: str) -> None:
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"{op}: ddf must be [N, 3, D, H, W], got {tuple(ddf.shape)}")


def _check_spacing(spacing: Sequence[float], op: str) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"{op}: spacing must be three positive numbers (D, H, W), got {spacing!r}")
    return spacing


# ---- similarity L_i ----------------------------------------------------------------------------------------------


def global_ncc_loss(a: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 - mean_n NCC(a_n, b_n)``, NCC over all channels and voxels of each batch element ``[N, C, D, H, W]``:
    ``NCC = cov(a, b) / sqrt((var(a) + eps) (var(b) + eps))`` (population moments). 0 for ``b = s a + t`` (s > 0),
    2 for s < 0, about 1 for independent images; a constant image gives NCC 0."""
    _check_pair(a, b, ("a", "b"), "global_ncc_loss")
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    covariance = (a * b).mean(1)
    ncc = covariance / ((a.square().mean(1) + eps) * (b.square().mean(1) + eps)).sqrt()
    return 1 - ncc.mean()


class LocalNCCLoss(nn.Module):
    """Local normalised cross-correlation loss (VoxelMorph-style), ``1 - mean_{n, c, x} cc(x)``.

    For each voxel x, channel and batch element, ``W(x)`` is the set of voxels of the volume inside the cube of side
    ``window`` (odd) centred on x; windows are clipped at the volume edges (the local moments use only the voxels
    inside, never zero padding). With ``mean_W`` the average over ``W(x)``:
    ``cov = mean_W(a b) - mean_W(a) mean_W(b)``, ``var_a = mean_W(a^2) - mean_W(a)^2`` (same for b), and
    ``cc = cov^2 / (var_a var_b + eps / |W|^2)`` (``squared=True``, VoxelMorph's choice, in [0, 1)) or
    ``cc = cov / sqrt(var_a var_b + eps / |W|^2)`` (``squared=False``, in (-1, 1)). Flat windows give cc = 0.
    ``eps`` is VoxelMorph's, which it adds to the product of the window *sums*' variances (|W|^2 times the means'):
    on the means it is ``eps / |W|^2`` (about 2e-11 for a 9^3 window), far below the product of local variances of
    images in [0, 1]. (Until 2026-12-07 ``eps`` was added to the means' product itself, where it outweighed that
    product in low-contrast windows and rewarded warps that raise the warped image's local contrast.)
    """

    def __init__(self, window: int = 9, eps: float = 1e-5, squared: bool = True):
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
            raise ValueError(f"LocalNCCLoss: window must be a positive odd int, got {window!r}")
        self.window = window
        self.eps = eps
        self.squared = squared

    def _box_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` ``[M, 1, D, H, W]`` over the window around each voxel, zero outside (separable)."""
        radius = self.window // 2
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = self.window
            padding = [0, 0, 0]
            padding[axis] = radius
            x = F.conv3d(x, x.new_ones(shape), padding=padding)
        return x

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``a``, ``b`` ``[N, C, D, H, W]`` -> scalar loss."""
        _check_pair(a, b, ("a", "b"), "LocalNCCLoss")
        a = a.reshape(-1, 1, *a.shape[2:])
        b = b.reshape(-1, 1, *b.shape[2:])
        count = self._box_sum(a.new_ones(1, 1, *a.shape[2:]))  # voxels of each clipped window
        sums = self._box_sum(torch.cat([a, b, a * a, b * b, a * b]))
        mean_a, mean_b, mean_aa, mean_bb, mean_ab = (sums / count).chunk(5)
        covariance = mean_ab - mean_a * mean_b
        variance = (mean_aa - mean_a.square()).clamp_min(0) * (mean_bb - mean_b.square()).clamp_min(0)
        denominator = variance + self.eps / count.square()
        if self.squared:
            cc = covariance.square() / denominator
        else:
            cc = covariance / denominator.sqrt()
        return 1 - cc.mean()


def mse_loss(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference over all elements of ``a``, ``b`` ``[N, C, D, H, W]``."""
    _check_pair(a, b, ("a", "b"), "mse_loss")
    return (a - b).square().mean()


def similarity_loss(name: str, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """``'ncc'`` -> :func:`global_ncc_loss` (the paper's L_i), ``'lncc'`` -> :class:`LocalNCCLoss` (``kwargs``:
    window, eps, squared), ``'mse'`` -> :func:`mse_loss`. ``kwargs`` go to the chosen loss."""
    if name == "ncc":
        return functools.partial(global_ncc_loss, **kwargs)
    if name == "lncc":
        return LocalNCCLoss(**kwargs)
    if name == "mse":
        if kwargs:
            raise ValueError(f"similarity_loss: 'mse' takes no options, got {sorted(kwargs)}")
        return mse_loss
    raise ValueError(f"similarity_loss: name must be 'ncc', 'lncc' or 'mse', got {name!r}")


# ---- regularisers L_r --------------------------------------------------------------------------------------------


def diffusion_loss(ddf: Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """``sum_j mean_x sum_i (D_j u_i(x))^2`` for ``ddf`` u ``[N, 3, D, H, W]``, where
    ``D_j u(x) = (u(x + e_j) - u(x)) / spacing_j`` is the forward difference along axis j and the mean runs over
    the batch and the voxels where it is defined. For u = A x (spacing 1) this is exactly ``sum_ij A_ij^2``."""
    _check_ddf(ddf, "diffusion_loss")
    spacing = _check_spacing(spacing, "diffusion_loss")
    total = ddf.new_zeros(())
    for axis, step in enumerate(spacing):
        dim = 2 + axis
        if ddf.shape[dim] > 1:
            difference = ddf.diff(dim=dim) / step
            total = total + difference.square().sum(1).mean()
    return total


def _interior_shift(u: Tensor, offsets: Sequence[int]) -> Tensor:
    """``u(x + offsets)`` for every interior voxel x (index 1 .. n-2 on each spatial axis) of ``u`` [N, C, D, H, W]."""
    for axis, offset in enumerate(offsets):
        dim = 2 + axis
        u = u.narrow(dim, 1 + offset, u.shape[dim] - 2)
    return u


def bending_energy_loss(ddf: Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Bending energy ``mean_x sum_i [ sum_j (d2 u_i / dx_j^2)^2 + 2 sum_{j<k} (d2 u_i / dx_j dx_k)^2 ]`` over the
    batch and the interior voxels (index 1 .. n-2 on every axis; every spatial size must be >= 3), with central
    differences ``d2u/dx_j^2 = (u(x+e_j) - 2u(x) + u(x-e_j)) / h_j^2`` and
    ``d2u/dx_j dx_k = (u(x+e_j+e_k) - u(x+e_j-e_k) - u(x-e_j+e_k) + u(x-e_j-e_k)) / (4 h_j h_k)``, h = spacing.
    Zero for any affine field; exact for quadratic fields."""
    _check_ddf(ddf, "bending_energy_loss")
    spacing = _check_spacing(spacing, "bending_energy_loss")
    if min(ddf.shape[2:]) < 3:
        raise ValueError(f"bending_energy_loss: every spatial size of ddf must be >= 3, got {tuple(ddf.shape)}")

    def at(*offsets: int) -> Tensor:
        return _interior_shift(ddf, offsets)

    def unit(axis: int, sign: int) -> list[int]:
        offsets = [0, 0, 0]
        offsets[axis] = sign
        return offsets

    centre = at(0, 0, 0)
    energy = torch.zeros_like(centre)
    for j in range(3):
        second = (at(*unit(j, 1)) - 2 * centre + at(*unit(j, -1))) / spacing[j] ** 2
        energy = energy + second.square()
        for k in range(j + 1, 3):
            corners = [[a + b for a, b in zip(unit(j, sj), unit(k, sk))] for sj in (1, -1) for sk in (1, -1)]
            mixed = (at(*corners[0]) - at(*corners[1]) - at(*corners[2]) + at(*corners[3]))
            energy = energy + 2 * (mixed / (4 * spacing[j] * spacing[k])).square()
    return energy.sum(1).mean()


def folding_penalty(ddf: Tensor, eps: float = 0.0, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """``mean_x relu(eps - det(I + grad u)(x))`` over the batch and voxels, with :func:`deepatlas_cuda.jacobian_det`
    (central differences). 0 for any field whose Jacobian determinant is >= eps everywhere (e.g. the identity)."""
    _check_ddf(ddf, "folding_penalty")
    return F.relu(eps - da.jacobian_det(ddf, spacing)).mean()


def regulariser_loss(name: str, **kwargs) -> Callable[[Tensor], Tensor]:
    """``'diffusion'`` -> :func:`diffusion_loss`, ``'bending'`` -> :func:`bending_energy_loss`; ``kwargs``
    (spacing) are bound to the chosen loss."""
    losses = {"diffusion": diffusion_loss, "bending": bending_energy_loss}
    if name not in losses:
        raise ValueError(f"regulariser_loss: name must be 'diffusion' or 'bending', got {name!r}")
    return functools.partial(losses[name], **kwargs)


# ---- Dice: anatomy L_a and supervised L_sp -----------------------------------------------------------------------


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer labels ``[N, 1, D, H, W]`` with values in [0, num_classes) -> one-hot ``[N, K, D, H, W]``."""
    if labels.dim() != 5 or labels.shape[1] != 1 or labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"one_hot: labels must be integer [N, 1, D, H, W], got {tuple(labels.shape)} {labels.dtype}")
    return F.one_hot(labels[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(dtype)


def soft_dice(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft Dice ``(2 sum_x a b + eps) / (sum_x a + sum_x b + eps)`` per batch element and class, ``[N, K]``, for
    ``a``, ``b`` ``[N, K, D, H, W]``."""
    _check_pair(a, b, ("a", "b"), "soft_dice")
    intersection = (a * b).flatten(2).sum(-1)
    return (2 * intersection + eps) / (a.flatten(2).sum(-1) + b.flatten(2).sum(-1) + eps)


def _target_probabilities(target: Tensor, num_classes: int, like: Tensor, op: str) -> Tensor:
    """Integer labels ``[N, 1, ...]`` -> one-hot in ``like``'s dtype; probabilities ``[N, K, ...]`` pass through."""
    if target.dtype in _INTEGER_DTYPES:
        return one_hot(target, num_classes, like.dtype)
    if target.dim() != 5 or target.shape[1] != num_classes:
        raise ValueError(f"{op}: target must be integer labels [N, 1, D, H, W] or probabilities "
                         f"[N, num_classes={num_classes}, D, H, W], got {tuple(target.shape)} {target.dtype}")
    return target


def label_soft_dice(probs: Tensor, labels: Tensor, eps: float = 1e-6) -> Tensor:
    """``soft_dice(probs, one_hot(labels))`` ``[N, K]`` without building the one-hot: the intersection gathers each
    voxel's probability of its true class and sums it per class (scatter-add, float64 sums), the label volume per
    class is a count. Extra memory O(N * V) for the gathered values instead of two K-channel volumes."""
    n, k = probs.shape[:2]
    low, high = torch.aminmax(labels)
    if low < 0 or high >= k:
        raise ValueError(f"label_soft_dice: labels must lie in [0, {k}), found [{int(low)}, {int(high)}]")
    index = labels.reshape(n, -1).long()                                  # [N, V]
    picked = probs.reshape(n, k, -1).gather(1, index[:, None]).squeeze(1)  # [N, V]: probability of the true class
    intersection = probs.new_zeros((n, k), dtype=torch.float64).scatter_add_(1, index, picked.double())
    counts = probs.new_zeros((n, k), dtype=torch.float64).scatter_add_(
        1, index, torch.ones_like(picked, dtype=torch.float64))
    total = probs.reshape(n, k, -1).sum(-1, dtype=torch.float64) + counts
    return ((2 * intersection + eps) / (total + eps)).to(probs.dtype)


def _num_classes(num_classes: int | None, probs: Tensor, op: str) -> int:
    if num_classes is None:
        return probs.shape[1]
    if probs.shape[1] != num_classes:
        raise ValueError(f"{op}: probs must have num_classes={num_classes} channels, got {tuple(probs.shape)}")
    return num_classes


def soft_dice_loss(probs: Tensor, target: Tensor, num_classes: int | None = None, eps: float = 1e-6) -> Tensor:
    """``1 - mean_{n, k} soft_dice`` (background included) between ``probs`` ``[N, K, D, H, W]`` and ``target``:
    integer labels ``[N, 1, D, H, W]`` (:func:`label_soft_dice`, no one-hot) or probabilities ``[N, K, D, H, W]``.
    ``num_classes`` defaults to ``probs.shape[1]``."""
    if probs.dim() != 5 or not probs.is_floating_point():
        raise ValueError(f"soft_dice_loss: probs must be float [N, K, D, H, W], got {tuple(probs.shape)} "
                         f"{probs.dtype}")
    num_classes = _num_classes(num_classes, probs, "soft_dice_loss")
    if target.dtype in _INTEGER_DTYPES:
        if target.dim() != 5 or target.shape[1] != 1 or target.shape[0] != probs.shape[0] \
                or target.shape[2:] != probs.shape[2:]:
            raise ValueError(f"soft_dice_loss: label targets must be [N, 1, D, H, W] matching probs "
                             f"{tuple(probs.shape)}, got {tuple(target.shape)}")
        return 1 - label_soft_dice(probs, target, eps).mean()
    target = _target_probabilities(target, num_classes, probs, "soft_dice_loss")
    return 1 - soft_dice(probs, target, eps).mean()


def supervised_loss(logits: Tensor, labels: Tensor, ce_weight: float = 0.0) -> Tensor:
    """L_sp: ``soft_dice_loss(softmax(logits), labels) + ce_weight * cross_entropy(logits, labels)`` for logits
    ``[N, K, D, H, W]`` and integer labels ``[N, 1, D, H, W]`` (or probabilities ``[N, K, D, H, W]``)."""
    loss = soft_dice_loss(logits.softmax(1), labels, logits.shape[1])
    if ce_weight:
        target = labels[:, 0].long() if labels.dtype in _INTEGER_DTYPES else labels
        loss = loss + ce_weight * F.cross_entropy(logits, target)
    return loss


def anatomy_loss(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int, eps: float = 1e-6) -> Tensor:
    """L_a: ``1 - mean_{n, k} soft_dice(warp(source, ddf), target)``, background included, by
    :func:`deepatlas_cuda.warped_dice`.

    - ``source`` integer labels ``[N or 1, 1, D, H, W]``: fused (trilinear warp of the one-hot map, zeros outside
      the volume; the warped K-channel volume is never built). Differentiable w.r.t. ``ddf`` and a probability
      ``target``.
    - ``source`` probabilities ``[N or 1, K, D, H, W]`` (e.g. the segmentation network's softmax): fused as well
      (trilinear, zeros outside; no warped K-channel volume). Differentiable w.r.t. ``source``, ``ddf`` and a
      probability ``target``.
    - ``target``: integer labels ``[N, 1, D, H, W]`` or probabilities ``[N, K, D, H, W]`` in the ddf's dtype.
    """
    _check_ddf(ddf, "anatomy_loss")
    dice = da.warped_dice(source, ddf, target, num_classes=num_classes, include_background=True, eps=eps)
    return 1 - dice.mean()


def confidence(probs: Tensor) -> Tensor:
    """A prediction's confidence per voxel, ``[N, 1, D, H, W]`` for probabilities ``[N, K, D, H, W]``:
    ``(max_k p_k - 1/K) / (1 - 1/K)``, 0 where the prediction is uniform, 1 where it is certain."""
    k = probs.shape[1]
    if k < 2:
        raise ValueError(f"confidence: probs must have at least 2 classes, got {tuple(probs.shape)}")
    return ((probs.amax(1, keepdim=True) - 1 / k) / (1 - 1 / k)).clamp(0, 1)


def weighted_anatomy_loss(source: Tensor, ddf: Tensor, target: Tensor, weight: Tensor, num_classes: int,
                          eps: float = 1e-6) -> Tensor:
    """L_a with each voxel of the target grid weighted: ``1 - mean_{n, k} (2 sum_x w s t + eps) /
    (sum_x w s + sum_x w t + eps)``, ``s`` the warped source, ``t`` the target, ``w`` = ``weight``
    ``[N, 1, D, H, W]`` (not differentiated). Equal to :func:`anatomy_loss` for ``weight`` = 1.

    Unfused: the warped K-channel source is built (``warp_labels(mode="soft")`` for integer labels, ``warp`` with
    zeros padding for probabilities), so this costs the memory :func:`anatomy_loss` avoids."""
    _check_ddf(ddf, "weighted_anatomy_loss")
    if source.dtype in _INTEGER_DTYPES:
        warped = da.warp_labels(source, ddf, mode="soft", num_classes=num_classes)
    else:
        warped = da.warp(source, ddf, padding_mode="zeros")
    target = _target_probabilities(target, num_classes, warped, "weighted_anatomy_loss")
    if weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[2:] != target.shape[2:]:
        raise ValueError(f"weighted_anatomy_loss: weight must be [N, 1, D, H, W] on the target's grid "
                         f"{tuple(target.shape[2:])}, got {tuple(weight.shape)}")
    weight = weight.detach()
    intersection = (weight * warped * target).flatten(2).sum(-1)
    total = (weight * warped).flatten(2).sum(-1) + (weight * target).flatten(2).sum(-1)
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()
