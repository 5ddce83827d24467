"""Fused warped soft Dice: Dice per [N, K] between warp(source, ddf) (a label source as its one-hot encoding, or a
probability source) and a target, without ever building the warped K-channel volume (extra memory O(N * K))."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._autodiff import forbid_double_backward, reject_forward_ad
from ._loader import REBUILD_HINT, STATE
from .labels import _LABEL_DTYPES, _check, _is_int

_OP = "deepatlas_cuda.warped_dice"


def warped_dice(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int | None = None,
                include_background: bool = True, eps: float = 1e-6) -> Tensor:
    """Soft Dice ``(2 I_k + eps) / (A_k + B_k + eps)`` per batch element and class, ``[N, K]`` (``[N, K - 1]``
    without background), where ``I_k = sum_x a_k(x) b_k(x)``, ``A_k = sum_x a_k(x)``, ``B_k = sum_x b_k(x)``,
    ``a`` the warped source (``a[x] = source[x + ddf[x]]``, trilinear, zeros outside) and ``b`` the target.

    Fused: the warped K-channel volume ``a`` is never built, whatever the source and target; the op keeps only its
    inputs for the backward, and its extra memory is O(N * K).

    - ``source``: integer labels ``[N or 1, 1, D, H, W]`` (uint8, int16, int32, int64), values in ``[0, K)``, warped
      as their one-hot encoding (``a = warp_labels(source, ddf, 'soft', K)``); or probabilities
      ``[N or 1, K, D, H, W]`` in the ddf's dtype (e.g. a segmentation network's softmax), which may require grad
      (``a = warp(source, ddf, padding_mode='zeros')``). A source with N = 1 broadcasts over the ddf batch.
    - ``target``: integer labels ``[N, 1, D, H, W]`` (the source's dtype for a label source, any label dtype for a
      probability source), values in ``[0, K)``; or probabilities ``[N, K, D, H, W]`` in the ddf's dtype, which may
      require grad.
    - ``num_classes``: K; required when both source and target are label maps, taken from a probability source or
      target otherwise (and checked against it when given).

    Differentiable with respect to ``ddf``, a probability ``source`` and a probability ``target``. The sums are
    accumulated in float64; on the CPU the result and every gradient are bit-identical for any number of threads.
    On CUDA the fused op accumulates with atomics; under ``torch.use_deterministic_algorithms(True)`` it is replaced
    by warp-then-sum with this package's deterministic ops (same values, but the warped K-channel volume exists).
    """
    if not isinstance(source, Tensor) or not isinstance(ddf, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{_OP}: source, ddf and target must be torch.Tensors, got {type(source).__name__}, "
                        f"{type(ddf).__name__} and {type(target).__name__}")
    probability_source = source.is_floating_point()
    if probability_source:
        _check_probability_source(source, ddf)
        if num_classes is not None and num_classes != source.shape[1]:
            raise ValueError(f"{_OP}: num_classes={num_classes} but the probability source has {source.shape[1]} "
                             f"channels")
        num_classes = source.shape[1]
    else:
        _check(source, ddf, _OP, "source")
    target_is_labels = target.dtype in _LABEL_DTYPES
    if target.dim() != 5 or target.shape[0] != ddf.shape[0] or target.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{_OP}: target must be [N, 1 or K, D, H, W] matching ddf {tuple(ddf.shape)}, got "
                         f"{tuple(target.shape)}")
    if num_classes is None:
        if target_is_labels:
            raise ValueError(f"{_OP}: num_classes is required when the target is a label map")
        num_classes = target.shape[1]
    if not _is_int(num_classes) or not 1 <= num_classes < 2**31:
        raise ValueError(f"{_OP}: num_classes must be a positive int below 2^31, got {num_classes!r}")
    num_classes = int(num_classes)
    if target_is_labels:
        if target.shape[1] != 1:
            raise ValueError(f"{_OP}: label targets must be [N, 1, D, H, W], got {tuple(target.shape)}")
        if not probability_source and target.dtype != source.dtype:
            # The kernels take one label dtype: the wider of the two, as a narrowing cast could wrap an
            # out-of-range label into range before the kernel's range check sees it.
            common = torch.promote_types(source.dtype, target.dtype)
            source, target = source.to(common), target.to(common)
    elif target.dtype != ddf.dtype or target.shape[1] != num_classes:
        raise ValueError(f"{_OP}: probability targets must be [N, num_classes={num_classes}, D, H, W] in the ddf's "
                         f"dtype {ddf.dtype}, got {tuple(target.shape)} {target.dtype}")
    if target.device != ddf.device:
        raise ValueError(f"{_OP}: target must be on {ddf.device}, got {target.device}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{_OP}: eps must be a number >= 0, got {eps!r}")
    reject_forward_ad(_OP, source, ddf, target)
    if _FORCE_UNFUSED or (ddf.is_cuda and torch.are_deterministic_algorithms_enabled()):
        sums = _unfused_sums(source, ddf, target, num_classes, probability_source, target_is_labels)
    else:
        sums = torch.ops.deepatlas.warped_dice_sums(source, ddf, target, num_classes)  # [N, 3, K] float64
    intersection, source_sum, target_sum = sums.unbind(1)
    dice = ((2 * intersection + eps) / (source_sum + target_sum + eps)).to(ddf.dtype)
    return dice if include_background else dice[:, 1:]


# Tests set this to run the unfused path on the CPU, where it is otherwise never taken.
_FORCE_UNFUSED = False


def _unfused_sums(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int, probability_source: bool,
                  target_is_labels: bool) -> Tensor:
    """The sums ``[N, 3, K]`` (float64) by warp-then-sum with this package's own deterministic ops, for CUDA under
    ``torch.use_deterministic_algorithms(True)``, where the fused op's atomic accumulation is refused. Costs what the
    fusion saves: the warped K-channel volume (and a label target's one-hot) exist, with their gradients."""
    from .labels import warp_labels
    from .ops import warp
    if probability_source:
        warped = warp(source, ddf, "bilinear", "zeros")  # [N, K, D, H, W]; image gradient by pairs, no atomics
    else:
        warped = warp_labels(source, ddf, mode="soft", num_classes=num_classes)
    if target_is_labels:
        low, high = (int(v) for v in torch.aminmax(target)) if target.numel() else (0, 0)
        if low < 0 or high >= num_classes:
            raise RuntimeError(f"{_OP}: target: label values must be in [0, num_classes) = [0, {num_classes}), "
                               f"found values in [{low}, {high}]")
        target = torch.nn.functional.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).to(warped.dtype)
    dims = (2, 3, 4)
    return torch.stack([(warped * target).sum(dims, dtype=torch.float64), warped.sum(dims, dtype=torch.float64),
                        target.sum(dims, dtype=torch.float64)], dim=1)


