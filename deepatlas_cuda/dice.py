"""Fused warped soft Dice: Dice per [N, K] between warp(one_hot(source), ddf) and a target, without ever building
the warped K-channel volume (extra memory O(N * K))."""

from __future__ import annotations

import torch
from torch import Tensor

from .labels import _LABEL_DTYPES, _check

_OP = "deepatlas_cuda.warped_dice"


def warped_dice(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int | None = None,
                include_background: bool = True, eps: float = 1e-6) -> Tensor:
    """Soft Dice ``(2 I_k + eps) / (A_k + B_k + eps)`` per batch element and class, ``[N, K]`` (``[N, K - 1]``
    without background), where ``I_k = sum_x a_k(x) b_k(x)``, ``A_k = sum_x a_k(x)``, ``B_k = sum_x b_k(x)``,
    ``a = warp_labels(source, ddf, 'soft', K)`` (trilinear, zeros outside) and ``b`` the target.

    - ``source``: integer labels ``[N or 1, 1, D, H, W]`` (uint8, int16, int32, int64), values in ``[0, K)``;
      or probabilities ``[N or 1, K, D, H, W]`` in the ddf's dtype, which may require grad. A probability source
      is warped with :func:`deepatlas_cuda.warp` (trilinear, zeros outside) and is NOT fused: the warped K-channel
      volume (and, for a label target, its one-hot) exists for the backward.
    - ``target``: integer labels ``[N, 1, D, H, W]`` (same dtype as ``source``) or probabilities
      ``[N, K, D, H, W]`` in the ddf's dtype, which may require grad (e.g. the segmentation network's softmax).
    - ``num_classes``: K; required for label targets, taken from a probability target otherwise.

    Differentiable with respect to ``ddf``, a probability ``source`` and a probability ``target``.
    """
    if isinstance(source, Tensor) and source.is_floating_point():
        return _probability_source_dice(source, ddf, target, num_classes, include_background, eps)
    _check(source, ddf)
    if not isinstance(target, Tensor):
        raise TypeError(f"{_OP}: target must be a torch.Tensor, got {type(target).__name__}")
    target_is_labels = target.dtype in _LABEL_DTYPES
    if num_classes is None:
        if target_is_labels:
            raise ValueError(f"{_OP}: num_classes is required when the target is a label map")
        num_classes = target.shape[1] if target.dim() == 5 else -1
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{_OP}: num_classes must be a positive int, got {num_classes!r}")
    if target.dim() != 5 or target.shape[0] != ddf.shape[0] or target.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{_OP}: target must be [N, 1 or K, D, H, W] matching ddf {tuple(ddf.shape)}, got "
                         f"{tuple(target.shape)}")
    if target_is_labels:
        if target.shape[1] != 1:
            raise ValueError(f"{_OP}: label targets must be [N, 1, D, H, W], got {tuple(target.shape)}")
        target = target.to(source.dtype)
    elif target.dtype != ddf.dtype or target.shape[1] != num_classes:
        raise ValueError(f"{_OP}: probability targets must be [N, num_classes={num_classes}, D, H, W] in the ddf's "
                         f"dtype {ddf.dtype}, got {tuple(target.shape)} {target.dtype}")
    if target.device != ddf.device:
        raise ValueError(f"{_OP}: target must be on {ddf.device}, got {target.device}")
    sums = torch.ops.deepatlas.warped_dice_sums(source, ddf, target, num_classes)  # [N, 3, K] float64
    intersection, source_sum, target_sum = sums.unbind(1)
    dice = ((2 * intersection + eps) / (source_sum + target_sum + eps)).to(ddf.dtype)
    return dice if include_background else dice[:, 1:]


@torch.library.register_fake("deepatlas::warped_dice_sums")
def _sums_fake(source, ddf, target, num_classes):
    return ddf.new_empty((ddf.shape[0], 3, num_classes), dtype=torch.float64)


@torch.library.register_fake("deepatlas::warped_dice_sums_backward")
def _sums_backward_fake(grad_sums, source, ddf, target, num_classes, output_mask):
    grad_ddf = ddf.new_empty(ddf.shape) if output_mask[0] else ddf.new_empty(0)
    grad_target = target.new_empty(target.shape) if output_mask[1] else ddf.new_empty(0)
    return grad_ddf, grad_target


def _sums_setup(ctx, inputs, output):
    source, ddf, target, num_classes = inputs
    ctx.save_for_backward(source, ddf, target)
    ctx.num_classes = num_classes


def _sums_backward(ctx, grad_sums):
    source, ddf, target = ctx.saved_tensors
    mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2] and target.is_floating_point()]
    grad_ddf, grad_target = torch.ops.deepatlas.warped_dice_sums_backward(grad_sums, source, ddf, target,
                                                                          ctx.num_classes, mask)
    return None, grad_ddf if mask[0] else None, grad_target if mask[1] else None, None


torch.library.register_autograd("deepatlas::warped_dice_sums", _sums_backward, setup_context=_sums_setup)


def _probability_source_dice(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int | None,
                             include_background: bool, eps: float) -> Tensor:
    """warped_dice for a probability source: warp (zeros outside), then soft Dice with float64 sums."""
    from .ops import warp

    if not isinstance(ddf, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{_OP}: ddf and target must be torch.Tensors")
    if source.dim() != 5 or ddf.dim() != 5 or ddf.shape[1] != 3 or source.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{_OP}: a probability source must be [N or 1, K, D, H, W] matching ddf [N, 3, D, H, W], "
                         f"got {tuple(source.shape)} and {tuple(ddf.shape)}")
    if source.dtype != ddf.dtype:
        raise ValueError(f"{_OP}: a probability source must have the ddf's dtype {ddf.dtype}, got {source.dtype}")
    classes = source.shape[1]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"{_OP}: num_classes={num_classes} but the probability source has {classes} channels")
    if target.dim() != 5 or target.shape[0] != ddf.shape[0] or target.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{_OP}: target must be [N, 1 or K, D, H, W] matching ddf {tuple(ddf.shape)}, got "
                         f"{tuple(target.shape)}")
    if target.device != ddf.device or source.device != ddf.device:
        raise ValueError(f"{_OP}: source, ddf and target must be on one device, got {source.device}, "
                         f"{ddf.device} and {target.device}")
    if target.dtype in _LABEL_DTYPES:
        if target.shape[1] != 1:
            raise ValueError(f"{_OP}: label targets must be [N, 1, D, H, W], got {tuple(target.shape)}")
        low, high = torch.aminmax(target)
        if low < 0 or high >= classes:
            raise ValueError(f"{_OP}: target labels must lie in [0, {classes}), found [{int(low)}, {int(high)}]")
        target = torch.nn.functional.one_hot(target[:, 0].long(), classes).movedim(-1, 1).to(ddf.dtype)
    elif target.dtype != ddf.dtype or target.shape[1] != classes:
        raise ValueError(f"{_OP}: probability targets must be [N, {classes}, D, H, W] in the ddf's dtype "
                         f"{ddf.dtype}, got {tuple(target.shape)} {target.dtype}")
    warped = warp(source, ddf, padding_mode="zeros")  # [N, K, D, H, W]
    intersection = (warped * target).flatten(2).sum(-1, dtype=torch.float64)
    total = warped.flatten(2).sum(-1, dtype=torch.float64) + target.flatten(2).sum(-1, dtype=torch.float64)
    dice = ((2 * intersection + eps) / (total + eps)).to(ddf.dtype)
    return dice if include_background else dice[:, 1:]
