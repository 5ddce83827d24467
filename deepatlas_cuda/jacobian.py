"""Jacobian determinant of a displacement field and the folding statistics registration papers report."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ._autodiff import forbid_double_backward, reject_forward_ad
from ._loader import REBUILD_HINT, STATE

_SCHEMES = {"central": 0, "forward": 1, "backward": 2}
_OP = "deepatlas_cuda.jacobian_det"


def _check(ddf: Tensor, spacing, op: str) -> list[float]:
    if not isinstance(ddf, Tensor):
        raise TypeError(f"{op}: ddf must be a torch.Tensor, got {type(ddf).__name__}")
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"{op}: ddf must be [N, 3, D, H, W], got shape {tuple(ddf.shape)}")
    if ddf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: ddf must be float32 or float64, got {ddf.dtype}")
    if ddf.is_cuda and not STATE.cuda_loaded:
        raise RuntimeError(f"{op}: this deepatlas_cuda build has no CUDA kernels; {REBUILD_HINT}")
    if _is_number(spacing):
        spacing = (spacing,) * 3
    if not isinstance(spacing, Sequence) or len(spacing) != 3 or not all(
            _is_number(s) and 0 < s < math.inf for s in spacing):
        raise ValueError(f"{op}: spacing must be three positive finite numbers (D, H, W), got {spacing!r}")
    reject_forward_ad(op, ddf)
    return [float(s) for s in spacing]


def _is_number(value) -> bool:
    """A Python or numpy real number (e.g. nibabel's get_zooms()), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def jacobian_det(ddf: Tensor, spacing=(1.0, 1.0, 1.0), scheme: str = "central") -> Tensor:
    """det(I + grad u) per voxel for a displacement field ``ddf`` ``[N, 3, D, H, W]`` -> ``[N, 1, D, H, W]``.

    Finite differences ``scheme`` ``'central'`` (default), ``'forward'`` or ``'backward'``, one-sided at the
    borders (see csrc/include/deepatlas/jacobian.h for the picture); an axis of length 1 has zero derivative.
    ``spacing`` is the voxel size along (D, H, W), in the units of ``ddf``: keep the default for a ddf in voxels
    (the ``warp`` convention), pass the voxel size in mm for a ddf in mm. Differentiable with respect to ``ddf``
    (the backward writes each voxel's cofactors times the upstream gradient, then gathers them at the voxels the
    stencils read: no atomics, bit-identical for any number of CPU threads).
    """
    spacing = _check(ddf, spacing, _OP)
    if scheme not in _SCHEMES:
        raise ValueError(f"{_OP}: scheme must be one of {list(_SCHEMES)}, got {scheme!r}")
    return torch.ops.deepatlas.jacobian_det(ddf, spacing, [_SCHEMES[scheme]] * 3)


def folding_stats(ddf: Tensor, spacing=(1.0, 1.0, 1.0), scheme: str = "central", strict: bool = False) -> dict:
    """Per batch element: ``num_folded`` (voxels with det <= 0), ``fraction_folded``, ``std_log_det`` (the
    standard deviation of log det over voxels with det > 0), and ``num_nonfinite`` (voxels whose det is NaN or
    infinite, from a NaN / infinite / overflowing ddf). A batch element with any such voxel has NaN
    ``fraction_folded`` and ``std_log_det``: a broken field never reads as one without folds.

    ``strict=True`` counts a voxel as folded when the determinant of ANY of the 8 one-sided stencil combinations
    (forward or backward difference per axis) is <= 0 — the check of Liu et al. (IJCV 2024), since a central-
    difference determinant can be positive on a folded field. ``std_log_det`` then uses ``scheme``'s determinant.
    """
    op = "deepatlas_cuda.folding_stats"
    spacing = _check(ddf, spacing, op)
    if scheme not in _SCHEMES:
        raise ValueError(f"{op}: scheme must be one of {list(_SCHEMES)}, got {scheme!r}")
    with torch.no_grad():
        det = torch.ops.deepatlas.jacobian_det(ddf, spacing, [_SCHEMES[scheme]] * 3).flatten(1)  # [N, V]
        folded = det <= 0
        if strict:
            for schemes in itertools.product((1, 2), repeat=3):
                folded |= torch.ops.deepatlas.jacobian_det(ddf, spacing, list(schemes)).flatten(1) <= 0
        positive = det > 0
        log_det = torch.where(positive, det.clamp_min(torch.finfo(det.dtype).tiny).log(), torch.zeros_like(det))
        count = positive.sum(1).clamp_min(1)
        mean = log_det.sum(1) / count
        variance = torch.where(positive, (log_det - mean[:, None]) ** 2, torch.zeros_like(det)).sum(1) / count
        num_folded = folded.sum(1)
        num_nonfinite = (~det.isfinite()).sum(1)
        broken = num_nonfinite > 0
        nan = torch.full_like(mean, float("nan"))
        return {
            "num_folded": num_folded,
            "fraction_folded": torch.where(broken, nan, num_folded.to(det.dtype) / max(det.shape[1], 1)),
            "std_log_det": torch.where(broken, nan, variance.sqrt()),
            "num_nonfinite": num_nonfinite,
        }


@torch.library.register_fake("deepatlas::jacobian_det")
def _det_fake(ddf, spacing, schemes):
    return ddf.new_empty((ddf.shape[0], 1, *ddf.shape[2:]))


@torch.library.register_fake("deepatlas::jacobian_det_backward")
def _det_backward_fake(grad_output, ddf, spacing, schemes):
    return ddf.new_empty(ddf.shape)


def _det_setup(ctx, inputs, output):
    ddf, spacing, schemes = inputs
    ctx.save_for_backward(ddf)
    ctx.settings = (spacing, schemes)


def _det_backward(ctx, grad_output):
    (ddf,) = ctx.saved_tensors
    return torch.ops.deepatlas.jacobian_det_backward(grad_output, ddf, *ctx.settings), None, None


torch.library.register_autograd("deepatlas::jacobian_det", _det_backward, setup_context=_det_setup)
forbid_double_backward(_OP, "jacobian_det_backward")