def _check_probability_source(source: Tensor, ddf: Tensor) -> None:
    if ddf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: ddf must be float32 or float64, got {ddf.dtype}")
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"{_OP}: ddf must be [N, 3, D, H, W], got shape {tuple(ddf.shape)}")
    if source.dtype != ddf.dtype:
        raise ValueError(f"{_OP}: a probability source must have the ddf's dtype {ddf.dtype}, got {source.dtype}")
    if source.dim() != 5 or source.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{_OP}: a probability source must be [N or 1, K, D, H, W] matching ddf "
                         f"{tuple(ddf.shape)} spatially, got {tuple(source.shape)}")
    if source.shape[0] not in (1, ddf.shape[0]):
        raise ValueError(f"{_OP}: source batch size {source.shape[0]} must be 1 or equal the ddf batch size "
                         f"{ddf.shape[0]}")
    if source.shape[1] < 1 or any(size == 0 for size in source.shape[2:]):
        raise ValueError(f"{_OP}: a probability source needs at least one class and non-empty spatial "
                         f"dimensions, got {tuple(source.shape)}")
    if source.device != ddf.device:
        raise ValueError(f"{_OP}: source and ddf must be on the same device, got {source.device} and {ddf.device}")
    if source.is_cuda and not STATE.cuda_loaded:
        raise RuntimeError(f"{_OP}: this deepatlas_cuda build has no CUDA kernels; {REBUILD_HINT}")


@torch.library.register_fake("deepatlas::warped_dice_sums")
def _sums_fake(source, ddf, target, num_classes):
    return ddf.new_empty((ddf.shape[0], 3, num_classes), dtype=torch.float64)


@torch.library.register_fake("deepatlas::warped_dice_sums_backward")
def _sums_backward_fake(grad_sums, source, ddf, target, num_classes, output_mask):
    grad_ddf = ddf.new_empty(ddf.shape) if output_mask[0] else ddf.new_empty(0)
    grad_target = target.new_empty(target.shape) if output_mask[1] else ddf.new_empty(0)
    grad_source = source.new_empty(source.shape) if output_mask[2] else ddf.new_empty(0)
    return grad_ddf, grad_target, grad_source


def _sums_setup(ctx, inputs, output):
    source, ddf, target, num_classes = inputs
    ctx.save_for_backward(source, ddf, target)
    ctx.num_classes = num_classes


def _sums_backward(ctx, grad_sums):
    source, ddf, target = ctx.saved_tensors
    mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2] and target.is_floating_point(),
            ctx.needs_input_grad[0] and source.is_floating_point()]
    grad_ddf, grad_target, grad_source = torch.ops.deepatlas.warped_dice_sums_backward(
        grad_sums, source, ddf, target, ctx.num_classes, mask)
    return (grad_source if mask[2] else None, grad_ddf if mask[0] else None, grad_target if mask[1] else None,
            None)


torch.library.register_autograd("deepatlas::warped_dice_sums", _sums_backward, setup_context=_sums_setup)
forbid_double_backward(_OP, "warped_dice_sums_backward")
