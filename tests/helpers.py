"""Input generators and comparison helpers shared by the op tests."""

import os

import torch

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


NO_AVX2_COPY = "no AVX2 copy of the CPU loops here (a CPU without AVX2, DEEPATLAS_NATIVE=1, or not g++ on x86-64)"


def avx2_copy_available() -> bool:
    """Whether this build and CPU have the AVX2 copy of the CPU loops (csrc/cpu/isa.h), whatever
    DEEPATLAS_CPU_BASELINE selects at the moment."""
    selected = os.environ.pop("DEEPATLAS_CPU_BASELINE", None)
    try:
        return torch.ops.deepatlas.cpu_loops() == "avx2"
    finally:
        if selected is not None:
            os.environ["DEEPATLAS_CPU_BASELINE"] = selected


def random_grid(n, d, h, w, dtype=torch.float32, device="cpu", spread=1.5, special=True):
    """A normalised grid [N, D, H, W, 3] of random locations in [-spread, spread]; with special=True about a
    quarter of the entries are replaced by points exactly on the borders, on voxel centres and far outside."""
    grid = (torch.rand(n, d, h, w, 3, dtype=torch.float64) * 2 - 1) * spread
    if special:
        values = torch.tensor([-1.0, 1.0, 0.0, -1.0 - 1e-7, 1.0 + 1e-7, 0.5, -0.5, 3.0, -7.5, 1e3, -1e5, 1e8],
                              dtype=torch.float64)
        mask = torch.rand(grid.shape) < 0.25
        grid[mask] = values[torch.randint(len(values), (int(mask.sum()),))]
    return grid.to(dtype=dtype, device=device)


def random_ddf(n, d, h, w, dtype=torch.float32, device="cpu", scale=2.0):
    """A displacement field [N, 3, D, H, W] in voxels, random in [-scale, scale] along every axis."""
    return ((torch.rand(n, 3, d, h, w, dtype=torch.float64) * 2 - 1) * scale).to(dtype=dtype, device=device)


def to_layout(t, layout):
    """Same values in another memory layout: contiguous, channels_last (5-D) or a non-contiguous view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last_3d) if t.dim() == 5 else t
    if layout == "strided":
        # A view with non-unit strides on every axis: embed in a larger buffer and slice every other element.
        big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype, device=t.device)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    raise ValueError(layout)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
