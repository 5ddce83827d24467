"""Seeded synthetic subjects in the spirit of SynthMorph: one base anatomy, deformed smoothly per subject.

Base "synthetic": an ellipsoidal head with a wavy outline; class 1 is its outer shell, classes 2..K-1 a Voronoi
partition of the inside with wavy boundaries (label 0 = background outside the head). Structures whose Voronoi
seeds are nearest neighbours (so they touch) get almost the same intensity, so the image alone is ambiguous and the
labels carry information. Base "mni": the MNI152 template (see ``mni.py``; 4 classes, ``num_classes`` ignored).

Each subject = base warped by a random smooth displacement (a coarse random field, upsampled and Gaussian-smoothed)
composed with a small random affine; the labels are warped with nearest-neighbour interpolation. The image is the
subject's structure intensities (synthetic) or the warped T1 (mni), times a smooth multiplicative bias field,
blurred, plus Gaussian noise, then clipped to its 0.5 / 99.5 percentiles and rescaled to [0, 1]. Optionally
(``grain``) one structure of each look-alike pair also gets a texture of its own, fresh noise per subject.

Randomness: the base comes from seed ``(seed, 0)``, subject i from ``(seed, 1, i)``, so the first n subjects do not
depend on how many are generated.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import deepatlas_cuda

from .preprocess import normalise_intensity
from .subject import Subject

REFERENCE_SIZE = 64          # displacement amplitudes are given in voxels of a 64-voxel volume
SHELL = 0.82                 # inner boundary of the head's shell, in units of the head radius
PAIR_OFFSET = 0.04           # intensity difference between the two structures of a similar-looking pair


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], channels: int, control: int = 5
                 ) -> np.ndarray:
    """Random smooth field [channels, D, H, W]: N(0, 1) on a ``control``^3 grid, trilinearly upsampled, smoothed
    with a Gaussian of about half the control spacing, rescaled to zero mean and unit standard deviation."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, control, control, control)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()
    sigma = [0] + [n / (control - 1) / 2 for n in shape]
    field = ndimage.gaussian_filter(field, sigma, mode="nearest")
    field -= field.mean(axis=(1, 2, 3), keepdims=True)
    return field / np.maximum(field.std(axis=(1, 2, 3), keepdims=True), 1e-6)


def centred_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel coordinates relative to the volume centre, [3, D, H, W] float32."""
    axes = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def rotation(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation from three angles (radians) about the three array axes."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = np.cos(angle)
        turn[i, j], turn[j, i] = -np.sin(angle), np.sin(angle)
        matrix = matrix @ turn
    return matrix


def random_displacement(rng: np.random.Generator, shape: tuple[int, int, int], deformation: float,
                        affine_jitter: float) -> torch.Tensor:
    """Displacement [1, 3, D, H, W] in voxels (channel i along axis i): a smooth field with per-axis RMS
    ``deformation`` (scaled by min(shape) / 64) plus an affine about the centre with rotations up to
    ``affine_jitter`` * 90 degrees, scalings up to 1 +- ``affine_jitter`` and shifts up to ``affine_jitter`` * 32
    voxels (both scaled likewise)."""
    scale = min(shape) / REFERENCE_SIZE
    ddf = smooth_field(rng, shape, 3) * (deformation * scale)
    grid = centred_grid(shape)
    angles = rng.uniform(-1, 1, 3) * affine_jitter * np.pi / 2
    matrix = rotation(angles) @ np.diag(1 + rng.uniform(-1, 1, 3) * affine_jitter)
    shift = rng.uniform(-1, 1, 3) * affine_jitter * REFERENCE_SIZE / 2 * scale
    linear = np.einsum("ij,j...->i...", (matrix - np.eye(3)).astype(np.float32), grid)
    ddf += linear + shift.astype(np.float32)[:, None, None, None]
    return torch.from_numpy(np.ascontiguousarray(ddf, dtype=np.float32))[None]


def farthest_points(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` well-spread rows of ``candidates`` [P, 3] (greedy farthest-point sampling)."""
    chosen = [int(rng.integers(len(candidates)))]
    distance = np.linalg.norm(candidates - candidates[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[chosen[-1]], axis=1))
    return candidates[chosen]


