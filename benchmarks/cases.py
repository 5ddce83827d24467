"""Benchmark cases shared by the pytest-benchmark suite, the memory helpers and the report script.

A case is (op, size, channels, variant, device); each case is run by two implementations on the same inputs:
"ours" (deepatlas_cuda) and "torch" (F.grid_sample, or deepatlas_cuda.reference.warp for warp).

Inputs are what registration actually feeds a sampler: a SMOOTH displacement field (random control points on an
8x8x8 lattice, std 4 voxels, trilinearly upsampled), a smooth image, and for grid_sample the normalised identity
grid (align_corners=False) plus that displacement in normalised units. Everything is generated on the CPU from one
fixed seed and then moved to the device, so the CPU and CUDA cases see identical numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import deepatlas_cuda
from deepatlas_cuda import reference

SEED = 0
BATCH = 1
DDF_STD_VOXELS = 4.0
CONTROL_POINTS = 8

# size name -> spatial shape (D, H, W)
SIZES: dict[str, tuple[int, int, int]] = {
    "64": (64, 64, 64),
    "128": (128, 128, 128),
    "full": (160, 192, 224),
}
SLOW_SIZES = ("full",)
CHANNELS = (1, 4)
OPS = ("warp", "grid_sample")
IMPLS = ("ours", "torch")

# variant -> (image requires grad, ddf/grid requires grad); "fwd" runs under torch.no_grad()
VARIANTS: dict[str, tuple[bool, bool]] = {
    "fwd": (False, False),
    "bwd_coords": (False, True),  # forward+backward, only the ddf/grid needs grad: the registration case
    "bwd_both": (True, True),  # forward+backward, image and ddf/grid need grad
}
VARIANT_LABELS = {
    "fwd": "forward (no_grad)",
    "bwd_coords": "fwd+bwd, grad ddf/grid",
    "bwd_both": "fwd+bwd, grad image+ddf/grid",
}

# sampler settings: the defaults of each op
GRID_SAMPLE_KW = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
WARP_KW = dict(mode="bilinear", padding_mode="border")


def size_shape(name: str) -> tuple[int, int, int]:
    """A key of SIZES, "N" (an N^3 cube) or "DxHxW"."""
    if name in SIZES:
        return SIZES[name]
    dims = tuple(int(part) for part in name.split("x"))
    return dims * 3 if len(dims) == 1 else dims


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "warp" | "grid_sample"
    size: str  # key of SIZES
    channels: int
    variant: str  # key of VARIANTS
    device: str = "cpu"

    @property
    def shape(self) -> tuple[int, int, int]:
        return size_shape(self.size)

    @property
    def voxels(self) -> int:
        d, h, w = self.shape
        return d * h * w

    @property
    def backward(self) -> bool:
        return self.variant != "fwd"

    @property
    def slow(self) -> bool:
        return self.size in SLOW_SIZES

    @property
    def id(self) -> str:
        return f"{self.op}-{'x'.join(map(str, self.shape))}-C{self.channels}-{self.variant}-{self.device}"


def all_cases(sizes: Iterable[str] = tuple(SIZES), devices: Iterable[str] = ("cpu",),
              ops: Iterable[str] = OPS, channels: Iterable[int] = CHANNELS,
              variants: Iterable[str] = tuple(VARIANTS)) -> list[Case]:
    """Every combination, in a stable order (device, size, op, channels, variant)."""
    return [Case(op, size, c, variant, device)
            for device in devices for size in sizes for op in ops for c in channels for variant in variants]


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ours_supported(device: str) -> bool:
    return device == "cpu" or bool(deepatlas_cuda.build_info()["cuda_kernels"])


# ---- input generators ------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def smooth_ddf(shape, batch: int = BATCH, std: float = DDF_STD_VOXELS, seed: int = SEED) -> torch.Tensor:
    """Smooth displacement field [N, 3, D, H, W] in voxels (channel i along spatial axis i), float32 on the CPU:
    N(0, std^2) on an 8x8x8 control lattice, trilinearly upsampled (align_corners=True)."""
    coarse = torch.randn(batch, 3, CONTROL_POINTS, CONTROL_POINTS, CONTROL_POINTS, generator=_generator(seed)) * std
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def smooth_image(shape, channels: int, batch: int = BATCH, seed: int = SEED + 1) -> torch.Tensor:
    """Smooth-ish random image [N, C, D, H, W] in [0, 1] plus a little noise, float32 on the CPU."""
    gen = _generator(seed)
    coarse = torch.rand(batch, channels, 16, 16, 16, generator=gen)
    image = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    image.add_(torch.randn(image.shape, generator=gen), alpha=0.05)
    return image


def ddf_to_normalised_grid(ddf: torch.Tensor) -> torch.Tensor:
    """identity + ddf as a grid [N, D, H, W, 3] (x, y, z order) for grid_sample with align_corners=False:
    voxel index i of an axis of size S maps to (2 i + 1) / S - 1, so a displacement of d voxels is 2 d / S."""
    spatial = ddf.shape[2:]
    identity = reference.identity_grid(spatial, ddf.dtype, ddf.device)  # [3, D, H, W], voxel units
    sizes = torch.tensor(spatial, dtype=ddf.dtype, device=ddf.device).view(1, 3, 1, 1, 1)
    normalised = (2 * (identity + ddf) + 1) / sizes - 1
    return normalised.permute(0, 2, 3, 4, 1).flip(-1).contiguous()


def make_inputs(case: Case, seed: int = SEED) -> dict[str, torch.Tensor]:
    """{"image", "coords" (ddf for warp, grid for grid_sample), "grad_out"} on the case's device, with
    requires_grad set as the variant says. grad_out (the upstream gradient) is random, seeded."""
    image = smooth_image(case.shape, case.channels, seed=seed + 1)
    ddf = smooth_ddf(case.shape, seed=seed)
    coords = ddf if case.op == "warp" else ddf_to_normalised_grid(ddf)
    grad_out = torch.randn(image.shape, generator=_generator(seed + 2)) if case.backward else None
    image_grad, coords_grad = VARIANTS[case.variant]
    image = image.to(case.device).requires_grad_(image_grad)
    coords = coords.to(case.device).contiguous().requires_grad_(coords_grad)
    out = {"image": image, "coords": coords}
    if grad_out is not None:
        out["grad_out"] = grad_out.to(case.device)
    return out


# ---- the two implementations -----------------------------------------------------------------------------------


def op_function(op: str, impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(image, coords) -> sampled, for op in OPS and impl in IMPLS."""
    if op == "warp":
        if impl == "ours":
            return lambda image, ddf: deepatlas_cuda.warp(image, ddf, **WARP_KW)
        return lambda image, ddf: reference.warp(image, ddf, **WARP_KW)
    if op == "grid_sample":
        if impl == "ours":
            return lambda image, grid: deepatlas_cuda.grid_sample(image, grid, **GRID_SAMPLE_KW)
        return lambda image, grid: F.grid_sample(image, grid, **GRID_SAMPLE_KW)
    raise ValueError(f"unknown op {op!r}")


