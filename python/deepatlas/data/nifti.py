"""NIfTI input / output: a folder (images/, labels/) or a CSV / JSON manifest -> preprocessed, cached Subjects.

Files are read by a torch DataLoader (``num_workers`` processes); with ``cache_dir`` each preprocessed subject is
stored as an .npz keyed by the files' paths, modification times and sizes and the preprocessing settings, so a
second load skips reading and preprocessing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import temporary_file, temporary_name_pattern
from .preprocess import Preprocess, normalise_intensity
from .subject import SPLITS, Subject

log = logging.getLogger("deepatlas")

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def strip_nifti_suffix(name: str) -> str | None:
    """File name without .nii / .nii.gz, or None when it is not a NIfTI name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, like: object | None = None,
               intent: str | None = None) -> None:
    """Write ``array`` [D, H, W, ...] with ``affine`` (mm) as NIfTI-1 (.nii or .nii.gz, from the name), atomically:
    a temporary file in the same folder, then os.replace. Floats are stored as float32, integers as int16 (int32
    when the values do not fit), booleans as uint8; the affine goes to both sform and qform (code 'scanner'), units
    mm. ``like``: the header of an input file on the same grid, whose qform and sform (with their codes) and units
    are written instead, so that every tool reads the output's geometry exactly as it reads that file's (``affine``
    must then be :func:`world_affine` of it). ``intent`` names a NIfTI intent (e.g. 'vector')."""
    path = Path(path)
    if strip_nifti_suffix(path.name) is None:
        raise ValueError(f"save_nifti: path {path} must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        fits = array.size == 0 or (array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max)
        array = array.astype(np.int16 if fits else np.int32)
    else:
        array = array.astype(np.float32)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if like is None:
        image.set_sform(affine, code="scanner")
        image.set_qform(affine, code="scanner")
        image.header.set_xyzt_units("mm")
    else:
        image.header.set_zooms(tuple(like.get_zooms()[:3]) + tuple(image.header.get_zooms()[3:]))
        image.set_sform(*like.get_sform(coded=True))
        image.set_qform(*like.get_qform(coded=True))
        image.header.set_xyzt_units(like.get_xyzt_units()[0])
    if intent is not None:
        image.header.set_intent(intent)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    handle, temporary = temporary_file(path, suffix)
    os.close(handle)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """(array [D, H, W], affine float64, header) of one NIfTI file; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel's ImageFileError, gzip's EOFError / BadGzipFile, zlib.error, OSError
        raise ValueError(f"cannot read NIfTI file {path}: {type(error).__name__}: {error}") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume (or 4-D with a trailing dimension of 1), "
                         f"got shape {array.shape}")
    problem = orientation_problem(image.header)
    if problem is not None:
        log.warning("%s: %s", path, problem)
    return array, world_affine(image.header), image.header


MM_PER_UNIT = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 0.001}


def world_affine(header) -> np.ndarray:
    """Voxel -> world (mm) of a NIfTI header: nibabel's choice (the sform when its code is set, else the qform, else
    a guess from the voxel sizes), scaled from the file's spatial units (metres, microns) to mm."""
    units = header.get_xyzt_units()[0]
    affine = np.asarray(header.get_best_affine(), dtype=np.float64).copy()
    affine[:3] *= MM_PER_UNIT.get(units, 1.0)
    return affine


def orientation_problem(header) -> str | None:
    """Why tools may place this file's voxels differently from nibabel (and this package), or None: ITK (and with
    it ANTs, SimpleITK, 3D Slicer) prefers the qform in some cases where nibabel takes the sform, and guesses a
    missing orientation differently."""
    qform, qform_code = header.get_qform(coded=True)
    sform, sform_code = header.get_sform(coded=True)
    if qform_code == 0 and sform_code == 0:
        return ("no qform or sform is set (both codes 0): its orientation is a guess (nibabel's: x reversed, "
                "centred), which other tools guess differently")
    if qform_code > 0 and sform_code > 0 and not np.allclose(qform, sform, atol=1e-3):
        gap = float(np.abs(np.asarray(qform) - np.asarray(sform)).max())
        return (f"its qform and sform disagree (by up to {gap:.3g}); the sform is used, as nibabel does; other "
                f"tools (ITK) may use the qform")
    return None


