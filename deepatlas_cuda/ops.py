"""Public ops: argument checks with readable errors, then the native kernels through torch.ops.deepatlas.
Fake (meta) kernels and autograd formulas are registered here, so the ops work under torch.compile."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autodiff import forbid_double_backward, reject_forward_ad
from ._loader import REBUILD_HINT, STATE

_INTERPOLATION = {"bilinear": 0, "nearest": 1}
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _code(table: dict, value, argument: str, op: str) -> int:
    if value not in table:
        raise ValueError(f"{op}: {argument} must be one of {list(table)}, got {value!r}")
    return table[value]


def _check_tensor(value, name: str, op: str, dims: int, layout: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape {tuple(value.shape)}")
    if value.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {value.dtype}")


def _check_pair(first: Tensor, second: Tensor, names: tuple[str, str], op: str) -> None:
    if first.device != second.device:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must be on the same device, got {first.device} and "
                         f"{second.device}")
    if first.device.type not in ("cpu", "cuda", "meta"):  # meta: shapes only, through the fake kernels
        raise ValueError(f"{op}: only CPU, CUDA and meta tensors are supported, got {first.device}")
    if first.is_cuda and not STATE.cuda_loaded:
        raise RuntimeError(f"{op}: this deepatlas_cuda build has no CUDA kernels; {REBUILD_HINT}")
    dtypes = {first.dtype, second.dtype}
    if first.device.type != "cpu":
        ok = dtypes == {torch.float64} or torch.float64 not in dtypes
        expected = "both float64, or any mix of float16, bfloat16 and float32"
    else:
        ok = len(dtypes) == 1 and first.dtype in (torch.float32, torch.float64)
        expected = "both float32 or both float64 on the CPU"
    if not ok:
        raise TypeError(f"{op}: unsupported dtypes {names[0]}={first.dtype}, {names[1]}={second.dtype}; expected "
                        f"{expected}")
    if any(size == 0 for size in first.shape[2:]):
        raise ValueError(f"{op}: {names[0]} must have non-empty spatial dimensions, got {tuple(first.shape)}")


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = False) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.grid_sample`.

    5-D input ``[N, C, D, H, W]`` with grid ``[N, D', H', W', 3]`` (x, y, z = W, H, D, in [-1, 1]) runs the
    deepatlas kernels, returning ``[N, C, D', H', W']``; modes ``bilinear`` and ``nearest``; padding ``zeros``,
    ``border`` and ``reflection``. Other inputs (4-D, bicubic) are handed to torch unchanged. A NaN grid location
    samples 0 and gets gradient 0; an infinite one is clamped to the edge with ``border`` padding and samples 0
    otherwise.
    """
    if not isinstance(input, Tensor) or input.dim() != 5 or mode == "bicubic":
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    op = "deepatlas_cuda.grid_sample"
    interpolation = _code(_INTERPOLATION, mode, "mode", op)
    padding = _code(_PADDING, padding_mode, "padding_mode", op)
    _check_tensor(input, "input", op, 5, "[N, C, D, H, W]")
    _check_tensor(grid, "grid", op, 5, "[N, D', H', W', 3]")
    if grid.shape[-1] != 3:
        raise ValueError(f"{op}: grid must be [N, D', H', W', 3], got shape {tuple(grid.shape)}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: grid batch size {grid.shape[0]} must equal input batch size {input.shape[0]}")
    _check_pair(input, grid, ("input", "grid"), op)
    reject_forward_ad(op, input, grid)
    return torch.ops.deepatlas.grid_sample_3d(input, grid, interpolation, padding, bool(align_corners))


