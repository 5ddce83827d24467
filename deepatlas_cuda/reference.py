"""Pure-PyTorch versions of every op: the test oracle and the "plain PyTorch" baseline of the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def identity_grid(shape, dtype=torch.float32, device="cpu") -> Tensor:
    """Voxel coordinates [3, D, H, W], channel i = index along spatial axis i."""
    axes = [torch.arange(size, dtype=dtype, device=device) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def ddf_to_grid(ddf: Tensor) -> Tensor:
    """identity + ddf [N, 3, D, H, W] (voxels) -> normalised grid [N, D, H, W, 3] in (x, y, z) order for
    F.grid_sample(align_corners=True). Needs every spatial size > 1."""
    spatial = ddf.shape[2:]
    if min(spatial) < 2:
        raise ValueError(f"the grid_sample pipeline needs spatial sizes > 1, got {tuple(spatial)}")
    location = identity_grid(spatial, ddf.dtype, ddf.device) + ddf
    scale = torch.tensor([2.0 / (s - 1) for s in spatial], dtype=ddf.dtype, device=ddf.device)
    normalised = location * scale.view(1, 3, 1, 1, 1) - 1
    return normalised.permute(0, 2, 3, 4, 1).flip(-1)


def warp(image: Tensor, ddf: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """What users run today: identity + ddf, normalise, permute, F.grid_sample(align_corners=True)."""
    if image.shape[0] == 1 and ddf.shape[0] > 1:
        image = image.expand(ddf.shape[0], *image.shape[1:])
    return F.grid_sample(image, ddf_to_grid(ddf), mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_labels_soft(labels: Tensor, ddf: Tensor, num_classes: int) -> Tensor:
    """One-hot [N, K, D, H, W], then the plain warp pipeline with zeros padding."""
    one_hot = F.one_hot(labels[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(ddf.dtype)
    return warp(one_hot, ddf, "bilinear", "zeros")


def warp_labels_nearest(labels: Tensor, ddf: Tensor, padding_value: int = 0) -> Tensor:
    """F.grid_sample(mode='nearest') on float-cast labels, cast back; padding_value where the point is outside."""
    warped = warp(labels.to(ddf.dtype), ddf, "nearest", "zeros")
    inside = warp(torch.ones_like(labels, dtype=ddf.dtype), ddf, "nearest", "zeros") > 0.5
    return torch.where(inside, warped, torch.full_like(warped, padding_value)).to(labels.dtype)


def _difference(u: Tensor, dim: int, scheme: str) -> Tensor:
    """Finite difference of u along dim with jacobian.h's stencils (one-sided at the borders), in index units."""
    n = u.shape[dim]
    if n < 2:
        return torch.zeros_like(u)
    first = u.narrow(dim, 1, 1) - u.narrow(dim, 0, 1)
    last = u.narrow(dim, n - 1, 1) - u.narrow(dim, n - 2, 1)
    steps = u.narrow(dim, 1, n - 1) - u.narrow(dim, 0, n - 1)  # u[i + 1] - u[i]
    if scheme == "forward":
        return torch.cat([steps, last], dim)
    if scheme == "backward":
        return torch.cat([first, steps], dim)
    inner = (u.narrow(dim, 2, n - 2) - u.narrow(dim, 0, n - 2)) / 2
    return torch.cat([first, inner, last], dim)


def jacobian_det(ddf: Tensor, spacing=(1.0, 1.0, 1.0), scheme: str = "central") -> Tensor:
    """det(I + grad u) with plain tensor finite differences: the test oracle and the benchmark baseline."""
    columns = [_difference(ddf, 2 + j, scheme) / spacing[j] for j in range(3)]  # d u / d x_j, [N, 3, D, H, W]
    jac = torch.stack(columns, dim=2)  # [N, 3 (i), 3 (j), D, H, W]
    jac = jac + torch.eye(3, dtype=ddf.dtype, device=ddf.device).view(1, 3, 3, 1, 1, 1)
    return torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2)).unsqueeze(1)


def soft_dice(prediction: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """(2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per [N, K] over the spatial axes."""
    intersection = (prediction * target).flatten(2).sum(-1)
    return (2 * intersection + eps) / (prediction.flatten(2).sum(-1) + target.flatten(2).sum(-1) + eps)


def warped_dice(source: Tensor, ddf: Tensor, target: Tensor, num_classes: int, eps: float = 1e-6) -> Tensor:
    """Warp-then-Dice the usual way: one-hot source, F.grid_sample, one-hot target, soft Dice."""
    warped = warp_labels_soft(source, ddf, num_classes)
    if not target.is_floating_point():
        target = F.one_hot(target[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(ddf.dtype)
    return soft_dice(warped, target, eps)


def warped_probability_dice(source: Tensor, ddf: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Warp-then-Dice for a probability source [N or 1, K, D, H, W]: F.grid_sample (zeros padding) builds the warped
    K-channel volume, then soft Dice against the target (one-hot when given as labels [N, 1, D, H, W])."""
    num_classes = source.shape[1]
    warped = warp(source, ddf, "bilinear", "zeros")
    if not target.is_floating_point():
        target = F.one_hot(target[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(ddf.dtype)
    return soft_dice(warped, target, eps)