def itk_geometry_problem(header) -> str | None:
    """Why ITK may place this file's voxels differently from nibabel, or None: :func:`orientation_problem`, or a
    sheared affine (ITK keeps only a rotation and voxel sizes)."""
    problem = orientation_problem(header)
    if problem is not None:
        return problem
    linear = np.asarray(header.get_best_affine())[:3, :3]
    gram = linear.T @ linear
    if not np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6 * np.abs(gram).max()):
        return "its affine is sheared, which ITK does not represent"
    return None


def check_label_values(label: np.ndarray, path: Path) -> np.ndarray:
    """The label map as int64; non-finite, non-integer or negative values are errors naming ``path``."""
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise ValueError(f"label file {path} holds NaN / infinite values")
        fractional = label[label != np.round(label)]
        if fractional.size:
            raise ValueError(f"label file {path} holds non-integer values (e.g. {fractional.flat[0]!r}); labels "
                             f"must be whole numbers")
    label = label.astype(np.int64)
    if label.size and label.min() < 0:
        raise ValueError(f"label file {path} holds negative values (min {label.min()}); labels must be >= 0")
    return label


def finite_image(image: np.ndarray, path: Path) -> np.ndarray:
    """``image`` with NaN / infinite voxels (SPM writes NaN outside the brain) set to its smallest finite value, as
    background, with a warning naming ``path``; an image with no finite value is an error."""
    finite = np.isfinite(image)
    if finite.all():
        return image
    if not finite.any():
        raise ValueError(f"image file {path} holds no finite value (all NaN / infinite)")
    log.warning("%s: %d NaN / infinite voxel(s) set to the smallest finite value (%g), as background", path,
                int((~finite).sum()), float(image[finite].min()))
    return np.where(finite, image, image[finite].min())


@dataclass
class Entry:
    """One subject to load: its files, split and name."""

    image: Path
    label: Path | None
    split: str
    name: str


def read_entry(entry: Entry) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, object]:
    """(image as stored, label map as int64 or None, affine, header) of one entry, checked: shapes and affines
    agree, label values are whole and >= 0."""
    image, affine, header = read_volume(entry.image)
    label = None
    if entry.label is not None:
        raw_label, label_affine, _ = read_volume(entry.label)
        if raw_label.shape != image.shape:
            raise ValueError(f"shape mismatch: image {entry.image} has shape {image.shape} but label {entry.label} "
                             f"has {raw_label.shape}")
        if not np.allclose(label_affine, affine, atol=1e-4):
            raise ValueError(f"affine mismatch between image {entry.image} and label {entry.label}:\n{affine}\n"
                             f"vs\n{label_affine}")
        label = check_label_values(raw_label, entry.label)
    return image, label, affine, header


def load_entry(entry: Entry, preprocess: Preprocess | None,
               stored: tuple[np.ndarray, np.ndarray | None, np.ndarray, object] | None = None) -> Subject:
    """Read (or take ``stored``, what :func:`read_entry` returned), check and preprocess one entry (no caching)."""
    image, label, affine, header = read_entry(entry) if stored is None else stored
    image = finite_image(image.astype(np.float32), entry.image)
    if preprocess is not None:
        image, label, affine = preprocess.apply(image, label, affine, source=str(entry.label or entry.image))
    else:  # the Subject contract still wants intensities in [0, 1]
        image = normalise_intensity(image, None)
    return Subject(entry.name, image, label, affine, entry.split, header)


def file_stamp(path: Path | None) -> str:
    if path is None:
        return "none"
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"


