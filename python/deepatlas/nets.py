"""The two DeepAtlas networks: a VoxelMorph-style registration U-Net and a light 3-D segmentation U-Net.

Both take volumes ``[N, C, D, H, W]``. The registration network returns a displacement field ``[N, 3, D, H, W]`` in
voxels, channel i along spatial axis i of (D, H, W): the convention of :func:`deepatlas_cuda.warp`, so
``da.warp(moving, net(moving, fixed))`` is the moving image resampled onto the fixed one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import deepatlas_cuda as da

__all__ = ["RegistrationNet", "SegmentationNet", "count_parameters", "integrate_velocity"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Displacement ``[N, 3, D, H, W]`` of exp(v) for a stationary velocity field ``velocity`` (same shape, voxels),
    by scaling and squaring: ``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)`` (border padding).
    ``steps = 0`` returns ``velocity`` itself (a plain displacement field)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"integrate_velocity: steps must be a non-negative int, got {steps!r}")
    if velocity.dim() != 5 or velocity.shape[1] != 3:
        raise ValueError(f"integrate_velocity: velocity must be [N, 3, D, H, W], got {tuple(velocity.shape)}")
    displacement = velocity / 2**steps
    for _ in range(steps):
        displacement = displacement + da.warp(displacement, displacement)
    return displacement


def _check_channels(channels: Sequence[int], name: str, minimum: int) -> tuple[int, ...]:
    channels = tuple(channels)
    if len(channels) < minimum or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"{name} must be at least {minimum} positive ints, got {channels!r}")
    return channels


def _check_spatial(shape: torch.Size, factor: int, name: str, owner: str) -> None:
    if any(size % factor for size in shape[2:]):
        raise ValueError(f"{owner}: spatial sizes of {name} must be divisible by {factor}, got shape {tuple(shape)}")


@contextlib.contextmanager
def _restoring_buffers(module: nn.Module) -> Iterator[None]:
    """Undo any change to ``module``'s buffers made inside the block (BatchNorm running statistics updated by a
    checkpoint's recomputation would otherwise be updated twice per step)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class _Checkpointed(nn.Module):
    """Base for networks whose blocks may run under activation checkpointing (only while training with grad)."""

    checkpointing: bool

    def _run(self, block: nn.Module, *inputs: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _restoring_buffers(block)))
        return block(*inputs)


