"""deepatlas_cuda: CUDA and CPU kernels for 3-D image registration, as PyTorch autograd ops.

    import deepatlas_cuda as da
    out = da.grid_sample(volume, grid)        # drop-in for torch.nn.functional.grid_sample
    moved = da.warp(image, ddf)               # out[x] = image[x + ddf[x]], ddf in voxels, no grid built
    seg = da.warp_labels(labels, ddf)         # integer labels, nearest; mode="soft" -> differentiable one-hot warp
    dice = da.warped_dice(labels, ddf, target, num_classes=K)  # [N, K], no warped K-channel volume
    det = da.jacobian_det(ddf)                # det(I + grad u) per voxel; da.folding_stats(ddf) for the summary
"""

from __future__ import annotations

import torch

from ._loader import STATE as _STATE
from .dice import warped_dice
from .jacobian import folding_stats, jacobian_det
from .labels import warp_labels
from .ops import grid_sample, warp

__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "folding_stats", "grid_sample", "jacobian_det", "warp", "warp_labels",
           "warped_dice"]


def build_info() -> dict:
    """How this installation was built and loaded."""
    return {
        "version": __version__,
        "torch_version": torch.__version__,
        "cpu_kernels": True,
        "cuda_kernels": _STATE.cuda_loaded,
        "cuda_version": _STATE.config.get("cuda_version"),
        "cuda_arch_list": _STATE.config.get("cuda_arch_list", []),
        "debug": _STATE.config.get("debug", False),
        "native": _STATE.config.get("native", False),  # built with DEEPATLAS_NATIVE=1
        # The CPU's row loops run their AVX2 copy ("avx2") or the build's own target ("baseline"): csrc/cpu/isa.h.
        "cpu_loops": torch.ops.deepatlas.cpu_loops(),
        "loaded_from": _STATE.loaded_from,
        "libraries": list(_STATE.libraries),
        "openmp_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
