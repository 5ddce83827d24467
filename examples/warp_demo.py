"""Runnable example of both ops: warp a volume by a smooth displacement field and check it against the plain
PyTorch pipeline; use grid_sample as a drop-in for torch.nn.functional.grid_sample.

    python examples/warp_demo.py
"""

import time

import torch
import torch.nn.functional as F

import deepatlas_cuda as da
from deepatlas_cuda import reference


def smooth_ddf(shape, amplitude=4.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 6, 6, 6, generator=generator) * amplitude
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def main():
    device = "cuda" if torch.cuda.is_available() and da.build_info()["cuda_kernels"] else "cpu"
    shape = (96, 112, 96)
    image = torch.rand(1, 1, *shape, device=device)
    ddf = smooth_ddf(shape).to(device).requires_grad_()

    da.warp(image, ddf).sum().backward()  # warm-up (first-call overheads), then time one step of each
    reference.warp(image, ddf).sum().backward()
    ddf.grad = None

    start = time.perf_counter()
    moved = da.warp(image, ddf)  # out[x] = image[x + ddf[x]]
    loss = (moved - image).square().mean()
    loss.backward()
    ours = time.perf_counter() - start

    ddf_ref = ddf.detach().clone().requires_grad_()
    start = time.perf_counter()
    moved_ref = reference.warp(image, ddf_ref)  # identity + ddf, normalise, permute, F.grid_sample
    (moved_ref - image).square().mean().backward()
    theirs = time.perf_counter() - start

    print(f"device: {device}; build: {da.build_info()['loaded_from']}")
    print(f"warp forward+backward {shape}: {ours * 1e3:.1f} ms (plain PyTorch: {theirs * 1e3:.1f} ms)")
    print(f"max |difference| output {(moved - moved_ref).abs().max():.2e}, "
          f"grad ddf {(ddf.grad - ddf_ref.grad).abs().max():.2e}")

    grid = F.affine_grid(torch.eye(3, 4).unsqueeze(0) * 0.9, (1, 1, 32, 32, 32), align_corners=False).to(device)
    drop_in = da.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch_out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    print(f"grid_sample drop-in: shape {tuple(drop_in.shape)}, max |difference| vs torch "
          f"{(drop_in - torch_out).abs().max():.2e}")


if __name__ == "__main__":
    main()