# Part of every cache key: bump it when reading or preprocessing changes its result for some file and settings
# (2: files in microns / metres scaled to mm; labels mapped through label_map before padding).
CACHE_FORMAT = 2

# Seconds after which a cache write's temporary file counts as abandoned: a write takes seconds, and one whose
# temporary is removed anyway (its writer was suspended that long) only skips caching.
ABANDONED_AFTER = 600.0

# What follows an entry's name in its cache file's name (see cache_path): "-", 20 hex digits of the key, ".npz".
CACHE_NAME_TAIL = r"-[0-9a-f]{20}\.npz"


def cache_path(entry: Entry, preprocess: Preprocess | None, cache_dir: Path) -> Path:
    """The .npz holding this entry's preprocessed arrays (the key changes when a file, the settings or
    CACHE_FORMAT change)."""
    settings = "raw" if preprocess is None else preprocess.digest()
    parts = [f"format {CACHE_FORMAT}", file_stamp(entry.image), file_stamp(entry.label), settings]
    key = hashlib.sha1("|".join(parts).encode())
    return cache_dir / f"{entry.name}-{key.hexdigest()[:20]}.npz"


def load_cached(entry: Entry, preprocess: Preprocess | None, cache_dir: Path | None) -> Subject:
    """``load_entry`` through the cache: read the .npz when present, otherwise load, write it atomically and remove
    the entry's stale cache files."""
    if cache_dir is None:
        return load_entry(entry, preprocess)
    for path in (entry.image, entry.label):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"NIfTI file not found: {path}")
    target = cache_path(entry, preprocess, cache_dir)
    try:
        with np.load(target) as stored:
            label = stored["label"] if bool(stored["labelled"]) else None
            image, affine = stored["image"], stored["affine"]
    except FileNotFoundError:  # not cached yet (or just replaced by a run with other settings)
        pass
    else:
        header = nib.load(str(entry.image)).header  # reads the header only
        return Subject(entry.name, image, label, affine, entry.split, header)
    subject = load_entry(entry, preprocess)
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_file(target, ".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, image=subject.image, affine=subject.affine, labelled=subject.labelled,
                     label=subject.label if subject.labelled else np.zeros(0, np.int64))
        os.replace(temporary, target)
    except FileNotFoundError:  # the temporary was taken for abandoned and removed: the entry stays uncached
        return subject
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    for stale in stale_cache_files(target, entry.name):
        stale.unlink(missing_ok=True)
    return subject


def stale_cache_files(target: Path, name: str) -> list[Path]:
    """The other cache files of the entry ``name`` next to ``target``: written before a file, the settings or
    CACHE_FORMAT changed, so never read again. The cache keeps one version per entry, the latest."""
    pattern = re.compile(re.escape(name) + CACHE_NAME_TAIL)
    return [path for path in target.parent.iterdir() if path != target and pattern.fullmatch(path.name)]


def remove_abandoned_temporaries(cache_dir: Path) -> list[Path]:
    """Delete the temporary files (:func:`temporary_file`) of cache writes untouched for ``ABANDONED_AFTER``
    seconds, left by a writer killed mid-write (a live one renames its temporary within seconds); returns them."""
    if not cache_dir.is_dir():
        return []
    pattern = temporary_name_pattern(".+" + CACHE_NAME_TAIL, ".npz")
    oldest = time.time() - ABANDONED_AFTER
    removed = []
    for path in cache_dir.iterdir():
        try:
            if pattern.fullmatch(path.name) and path.stat().st_mtime < oldest:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            pass
    return removed


class EntryDataset(Dataset):
    """Map-style dataset over entries, so a DataLoader can read files in worker processes."""

    def __init__(self, entries: list[Entry], preprocess: Preprocess | None, cache_dir: Path | None):
        self.entries, self.preprocess, self.cache_dir = entries, preprocess, cache_dir

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Subject:
        return load_cached(self.entries[index], self.preprocess, self.cache_dir)


