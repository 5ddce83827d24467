"""What each training step sees: image pairs (or single labelled images) drawn from a generator seeded by the run
seed and the global step, so that a resumed run, or the same run split over DDP processes, draws exactly the same
global batch as an uninterrupted single-process run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import REG, SEG_JOINT, SEG_SUPERVISED

_STEP_STRIDE = 1_000_003


@dataclass
class Volumes:
    """The training set in memory. ``images`` [M, 1, D, H, W] float32, ``labels`` [M, 1, D, H, W] int64 (zeros where
    unlabelled), ``labelled`` [M] bool: whether the manual labels of image m may be used."""
    images: Tensor
    labels: Tensor
    labelled: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 5 or self.images.shape[1] != 1:
            raise ValueError(f"images must be [M, 1, D, H, W], got {tuple(self.images.shape)}")
        if self.labels.shape != self.images.shape:
            raise ValueError(f"labels must match images {tuple(self.images.shape)}, got {tuple(self.labels.shape)}")
        if self.labelled.shape != (self.images.shape[0],):
            raise ValueError(f"labelled must be [M={self.images.shape[0]}], got {tuple(self.labelled.shape)}")
        if len(self) < 2:
            raise ValueError(f"training needs at least 2 images to form pairs, got {len(self)}")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Batch:
    """One process's share of a step. Pair steps: ``moving``/``fixed`` images [B, 1, D, H, W], labels and
    ``*_labelled`` [B] flags. Supervised steps use only the ``moving`` side."""
    moving: Tensor
    fixed: Tensor | None
    moving_labels: Tensor
    fixed_labels: Tensor | None
    moving_labelled: Tensor
    fixed_labelled: Tensor | None

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(*(move(t) for t in (self.moving, self.fixed, self.moving_labels, self.fixed_labels,
                                         self.moving_labelled, self.fixed_labelled)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _STEP_STRIDE + step)


def draw_indices(volumes: Volumes, kind: str, batch_size: int, generator: torch.Generator) -> Tensor:
    """Global batch of indices: [B, 2] (moving, fixed) for pair steps, [B, 1] for supervised steps.

    - REG: pairs of distinct images drawn uniformly from all training images, labelled or not.
    - SEG_JOINT: pairs of distinct images with at least one labelled image (pairs without labels give F_S no loss,
      so drawing only the others is the same objective without the empty steps).
    - SEG_SUPERVISED: labelled images."""
    count = len(volumes)
    labelled = volumes.labelled
    if kind == SEG_SUPERVISED:
        candidates = labelled.nonzero().flatten()
        if candidates.numel() == 0:
            raise ValueError("a supervised segmentation step needs at least one labelled training image")
        pick = torch.randint(candidates.numel(), (batch_size,), generator=generator)
        return candidates[pick][:, None]
    moving, fixed = torch.meshgrid(torch.arange(count), torch.arange(count), indexing="ij")
    keep = moving != fixed
    if kind == SEG_JOINT:
        keep &= labelled[:, None] | labelled[None, :]
    elif kind != REG:
        raise ValueError(f"unknown step kind {kind!r}")
    pairs = torch.stack([moving[keep], fixed[keep]], dim=1)  # [P, 2]
    if pairs.shape[0] == 0:
        raise ValueError("a joint segmentation step needs at least one labelled training image")
    return pairs[torch.randint(pairs.shape[0], (batch_size,), generator=generator)]


def mirrored_classes(pairs: list[list[int]], num_classes: int, label_map: dict[int, int] | None = None
                     ) -> Tensor | None:
    """[K] int64: the class each class becomes when a flip mirrors an image (left and right structures trade
    places): the classes of each pair swapped, every other class itself; None without pairs. ``pairs`` holds label
    values as in the label files, read through ``label_map`` {original: class} when there is one."""
    if not pairs:
        return None
    table = torch.arange(num_classes)
    for pair in pairs:
        if label_map:
            missing = [value for value in pair if value not in label_map]
            if missing:
                raise ValueError(f"flip_label_pairs {pair}: label(s) {missing} are not in label_map")
        first, second = (label_map[value] if label_map else value for value in pair)
        if max(first, second) >= num_classes:
            raise ValueError(f"flip_label_pairs {pair}: the data has {num_classes} classes (0..{num_classes - 1})")
        if first == second:  # label_map merged the two sides into one class
            continue
        if table[first] != first or table[second] != second:
            raise ValueError(f"flip_label_pairs {pair}: class {first} or {second} is already in another pair")
        table[first], table[second] = second, first
    return table


def make_batch(volumes: Volumes, indices: Tensor, flips: Tensor, lr_axis: int, mirror: Tensor | None = None
               ) -> Batch:
    """Gather the images of ``indices`` [B, 1 or 2]; flip both sides of pair b along ``lr_axis`` (of D, H, W)
    where ``flips[b]``, and send each class of a flipped label map through ``mirror`` [K] (see
    :func:`mirrored_classes`) when given."""
    dim = 2 + lr_axis

    def take(tensor: Tensor, column: int, classes: Tensor | None = None) -> Tensor:
        out = tensor[indices[:, column]]
        if flips.any():
            flipped = out.flip(dim)
            if classes is not None:
                flipped = classes.to(flipped.device)[flipped]
            out = torch.where(flips.view(-1, 1, 1, 1, 1), flipped, out)
        return out

    moving, moving_labels = take(volumes.images, 0), take(volumes.labels, 0, mirror)
    moving_labelled = volumes.labelled[indices[:, 0]]
    if indices.shape[1] == 1:
        return Batch(moving, None, moving_labels, None, moving_labelled, None)
    return Batch(moving, take(volumes.images, 1), moving_labels, take(volumes.labels, 1, mirror), moving_labelled,
                 volumes.labelled[indices[:, 1]])


def draw_batch(volumes: Volumes, kind: str, seed: int, step: int, batch_size: int, flip: bool, lr_axis: int,
               rank: int = 0, world_size: int = 1, mirror: Tensor | None = None) -> Batch:
    """This process's share of global step ``step``: the global batch is drawn identically everywhere, then
    split into ``world_size`` equal consecutive slices."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
    generator = step_generator(seed, step)
    indices = draw_indices(volumes, kind, batch_size, generator)
    flips = torch.rand(batch_size, generator=generator) < 0.5 if flip else torch.zeros(batch_size, dtype=torch.bool)
    share = batch_size // world_size
    mine = slice(rank * share, (rank + 1) * share)
    return make_batch(volumes, indices[mine], flips[mine], lr_axis, mirror)