def pair_intensities(seeds: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(intensity, is-second) of each Voronoi structure: nearest-neighbour seeds are paired greedily and share a
    level (the second one ``PAIR_OFFSET`` brighter); levels are spread over [0.35, 0.95] in random order."""
    unpaired, pairs = list(range(len(seeds))), []
    while unpaired:
        first = unpaired.pop(0)
        if unpaired:
            nearest = min(unpaired, key=lambda k: np.linalg.norm(seeds[k] - seeds[first]))
            unpaired.remove(nearest)
            pairs.append((first, nearest))
        else:
            pairs.append((first,))
    levels = rng.permutation(np.linspace(0.35, 0.95, len(pairs)))
    values, second = np.zeros(len(seeds)), np.zeros(len(seeds), dtype=bool)
    for level, pair in zip(levels, pairs):
        for rank, k in enumerate(pair):
            values[k] = level + rank * PAIR_OFFSET
            second[k] = rank == 1
    return values, second


def synthetic_base(shape: tuple[int, int, int], num_classes: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels int64 [D, H, W] in [0, K), class intensities float [K], grained bool [K]: the second structure of
    each similar-looking pair) of the synthetic base anatomy."""
    grid = centred_grid(shape)
    radii = 0.42 * np.array(shape, dtype=np.float32)
    radius = np.sqrt(((grid / radii[:, None, None, None]) ** 2).sum(0))
    radius *= 1 + 0.06 * smooth_field(rng, shape, 1, control=4)[0]        # wavy head outline
    labels = np.zeros(shape, dtype=np.int64)
    labels[radius < 1] = 1
    intensities, grained = np.zeros(num_classes), np.zeros(num_classes, dtype=bool)
    intensities[1] = 0.2
    inner = radius < SHELL
    if num_classes > 2:
        directions = rng.standard_normal((2000, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        candidates = directions * rng.uniform(0, 1, (2000, 1)) ** (1 / 3) * radii * SHELL * 0.75
        seeds = farthest_points(candidates, num_classes - 2, rng)
        wavy = grid + smooth_field(rng, shape, 3) * (0.04 * min(shape))     # wavy structure boundaries
        distance = np.stack([np.sqrt(((wavy - s[:, None, None, None]) ** 2).sum(0)) for s in seeds])
        labels[inner] = 2 + distance[:, inner].argmin(0)
        intensities[2:], grained[2:] = pair_intensities(seeds, rng)
    return labels, intensities, grained


def corrupt(image: np.ndarray, rng: np.random.Generator, bias: float, blur: float, noise: float,
            texture: np.ndarray | None = None) -> np.ndarray:
    """Bias field exp(``bias`` * smooth field), Gaussian blur (sigma ``blur`` voxels), plus ``texture`` (if given)
    and noise (std ``noise``), then percentile normalisation to [0, 1]; float32 [D, H, W]."""
    image = image * np.exp(bias * smooth_field(rng, image.shape, 1, control=3)[0])
    image = ndimage.gaussian_filter(image, blur) if blur > 0 else image
    image = image if texture is None else image + texture
    image = image + rng.normal(0, noise, image.shape)
    return normalise_intensity(image, (0.5, 99.5))


def synthetic_subjects(num_subjects: int, shape=(64, 64, 64), num_classes: int = 8, seed: int = 0,
                       base: str = "synthetic", deformation: float = 3.0, affine_jitter: float = 0.04,
                       bias: float = 0.2, blur: float = 0.7, noise: float = 0.03, num_test: int = 0,
                       grain: float = 0.0) -> list[Subject]:
    """``num_subjects`` labelled subjects named ``{base}_{i:03d}`` (see the module docstring).

    shape: volume size (any); num_classes: K incl. background (>= 2; base "mni" always has 4, see mni.py);
    deformation: per-axis RMS of the smooth displacement in voxels of a 64-voxel volume; affine_jitter: size of the
    random affine (see ``random_displacement``); bias / blur / noise: image corruption (see ``corrupt``); the last
    ``num_test`` subjects get split "test", the others "train"; grain (synthetic only): std of extra white noise
    (drawn afresh per subject, added after the blur) inside the second structure of each similar-looking pair, so
    the two differ in texture, which an intensity similarity between two subjects cannot align. Synthetic affine:
    1 mm voxels, origin at the centre.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"synthetic_subjects: shape must be three sizes >= 4, got {shape}")
    if num_subjects < 1 or not 0 <= num_test <= num_subjects:
        raise ValueError(f"synthetic_subjects: need num_subjects >= 1 and 0 <= num_test <= num_subjects, got "
                         f"{num_subjects} and {num_test}")
    if not grain >= 0:  # NaN too
        raise ValueError(f"synthetic_subjects: grain must be >= 0, got {grain}")
    if base == "synthetic":
        if num_classes < 2:
            raise ValueError(f"synthetic_subjects: num_classes must be >= 2 (background + head), got {num_classes}")
        base_labels, intensities, grained = synthetic_base(shape, num_classes, np.random.default_rng([seed, 0]))
        affine = np.eye(4)
        affine[:3, 3] = -(np.array(shape) - 1) / 2
    elif base == "mni":
        if grain:
            raise ValueError(f"synthetic_subjects: grain applies to base 'synthetic' only, got {grain} for 'mni'")
        from .mni import mni_base
        base_labels, t1, affine = mni_base(shape)
        base_image = torch.from_numpy(t1)[None, None]
    else:
        raise ValueError(f"synthetic_subjects: base must be 'synthetic' or 'mni', got {base!r}")
    label_tensor = torch.from_numpy(base_labels)[None, None]
    texture = None
    subjects = []
    for index in range(num_subjects):
        rng = np.random.default_rng([seed, 1, index])
        ddf = random_displacement(rng, shape, deformation, affine_jitter)
        label = deepatlas_cuda.warp_labels(label_tensor, ddf, mode="nearest", padding_value=0)[0, 0].numpy()
        if base == "synthetic":
            lookup = intensities + np.concatenate([[0.0], rng.normal(0, 0.02, len(intensities) - 1)])
            image = lookup[label]
            if grain:
                texture = np.where(grained[label], np.random.default_rng([seed, 2, index]).normal(0, grain, shape), 0)
        else:
            image = deepatlas_cuda.warp(base_image, ddf, padding_mode="zeros")[0, 0].numpy().astype(np.float64)
        image = corrupt(image, rng, bias, blur, noise, texture)
        split = "test" if index >= num_subjects - num_test else "train"
        subjects.append(Subject(f"{base}_{index:03d}", image, label.astype(np.int64), affine.copy(), split))
    return subjects
