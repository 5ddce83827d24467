"""From the model's grid back to a file's own grid.

``register`` and ``segment`` run the networks on the preprocessed volume (reoriented, resampled, padded: the model
grid). These helpers sample model-grid results at the voxels of an input file as stored on disk (its shape and
affine), so outputs overlay the user's images directly. Points are voxel indices in array-axis order (D, H, W);
sampling goes through ``deepatlas_cuda.grid_sample`` (align_corners=True), on the device the tensors are on, a slab
of rows at a time so that memory stays bounded at any resolution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

import deepatlas_cuda as da

SLAB_VALUES = 1 << 23  # sampled values per slab (channels x voxels): 32 MB of float32


def voxel_map(source_affine: np.ndarray, target_affine: np.ndarray) -> Tensor:
    """[4, 4] float64: voxel indices on the grid of ``source_affine`` -> voxel indices on the grid of
    ``target_affine`` (the same world point)."""
    return torch.from_numpy(np.linalg.inv(np.asarray(target_affine, np.float64)) @ np.asarray(source_affine))


def apply_affine(matrix: Tensor, points: Tensor) -> Tensor:
    """``matrix`` [4, 4] applied to ``points`` [..., 3]."""
    return points @ matrix[:3, :3].T.to(points) + matrix[:3, 3].to(points)


def slabs(shape: tuple[int, int, int], channels: int) -> Iterator[slice]:
    """Slices of the first axis of ``shape`` holding about SLAB_VALUES sampled values each (at least one row)."""
    rows = max(1, SLAB_VALUES // max(1, channels * shape[1] * shape[2]))
    for start in range(0, shape[0], rows):
        yield slice(start, min(start + rows, shape[0]))


def slab_points(shape: tuple[int, int, int], rows: slice, device: torch.device) -> Tensor:
    """Voxel indices [rows, H, W, 3] (float64) of the rows ``rows`` of a grid of ``shape``."""
    axes = [torch.arange(rows.start, rows.stop, dtype=torch.float64, device=device),
            torch.arange(shape[1], dtype=torch.float64, device=device),
            torch.arange(shape[2], dtype=torch.float64, device=device)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def sample(volume: Tensor, points: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``volume`` [C, D, H, W] at ``points`` [..., 3] (voxel indices, (D, H, W) order) -> [C, ...] in the
    volume's dtype. ``mode`` 'bilinear' / 'nearest', ``padding_mode`` 'zeros' / 'border' as in grid_sample. An axis
    of size 1 holds its one value along the whole axis."""
    sizes = torch.tensor(volume.shape[1:], dtype=torch.float64, device=points.device)
    normalised = 2 * points / (sizes - 1).clamp(min=1) - 1
    grid = normalised.flip(-1).reshape(1, 1, 1, -1, 3).to(volume.dtype)  # (x, y, z) = (W, H, D)
    values = da.grid_sample(volume[None], grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return values.reshape(volume.shape[0], *points.shape[:-1])
