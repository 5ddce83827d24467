"""The data layer: subjects (image, optional label map, affine) from a generator or from NIfTI files.

Sources: ``synthetic_subjects`` (seeded synthetic or MNI-template anatomy, deformed per subject), ``load_folder``
(images/ + labels/), ``load_manifest`` (CSV / JSON), all dispatched by ``load_dataset``.
"""

from __future__ import annotations

from pathlib import Path

from .nifti import load_folder, load_manifest, save_nifti
from .preprocess import Preprocess
from .subject import Subject, lateralised_classes, left_right_axis, num_classes_of, stack_subjects
from .synthetic import synthetic_subjects

__all__ = ["Preprocess", "Subject", "lateralised_classes", "left_right_axis", "load_dataset", "load_folder",
           "load_manifest", "num_classes_of", "save_nifti", "stack_subjects", "synthetic_subjects"]


def load_dataset(source: str, **kwargs) -> list[Subject]:
    """Subjects from ``source``: "synthetic" or "mni" (keyword arguments go to ``synthetic_subjects``), a folder
    (``load_folder``) or a .csv / .json manifest (``load_manifest``)."""
    if source in ("synthetic", "mni"):
        return synthetic_subjects(base=source, **kwargs)
    path = Path(source)
    if path.is_dir():
        return load_folder(path, **kwargs)
    if path.suffix.lower() in (".csv", ".json"):
        return load_manifest(path, **kwargs)
    raise ValueError(f"load_dataset: source {source!r} is neither 'synthetic', 'mni', an existing folder nor a "
                     f".csv / .json manifest")
