"""A real-anatomy base for the generator: the MNI152 2009a symmetric template that ships inside the nilearn wheel.

Classes of the base label map (``MNI_CLASSES``), derived at the requested resolution from the template's grey- and
white-matter probability maps (gm, wm; values in [0, 1]):

    0 background   everything outside the intracranial mask (air, scalp, skull)
    1 CSF          inside the intracranial mask but gm + wm < 0.5 (ventricles, sulcal and peripheral CSF)
    2 GM           gm + wm >= 0.5 and gm > wm
    3 WM           gm + wm >= 0.5 and wm >= gm

The intracranial mask is the brain (gm + wm >= 0.5) closed morphologically (radius about 6 mm) with its holes
filled. Nothing is ever downloaded: the files are read from the installed nilearn package.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MNI_CLASSES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MARGIN_MM = 4.0        # space kept around the brain's bounding box
CLOSING_MM = 6.0       # closing radius of the intracranial mask


def template_path(kind: str) -> Path:
    """Path of the template volume ``kind`` ("t1", "gm" or "wm") inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError:
        raise ImportError("base='mni' reads the MNI152 template shipped with nilearn, which is not installed: "
                          "pip install nilearn") from None
    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE.format(kind)
    if not path.is_file():
        raise FileNotFoundError(f"the installed nilearn has no MNI152 2009a template file {path}; "
                                f"reinstall it with pip install --force-reinstall nilearn")
    return path


def read_template(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 in [0, 1] [197, 233, 189], affine) of one template file."""
    image = nib.load(str(template_path(kind)))
    volume = np.asanyarray(image.dataobj).astype(np.float32)
    return volume / max(float(volume.max()), 1e-6), image.affine


def base_labels(gm: np.ndarray, wm: np.ndarray, spacing: float) -> np.ndarray:
    """The 4-class label map (see the module docstring) from probability maps sampled at ``spacing`` mm."""
    tissue = gm + wm
    brain = tissue >= 0.5
    iterations = max(1, int(round(CLOSING_MM / spacing)))
    ball = ndimage.generate_binary_structure(3, 1)
    closed = ndimage.binary_closing(np.pad(brain, iterations), ball, iterations=iterations)
    intracranial = ndimage.binary_fill_holes(closed)[(slice(iterations, -iterations),) * 3]
    labels = np.zeros(gm.shape, dtype=np.int64)
    labels[intracranial] = 1
    labels[brain & (gm > wm)] = 2
    labels[brain & (wm >= gm)] = 3
    return labels


@lru_cache(maxsize=4)
def mni_base(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template resampled to ``shape`` (isotropic voxels; the brain's bounding box plus a margin fitted inside
    and centred). Returns (labels int64 [D, H, W] in {0..3}, T1 float32 [D, H, W] in [0, 1], affine voxel -> MNI
    mm). RAS orientation, so axis 0 is left-right. Cached per shape."""
    t1, affine = read_template("t1")
    gm, _ = read_template("gm")
    wm, _ = read_template("wm")
    brain = np.nonzero(gm + wm >= 0.5)
    low = np.array([a.min() for a in brain]) - MARGIN_MM
    high = np.array([a.max() for a in brain]) + MARGIN_MM
    target = np.array(shape, dtype=np.float64)
    spacing = float(np.max((high - low) / np.maximum(target - 1, 1)))  # template voxels (1 mm) per output voxel
    offset = (low + high) / 2 - spacing * (target - 1) / 2             # output index j -> spacing * j + offset
    resampled = [ndimage.affine_transform(v, np.full(3, spacing), offset=offset, output_shape=tuple(shape),
                                          order=1, mode="constant", cval=0.0) for v in (t1, gm, wm)]
    voxel_map = np.eye(4)
    voxel_map[:3, :3] *= spacing
    voxel_map[:3, 3] = offset
    labels = base_labels(resampled[1], resampled[2], spacing * float(np.abs(affine[0, 0])))
    return labels, np.clip(resampled[0], 0, 1), affine @ voxel_map