def _conv_act(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution (padding 1) + LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class RegistrationNet(_Checkpointed):
    """VoxelMorph-style U-Net on the concatenated (moving, fixed) pair -> displacement ``[N, 3, D, H, W]`` (voxels).

    Encoder: a 3x3x3 conv at full resolution to ``enc_channels[0]``, then one stride-2 conv per further entry
    (``L = len(enc_channels) - 1`` halvings, so spatial sizes must be divisible by ``2**L``; 16 by default).
    Decoder: the first ``L`` entries of ``dec_channels`` are a conv, a x2 (trilinear) upsampling and the
    concatenation of the encoder features of that resolution; the remaining entries are convs at full resolution.
    All convs are followed by LeakyReLU(0.2). A final 3x3x3 conv to 3 channels, weights ~ Normal(0, 1e-5) and zero
    bias, so the network starts at the identity transform.

    ``svf=True``: that output is a stationary velocity field, integrated by :func:`integrate_velocity` with
    ``integration_steps`` (diffeomorphic in the continuum limit). ``checkpointing=True``: every block runs under
    activation checkpointing while training with grad enabled (same results, less memory, more compute).
    """

    def __init__(self, enc_channels: Sequence[int] = (16, 32, 32, 32, 32),
                 dec_channels: Sequence[int] = (32, 32, 32, 32, 16, 16), svf: bool = False,
                 integration_steps: int = 7, checkpointing: bool = False):
        super().__init__()
        enc_channels = _check_channels(enc_channels, "RegistrationNet: enc_channels", 2)
        levels = len(enc_channels) - 1
        dec_channels = _check_channels(dec_channels, f"RegistrationNet: dec_channels (>= {levels} for "
                                                     f"{levels} levels)", levels)
        if not isinstance(integration_steps, int) or isinstance(integration_steps, bool) or integration_steps < 0:
            raise ValueError(f"RegistrationNet: integration_steps must be a non-negative int, got "
                             f"{integration_steps!r}")
        self.svf = bool(svf)
        self.integration_steps = integration_steps
        self.checkpointing = bool(checkpointing)
        self.factor = 2**levels

        self.encoder = nn.ModuleList([_conv_act(2, enc_channels[0])])
        for previous, current in zip(enc_channels[:-1], enc_channels[1:]):
            self.encoder.append(_conv_act(previous, current, stride=2))
        self.decoder = nn.ModuleList()
        channels = enc_channels[-1]
        for level in range(levels):
            self.decoder.append(_conv_act(channels, dec_channels[level]))
            channels = dec_channels[level] + enc_channels[levels - 1 - level]
        self.refine = nn.ModuleList()
        for width in dec_channels[levels:]:
            self.refine.append(_conv_act(channels, width))
            channels = width
        self.flow = nn.Conv3d(channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """``moving``, ``fixed`` ``[N, 1, D, H, W]`` -> ddf ``[N, 3, D, H, W]`` in voxels (``warp(moving, ddf)``
        approximates ``fixed``)."""
        for name, image in (("moving", moving), ("fixed", fixed)):
            if image.dim() != 5 or image.shape[1] != 1:
                raise ValueError(f"RegistrationNet: {name} must be [N, 1, D, H, W], got {tuple(image.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"RegistrationNet: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must "
                             f"have the same shape")
        _check_spatial(moving.shape, self.factor, "moving/fixed", "RegistrationNet")
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for block in self.encoder:
            x = self._run(block, x)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for block in self.decoder:
            x = self._run(block, x)
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = torch.cat([x, skips.pop()], dim=1)
        for block in self.refine:
            x = self._run(block, x)
        field = self._run(self.flow, x)
        if not self.svf:
            return field
        if field.dtype in (torch.float16, torch.bfloat16):  # autocast: integrate in float32, as every op runs
            field = field.float()
        with torch.autocast(field.device.type, enabled=False):
            return integrate_velocity(field, self.integration_steps)


_NORMS = {"batch": nn.BatchNorm3d, "instance": lambda channels: nn.InstanceNorm3d(channels, affine=True)}


class _DoubleConv(nn.Sequential):
    """Two (3x3x3 conv, norm, LeakyReLU(0.2)) layers."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        layers = []
        for channels in (in_channels, out_channels):
            layers += [nn.Conv3d(channels, out_channels, 3, padding=1, bias=False), _NORMS[norm](out_channels),
                       nn.LeakyReLU(0.2)]
        super().__init__(*layers)


class _Up(nn.Module):
    """x2 upsampling from ``in_channels`` to ``out_channels`` (transposed conv, or trilinear + 1x1x1 conv)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "transpose":
            return self.conv(x)
        return self.conv(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False))


class SegmentationNet(_Checkpointed):
    """Light 3-D U-Net: image ``[N, in_channels, D, H, W]`` -> logits ``[N, num_classes, D, H, W]``.

    One double-conv block (two 3x3x3 conv + ``norm`` + LeakyReLU(0.2)) per entry of ``channels``, 2x max-pooling
    between them (``L = len(channels) - 1`` poolings: spatial sizes divisible by ``2**L``, 8 by default). Up path:
    ``upsample`` ``'transpose'`` (2x2x2 transposed conv) or ``'trilinear'`` (trilinear x2 + 1x1x1 conv), skip
    concatenation, double-conv; then a 1x1x1 conv to the logits. ``norm`` ``'batch'`` or ``'instance'`` (affine).
    ``checkpointing=True``: each double-conv block is checkpointed while training with grad enabled.
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (8, 16, 32, 64), norm: str = "batch",
                 checkpointing: bool = False, in_channels: int = 1, upsample: str = "transpose"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"SegmentationNet: num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"SegmentationNet: in_channels must be a positive int, got {in_channels!r}")
        if norm not in _NORMS:
            raise ValueError(f"SegmentationNet: norm must be one of {list(_NORMS)}, got {norm!r}")
        if upsample not in ("transpose", "trilinear"):
            raise ValueError(f"SegmentationNet: upsample must be 'transpose' or 'trilinear', got {upsample!r}")
        channels = _check_channels(channels, "SegmentationNet: channels", 2)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.checkpointing = bool(checkpointing)
        self.factor = 2 ** (len(channels) - 1)
        self.down = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.down.append(_DoubleConv(previous, width, norm))
            previous = width
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for deeper, width in zip(channels[:0:-1], channels[-2::-1]):
            self.ups.append(_Up(deeper, width, upsample))
            self.up_blocks.append(_DoubleConv(2 * width, width, norm))
        self.head = nn.Conv3d(channels[0], num_classes, 1)

    def forward(self, image: Tensor) -> Tensor:
        """``image`` ``[N, in_channels, D, H, W]`` -> logits ``[N, num_classes, D, H, W]``."""
        if image.dim() != 5 or image.shape[1] != self.in_channels:
            raise ValueError(f"SegmentationNet: image must be [N, {self.in_channels}, D, H, W], got "
                             f"{tuple(image.shape)}")
        _check_spatial(image.shape, self.factor, "image", "SegmentationNet")
        skips = []
        x = image
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool3d(x, 2)
            x = self._run(block, x)
            skips.append(x)
        skips.pop()
        for up, block in zip(self.ups, self.up_blocks):
            x = torch.cat([up(x), skips.pop()], dim=1)
            x = self._run(block, x)
        return self.head(x)