def warp(image: Tensor, ddf: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Warp ``image`` by a dense displacement field: ``out[x] = image[x + ddf[x]]``.

    ``image`` ``[N, C, D, H, W]`` (or ``[1, C, D, H, W]``, broadcast over the batch); ``ddf`` ``[N, 3, D, H, W]``
    in voxels, channel i along spatial axis i (D, H, W) — the VoxelMorph / MONAI convention. Equal to
    ``F.grid_sample(image, normalise(identity + ddf), align_corners=True)`` without building the grid; only the
    inputs are saved for backward. Modes ``bilinear`` / ``nearest``, padding ``border`` / ``zeros`` / ``reflection``.
    """
    op = "deepatlas_cuda.warp"
    interpolation = _code(_INTERPOLATION, mode, "mode", op)
    padding = _code(_PADDING, padding_mode, "padding_mode", op)
    _check_tensor(image, "image", op, 5, "[N, C, D, H, W]")
    _check_tensor(ddf, "ddf", op, 5, "[N, 3, D, H, W]")
    if ddf.shape[1] != 3:
        raise ValueError(f"{op}: ddf must be [N, 3, D, H, W] (3 displacement channels), got shape "
                         f"{tuple(ddf.shape)}")
    if image.shape[2:] != ddf.shape[2:]:
        raise ValueError(f"{op}: image spatial shape {tuple(image.shape[2:])} must equal ddf spatial shape "
                         f"{tuple(ddf.shape[2:])}")
    if image.shape[0] not in (1, ddf.shape[0]):
        raise ValueError(f"{op}: image batch size {image.shape[0]} must be 1 or equal the ddf batch size "
                         f"{ddf.shape[0]}")
    _check_pair(image, ddf, ("image", "ddf"), op)
    reject_forward_ad(op, image, ddf)
    return torch.ops.deepatlas.warp(image, ddf, interpolation, padding)


# ---- fake kernels: shapes and dtypes only, for torch.compile and meta tensors --------------------------------


def _sampled_shape(input: Tensor, coords: Tensor, grid_layout: bool) -> tuple[int, ...]:
    spatial = coords.shape[1:4] if grid_layout else coords.shape[2:5]
    return (coords.shape[0], input.shape[1], *spatial)


def _backward_outputs(input: Tensor, coords: Tensor, output_mask) -> tuple[Tensor, Tensor]:
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty(0)
    grad_coords = coords.new_empty(coords.shape) if output_mask[1] else coords.new_empty(0)
    return grad_input, grad_coords


@torch.library.register_fake("deepatlas::grid_sample_3d")
def _grid_sample_fake(input, grid, interpolation, padding, align_corners):
    return input.new_empty(_sampled_shape(input, grid, grid_layout=True))


@torch.library.register_fake("deepatlas::grid_sample_3d_backward")
def _grid_sample_backward_fake(grad_output, input, grid, interpolation, padding, align_corners, output_mask):
    return _backward_outputs(input, grid, output_mask)


@torch.library.register_fake("deepatlas::warp")
def _warp_fake(image, ddf, interpolation, padding):
    return image.new_empty(_sampled_shape(image, ddf, grid_layout=False))


@torch.library.register_fake("deepatlas::warp_backward")
def _warp_backward_fake(grad_output, image, ddf, interpolation, padding, output_mask):
    return _backward_outputs(image, ddf, output_mask)


# ---- autograd: save only the inputs; the backward ops recompute locations and weights -----------------------


def _setup_sample(ctx, inputs, output):
    input, coords, *settings = inputs
    ctx.save_for_backward(input, coords)
    ctx.settings = settings


def _grid_sample_backward(ctx, grad_output):
    input, grid = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_grid = torch.ops.deepatlas.grid_sample_3d_backward(grad_output, input, grid, *ctx.settings,
                                                                        mask)
    return (grad_input if mask[0] else None, grad_grid if mask[1] else None, None, None, None)


def _warp_backward(ctx, grad_output):
    image, ddf = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_image, grad_ddf = torch.ops.deepatlas.warp_backward(grad_output, image, ddf, *ctx.settings, mask)
    return (grad_image if mask[0] else None, grad_ddf if mask[1] else None, None, None)


torch.library.register_autograd("deepatlas::grid_sample_3d", _grid_sample_backward, setup_context=_setup_sample)
torch.library.register_autograd("deepatlas::warp", _warp_backward, setup_context=_setup_sample)
forbid_double_backward("deepatlas_cuda.grid_sample", "grid_sample_3d_backward")
forbid_double_backward("deepatlas_cuda.warp", "warp_backward")
