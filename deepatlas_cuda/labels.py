"""Label warps from integer label maps: nearest (same dtype) and soft (the trilinear warp of the one-hot encoding,
computed without building it). Fake kernels and the soft warp's autograd are registered here."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._autodiff import forbid_double_backward, reject_forward_ad
from ._loader import REBUILD_HINT, STATE

_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_OP = "deepatlas_cuda.warp_labels"


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(labels: Tensor, ddf: Tensor, op: str = _OP, name: str = "labels") -> None:
    """Checks of an integer label map ``name`` and its ddf, for ``op``'s error messages."""
    if not isinstance(labels, Tensor) or not isinstance(ddf, Tensor):
        raise TypeError(f"{op}: {name} and ddf must be torch.Tensors, got {type(labels).__name__} and "
                        f"{type(ddf).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer label map (uint8, int16, int32 or int64), got "
                        f"{labels.dtype}")
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"{op}: {name} must be [N, 1, D, H, W], got shape {tuple(labels.shape)}")
    if ddf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: ddf must be float32 or float64, got {ddf.dtype}")
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"{op}: ddf must be [N, 3, D, H, W], got shape {tuple(ddf.shape)}")
    if labels.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{op}: {name} spatial shape {tuple(labels.shape[2:])} must equal ddf spatial shape "
                         f"{tuple(ddf.shape[2:])}")
    if labels.shape[0] not in (1, ddf.shape[0]):
        raise ValueError(f"{op}: {name} batch size {labels.shape[0]} must be 1 or equal the ddf batch size "
                         f"{ddf.shape[0]}")
    if any(size == 0 for size in labels.shape[2:]):
        raise ValueError(f"{op}: {name} must have non-empty spatial dimensions, got {tuple(labels.shape)}")
    if labels.device != ddf.device:
        raise ValueError(f"{op}: {name} and ddf must be on the same device, got {labels.device} and {ddf.device}")
    if labels.is_cuda and not STATE.cuda_loaded:
        raise RuntimeError(f"{op}: this deepatlas_cuda build has no CUDA kernels; {REBUILD_HINT}")


def warp_labels(labels: Tensor, ddf: Tensor, mode: str = "nearest", num_classes: int | None = None,
                padding_value: int = 0) -> Tensor:
    """Warp an integer label map by a displacement field: ``out[x] = labels[x + ddf[x]]`` (the ``warp`` convention).

    - ``mode='nearest'``: ``labels`` ``[N, 1, D, H, W]`` (uint8, int16, int32, int64) -> same shape and dtype, the
      label of the nearest voxel; points outside the volume get ``padding_value``. Not differentiable.
    - ``mode='soft'``: -> ``[N, num_classes, D, H, W]`` in the ddf's dtype, the trilinear warp of the one-hot
      encoding without building it (each voxel touches at most 8 labels). Zeros outside the volume, so the classes
      sum to 1 wherever all 8 neighbours are inside. Differentiable with respect to ``ddf``.
      Label values must lie in ``[0, num_classes)``.

    ``labels`` with N = 1 broadcast over a batched ``ddf``. ``ddf`` is float32 or float64.
    """
    _check(labels, ddf)
    if mode == "nearest":
        info = torch.iinfo(labels.dtype)
        if not _is_int(padding_value) or not info.min <= padding_value <= info.max:
            raise ValueError(f"{_OP}: padding_value must be an integer representable in {labels.dtype}, got "
                             f"{padding_value!r}")
        return torch.ops.deepatlas.warp_labels_nearest(labels, ddf, int(padding_value))
    if mode == "soft":
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"{_OP}: mode='soft' needs num_classes, a positive int, got {num_classes!r}")
        reject_forward_ad(_OP, ddf)
        return torch.ops.deepatlas.warp_labels_soft(labels, ddf, int(num_classes))
    raise ValueError(f"{_OP}: mode must be 'nearest' or 'soft', got {mode!r}")


@torch.library.register_fake("deepatlas::warp_labels_nearest")
def _nearest_fake(labels, ddf, fill):
    return labels.new_empty((ddf.shape[0], 1, *ddf.shape[2:]))


@torch.library.register_fake("deepatlas::warp_labels_soft")
def _soft_fake(labels, ddf, num_classes):
    return ddf.new_empty((ddf.shape[0], num_classes, *ddf.shape[2:]))


@torch.library.register_fake("deepatlas::warp_labels_soft_backward")
def _soft_backward_fake(grad_output, labels, ddf, num_classes):
    return ddf.new_empty(ddf.shape)


def _soft_setup(ctx, inputs, output):
    labels, ddf, num_classes = inputs
    ctx.save_for_backward(labels, ddf)
    ctx.num_classes = num_classes


def _soft_backward(ctx, grad_output):
    labels, ddf = ctx.saved_tensors
    grad_ddf = None
    if ctx.needs_input_grad[1]:
        grad_ddf = torch.ops.deepatlas.warp_labels_soft_backward(grad_output, labels, ddf, ctx.num_classes)
    return None, grad_ddf, None


torch.library.register_autograd("deepatlas::warp_labels_soft", _soft_backward, setup_context=_soft_setup)
forbid_double_backward(_OP, "warp_labels_soft_backward")
