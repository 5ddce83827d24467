"""The in-memory subject record shared by every data source, and batching of subjects into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

SPLITS = ("train", "val", "test")


@dataclass
class Subject:
    """One image, its optional label map, and where its voxels lie in the world.

    ``image`` float32 ``[D, H, W]`` in [0, 1]; ``label`` int64 ``[D, H, W]`` with values in [0, K), or None when the
    subject is unlabelled; ``affine`` float64 ``[4, 4]`` voxel -> world (mm); ``header`` the nibabel header when the
    subject was read from a file.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    split: str = "train"
    header: object | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"subject {self.name!r}: split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.image.ndim != 3:
            raise ValueError(f"subject {self.name!r}: image must be [D, H, W], got shape {self.image.shape}")
        if self.label is not None and self.label.shape != self.image.shape:
            raise ValueError(f"subject {self.name!r}: label shape {self.label.shape} differs from image shape "
                             f"{self.image.shape}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"subject {self.name!r}: affine must be 4x4, got shape {np.shape(self.affine)}")

    @property
    def labelled(self) -> bool:
        return self.label is not None


def stack_subjects(subjects: Sequence[Subject]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch subjects: images ``[M, 1, D, H, W]`` float32, labels ``[M, 1, D, H, W]`` int64 (0 where unlabelled),
    labelled bool ``[M]``. All subjects must share one shape (preprocess them to a common shape first)."""
    if len(subjects) == 0:
        raise ValueError("stack_subjects: got no subjects")
    shape = subjects[0].image.shape
    for subject in subjects:
        if subject.image.shape != shape:
            raise ValueError(f"stack_subjects: subject {subject.name!r} has shape {subject.image.shape} but "
                             f"{subjects[0].name!r} has {shape}; resample or crop them to one shape "
                             f"(preprocess: spacing and crop_shape, or shape)")
    images = np.stack([s.image.astype(np.float32, copy=False) for s in subjects])[:, None]
    labels = np.stack([s.label.astype(np.int64, copy=False) if s.labelled else np.zeros(shape, np.int64)
                       for s in subjects])[:, None]
    labelled = torch.tensor([s.labelled for s in subjects], dtype=torch.bool)
    return torch.from_numpy(images), torch.from_numpy(labels), labelled


def left_right_axis(subjects: Sequence[Subject]) -> int:
    """The array axis (0, 1, 2 of D, H, W) that runs left-right in every subject, by its affine (axis 0 after the
    default RAS reorientation); the trainer flips it for augmentation. ValueError when the subjects disagree or
    none of their axes is (nearest to) left-right."""
    codes = [nib.aff2axcodes(s.affine) for s in subjects]
    axes = {next((axis for axis, code in enumerate(c) if code in ("L", "R")), None) for c in codes}
    if len(axes) != 1 or None in axes:
        found = sorted({"".join(str(code) for code in c) for c in codes})
        raise ValueError(f"no array axis runs left-right in every training image (orientations {found}): reorient "
                         f"them to one orientation (Preprocess.orientation, default RAS) or turn flips off "
                         f"(flip: false)")
    return axes.pop()


def lateralised_classes(subjects: Sequence[Subject], axis: int, share: float = 0.95) -> list[int]:
    """Classes (>= 1) with at least ``share`` of their voxels, over the labelled ``subjects``, on one side of each
    label map's foreground centre along array ``axis``: structures that a flip along ``axis`` moves to the other
    side (a left or right hippocampus; not a structure on the midline)."""
    sides: dict[int, np.ndarray] = {}  # class -> voxels [below the centre, above it]
    for subject in subjects:
        if not subject.labelled:
            continue
        slices = np.moveaxis(subject.label, axis, 0).reshape(subject.label.shape[axis], -1)
        counts = np.stack([np.bincount(row, minlength=int(subject.label.max()) + 1) for row in slices])  # [L, K]
        foreground = counts[:, 1:].sum(1)
        if not foreground.any():
            continue
        index = np.arange(len(slices))
        centre = (index * foreground).sum() / foreground.sum()
        for k in range(1, counts.shape[1]):
            below, above = counts[index < centre, k].sum(), counts[index > centre, k].sum()
            sides[k] = sides.get(k, np.zeros(2, np.int64)) + [below, above]
    return sorted(k for k, (below, above) in sides.items()
                  if below + above > 0 and max(below, above) >= share * (below + above))


def num_classes_of(subjects: Sequence[Subject]) -> int:
    """Number of label classes K (background included): 1 + the largest label of any labelled subject."""
    maxima = [int(s.label.max()) for s in subjects if s.labelled]
    if not maxima:
        raise ValueError("num_classes_of: no subject has a label map, so the number of classes is unknown")
    return max(maxima) + 1