def first_item(batch: list[Subject]) -> Subject:
    """Collate function for batch_size=1: the subject itself, not a batch."""
    return batch[0]


def load_entries(entries: list[Entry], preprocess: Preprocess | None, cache_dir, num_workers: int, source: str
                 ) -> list[Subject]:
    if not entries:
        raise ValueError(f"{source}: empty dataset (no images found)")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    cache_dir = None if cache_dir is None else Path(cache_dir)
    if cache_dir is not None and (abandoned := remove_abandoned_temporaries(cache_dir)):
        log.info("removed %d temporary file(s) of interrupted cache writes in %s", len(abandoned), cache_dir)
    dataset = EntryDataset(entries, preprocess, cache_dir)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=first_item)
    return list(loader)


def load_folder(root: str | os.PathLike, preprocess: Preprocess | None = None, cache_dir=None,
                num_workers: int = 0) -> list[Subject]:
    """Subjects from ``root/images/*.nii[.gz]``; a label is ``root/labels/<same file name>`` when it exists (any
    subset of the images may be labelled). All subjects get split "train"."""
    root = Path(root)
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"load_folder: {image_dir} does not exist (expected {root}/images/ and optionally "
                                f"{root}/labels/)")
    images = sorted(p for p in image_dir.iterdir() if strip_nifti_suffix(p.name) is not None)
    labels = {p.name: p for p in label_dir.iterdir()} if label_dir.is_dir() else {}
    orphans = sorted(set(n for n in labels if strip_nifti_suffix(n) is not None) - {p.name for p in images})
    if orphans:
        raise ValueError(f"load_folder: label file(s) {[str(label_dir / n) for n in orphans]} have no image of the "
                         f"same name in {image_dir}")
    entries = [Entry(p, labels.get(p.name), "train", strip_nifti_suffix(p.name)) for p in images]
    return load_entries(entries, preprocess, cache_dir, num_workers, f"load_folder({root})")


def manifest_rows(path: Path) -> list[dict]:
    """The rows of a CSV (header image,label,split) or JSON (list of objects) manifest."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as stream:
                rows = list(csv.DictReader(stream))
        elif path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
        else:
            raise ValueError(f"manifest {path} must be a .csv or .json file")
    except OSError as error:
        raise FileNotFoundError(f"cannot read manifest {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {path} is not valid JSON: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"manifest {path} must hold a list of objects with keys image, label, split")
    return rows


def load_manifest(path: str | os.PathLike, preprocess: Preprocess | None = None, cache_dir=None,
                  num_workers: int = 0) -> list[Subject]:
    """Subjects listed in a manifest: CSV with columns image,label,split (label and split optional / may be empty)
    or a JSON list of {"image": ..., "label": ..., "split": ...}. Relative paths are relative to the manifest."""
    path = Path(path)
    entries, rows_of = [], {}
    for number, row in enumerate(manifest_rows(path), start=1):
        if not row.get("image"):
            raise ValueError(f"manifest {path}, entry {number}: missing 'image' (got keys {sorted(row)})")
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise ValueError(f"manifest {path}, entry {number}: split must be one of {list(SPLITS)}, got {split!r}")
        image = path.parent / str(row["image"]).strip()
        label = path.parent / str(row["label"]).strip() if row.get("label") else None
        for file in (image, label):
            if file is not None and not file.is_file():
                raise FileNotFoundError(f"manifest {path}, entry {number}: file not found: {file}")
        first = rows_of.setdefault(image.resolve(), number)
        if first != number:  # e.g. one image in both the train and the test split
            raise ValueError(f"manifest {path}: entries {first} and {number} list the same image {image}")
        entries.append(Entry(image, label, split, strip_nifti_suffix(image.name) or image.stem))
    return load_entries(entries, preprocess, cache_dir, num_workers, f"load_manifest({path})")