def make_runner(case: Case, impl: str, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A zero-argument callable doing one timed step of the case: the forward under no_grad, or forward +
    backward(grad_out) with the leaf grads cleared first. CUDA work is synchronised before it returns."""
    f = op_function(case.op, impl)
    image, coords = inputs["image"], inputs["coords"]
    sync = torch.cuda.synchronize if image.is_cuda else (lambda: None)

    if not case.backward:
        def run() -> None:
            with torch.no_grad():
                f(image, coords)
            sync()
    else:
        grad_out = inputs["grad_out"]

        def run() -> None:
            image.grad = None
            coords.grad = None
            f(image, coords).backward(grad_out)
            sync()
    return run


# ---- the bytes-moved floor -------------------------------------------------------------------------------------


def bytes_moved_floor(op: str, variant: str, channels: int, in_voxels: int, out_voxels: int | None = None,
                      itemsize: int = 4) -> int:
    """The minimal bytes one step of the case must read plus write in DRAM, each tensor touched exactly once.

    With C channels, V_in input voxels, V_out output voxels (the sampled locations) and ``itemsize`` bytes per
    element (4 for float32), counting every tensor once per pass, as separate forward and backward passes
    (autograd runs them as two kernels; nothing is kept between them but the inputs):

    forward ("fwd"):           read image C*V_in + coordinates 3*V_out (ddf or grid), write output C*V_out
    + backward, grad coords:   read grad_out C*V_out, image C*V_in and coordinates 3*V_out again,
      ("bwd_coords")           write grad_coords 3*V_out
    + backward, both grads:    as above plus write grad_image C*V_in (once; a real kernel also has to
      ("bwd_both")             zero it and scatter-add into it, which this floor does not count)

    Sampling is counted as reading each image voxel once (true for a smooth field: neighbouring outputs reuse the
    same cache lines). The identity grid the plain-PyTorch warp builds is not counted: a floor for the op, not for
    an implementation. The same count holds for warp (ddf) and grid_sample (grid): both are 3 numbers a location.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    c, vi = channels, in_voxels
    vo = in_voxels if out_voxels is None else out_voxels
    elements = c * vi + 3 * vo + c * vo  # forward: image, coordinates, output
    if variant != "fwd":
        elements += c * vo + c * vi + 3 * vo + 3 * vo  # grad_out, image, coordinates, grad_coords
    if variant == "bwd_both":
        elements += c * vi  # grad_image
    return elements * itemsize


def case_floor_bytes(case: Case) -> int:
    return bytes_moved_floor(case.op, case.variant, case.channels, case.voxels)


H100_BANDWIDTH = 3.0e12  # bytes/s: the H100 SXM HBM3 figure used as a model, not a measurement
