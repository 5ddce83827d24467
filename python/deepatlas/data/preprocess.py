"""Preprocessing of loaded volumes: reorientation, resampling, intensity normalisation, crop/pad, label remapping.

Every geometric step returns the new array together with the updated voxel -> world affine, so a voxel keeps its
world position (up to interpolation) through the whole pipeline.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from ..records import DictRecord


def normalise_intensity(image: np.ndarray, percentiles: tuple[float, float] | None = (0.5, 99.5)) -> np.ndarray:
    """Clip ``image`` to its ``percentiles`` (min / max when None) and rescale to [0, 1]; float32, same shape."""
    image = np.asarray(image, dtype=np.float64)
    if percentiles is None:
        low, high = float(image.min()), float(image.max())
    else:
        low, high = (float(v) for v in np.percentile(image, percentiles))
    if high <= low:  # constant image
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip((image - low) / (high - low), 0, 1).astype(np.float32)  # clip after: rounding may pass 1


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Permute / flip the axes of ``array`` [D, H, W] so that they point along ``axcodes`` (e.g. "RAS")."""
    current = nio.io_orientation(affine)
    transform = nio.ornt_transform(current, nio.axcodes2ornt(tuple(axcodes)))
    new_array = nio.apply_orientation(array, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(new_array), new_affine


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def resample(array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], order: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``array`` [D, H, W] to ``shape`` over the same field of view (centres of the corner voxels'
    footprints kept): order 1 = trilinear (images), 0 = nearest (labels). Returns (array, updated affine)."""
    old = np.array(array.shape, dtype=np.float64)
    new = np.array(shape, dtype=np.float64)
    step = old / new                                  # old voxels per new voxel, per axis
    offset = (old - 1) / 2 - step * (new - 1) / 2     # new index j -> old index step * j + offset (centres agree)
    out = ndimage.affine_transform(array, step, offset=offset, output_shape=tuple(int(s) for s in shape),
                                   order=order, mode="nearest")
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(step)
    voxel_map[:3, 3] = offset
    return out, affine @ voxel_map


def crop_or_pad(array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], value: float = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Centred crop (axes larger than ``shape``) or pad with ``value`` (smaller axes); the affine's translation is
    updated so every kept voxel keeps its world position."""
    out = np.full(shape, value, dtype=array.dtype)
    source, target, start = [], [], np.zeros(3)
    for axis, (old, new) in enumerate(zip(array.shape, shape)):
        first = (old - new) // 2 if old >= new else -((new - old) // 2)  # old index of new index 0 (< 0: padding)
        start[axis] = first
        source.append(slice(max(first, 0), max(first, 0) + min(old, new)))
        target.append(slice(max(-first, 0), max(-first, 0) + min(old, new)))
    out[tuple(target)] = array[tuple(source)]
    shift = np.eye(4)
    shift[:3, 3] = start
    return out, affine @ shift


def remap_labels(label: np.ndarray, table: dict[int, int], source: str = "label") -> np.ndarray:
    """Map every label value through ``table`` {original: new}; a value missing from the table is an error."""
    values = np.unique(label)
    unknown = sorted(int(v) for v in values if int(v) not in table)
    if unknown:
        raise ValueError(f"{source}: label value(s) {unknown} are not in label_map (keys {sorted(table)})")
    lookup = np.zeros(int(values.max()) + 1, dtype=np.int64)
    for original, new in table.items():
        if 0 <= original < lookup.size:
            lookup[original] = new
    return lookup[label]


def _is_whole(value) -> bool:
    """A whole number (64, 64.0, numpy ints), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()


@dataclass
class Preprocess(DictRecord):
    """Which preprocessing steps to apply to a loaded volume (each one optional; None switches it off).

    Order: reorient to ``orientation`` -> resample to ``spacing`` (mm) or to ``shape`` (voxels; give one of the
    two) -> clip to ``percentiles`` and rescale to [0, 1] (min / max when None) -> centred crop / pad to
    ``crop_shape`` (voxels; e.g. the head out of a large field of view) -> centred pad to the next multiple of
    ``divisible_by`` -> remap labels through ``label_map`` {original: new}. Crops and pads keep every voxel's world
    position (the affine's translation follows).
    """

    orientation: str | None = "RAS"
    spacing: tuple | None = None
    shape: tuple | None = None
    percentiles: tuple | None = (0.5, 99.5)
    crop_shape: tuple | None = None
    divisible_by: int | None = 16
    label_map: dict[int, int] | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None:
            try:
                nio.axcodes2ornt(tuple(self.orientation))
            except Exception:
                raise ValueError(f"Preprocess.orientation must be three axis codes such as 'RAS', "
                                 f"got {self.orientation!r}") from None
            if len(self.orientation) != 3:
                raise ValueError(f"Preprocess.orientation must have 3 letters, got {self.orientation!r}")
        if self.spacing is not None and self.shape is not None:
            raise ValueError("Preprocess: give spacing or shape, not both")
        for name in ("spacing", "percentiles"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"Preprocess.spacing must be three positive sizes in mm, got {self.spacing}")
        for name in ("shape", "crop_shape"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                if len(value) != 3 or not all(_is_whole(v) and v >= 1 for v in value):
                    raise ValueError(f"Preprocess.{name} must be three positive ints, got {value}")
                setattr(self, name, tuple(int(v) for v in value))
        if self.percentiles is not None and not (len(self.percentiles) == 2
                                                 and 0 <= self.percentiles[0] < self.percentiles[1] <= 100):
            raise ValueError(f"Preprocess.percentiles must be (low, high) with 0 <= low < high <= 100, "
                             f"got {self.percentiles}")
        if self.divisible_by is not None and int(self.divisible_by) < 1:
            raise ValueError(f"Preprocess.divisible_by must be >= 1, got {self.divisible_by}")
        if self.label_map is not None:  # JSON / YAML keys arrive as strings
            self.label_map = {int(k): int(v) for k, v in self.label_map.items()}
            if min(self.label_map.values(), default=0) < 0:
                raise ValueError(f"Preprocess.label_map must map to labels >= 0, got {self.label_map}")
            missing = sorted(set(range(max(self.label_map.values(), default=-1) + 1)) - set(self.label_map.values()))
            if missing:  # a class no file value maps to: never trained, and written back as background
                raise ValueError(f"Preprocess.label_map must map onto every class 0..{max(self.label_map.values())}; "
                                 f"no value maps to {missing} (got {self.label_map})")

    def digest(self) -> str:
        """A short hash of the settings (part of the cache key)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def apply(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, source: str = "image"
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Run the steps on ``image`` [D, H, W] (and ``label``, same grid); returns (image float32 in [0, 1],
        label int64 or None, affine). ``source`` names the file in error messages. Labels go through label_map
        first, so voxels that padding adds are class 0 whether or not the map lists the value 0."""
        if label is not None:
            label = label.astype(np.int64)
            if self.label_map is not None:
                label = remap_labels(label, self.label_map, source)
        if self.orientation is not None:
            new_image, new_affine = reorient(image, affine, self.orientation)
            label = None if label is None else reorient(label, affine, self.orientation)[0]
            image, affine = new_image, new_affine
        target = self.shape
        if self.spacing is not None:
            ratio = voxel_spacing(affine) / np.array(self.spacing)
            target = tuple(max(1, int(round(n * r))) for n, r in zip(image.shape, ratio))
        if target is not None and tuple(target) != image.shape:
            new_image, new_affine = resample(image.astype(np.float32), affine, target, order=1)
            label = None if label is None else resample(label, affine, target, order=0)[0]
            image, affine = new_image, new_affine
        image = normalise_intensity(image, self.percentiles)
        sizes = [self.crop_shape]
        if self.divisible_by is not None:
            k = int(self.divisible_by)
            sizes.append(tuple(-(-n // k) * k for n in (self.crop_shape or image.shape)))
        for size in sizes:
            if size is not None and size != image.shape:
                new_image, new_affine = crop_or_pad(image, affine, size)
                label = None if label is None else crop_or_pad(label, affine, size)[0]
                image, affine = new_image, new_affine
        return image, label, affine
