"""The data layer: synthetic / MNI generators, NIfTI folder and manifest loading, preprocessing, caching, saving."""

import csv
import gzip
import importlib.util
import json
import logging
import os
import runpy
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepatlas.data import (Preprocess, Subject, left_right_axis, load_dataset, load_folder, load_manifest, num_classes_of,
                            save_nifti, stack_subjects, synthetic_subjects)
from deepatlas.data import nifti as nifti_module

SHAPE = (32, 32, 32)


def mean_dice(a, b, num_classes):
    return np.mean([2 * ((a == k) & (b == k)).sum() / max((a == k).sum() + (b == k).sum(), 1)
                    for k in range(num_classes)])


# ---------------------------------------------------------------- synthetic / mni

@pytest.fixture(scope="module")
def synthetic():
    return synthetic_subjects(3, SHAPE, num_classes=6, seed=1)


def test_synthetic_reproducible_and_seeded(synthetic):
    again = synthetic_subjects(2, SHAPE, num_classes=6, seed=1)
    other = synthetic_subjects(1, SHAPE, num_classes=6, seed=2)
    for a, b in zip(synthetic, again):  # the first subjects do not depend on how many are generated
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.affine, b.affine)
    assert not np.array_equal(synthetic[0].label, other[0].label)
    assert not np.allclose(synthetic[0].image, other[0].image)


def test_synthetic_shapes_types_ranges(synthetic):
    names = set()
    for subject in synthetic:
        names.add(subject.name)
        assert subject.image.shape == SHAPE and subject.image.dtype == np.float32
        assert subject.label.shape == SHAPE and subject.label.dtype == np.int64
        assert subject.image.min() == 0 and subject.image.max() == 1
        assert subject.affine.shape == (4, 4) and subject.affine.dtype == np.float64
        assert sorted(np.unique(subject.label)) == list(range(6))  # all K classes, nothing outside [0, K)
        assert subject.split == "train"
    assert len(names) == 3
    assert num_classes_of(synthetic) == 6


def test_synthetic_any_shape_and_test_split():
    subjects = synthetic_subjects(3, (16, 24, 20), num_classes=4, num_test=1)
    assert subjects[0].image.shape == (16, 24, 20)
    assert [s.split for s in subjects] == ["train", "train", "test"]
    centre = subjects[0].affine @ np.array([7.5, 11.5, 9.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0)  # centred, 1 mm voxels


def test_synthetic_deformation_nontrivial(synthetic):
    dice = mean_dice(synthetic[0].label, synthetic[1].label, 6)
    assert 0.3 < dice < 0.95
    # ... and the image depends on the labels: mean intensity differs between structures
    means = [synthetic[0].image[synthetic[0].label == k].mean() for k in range(6)]
    assert np.ptp(means) > 0.3


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base"):
        synthetic_subjects(1, SHAPE, base="nope")
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_subjects(1, SHAPE, num_classes=1)


def texture_ratio(subject, grained) -> float:
    """Fine-scale std (image minus its Gaussian-smoothed self, away from boundaries) inside the grained
    structures over that inside the others."""
    from scipy import ndimage
    residual = subject.image - ndimage.gaussian_filter(subject.image, 1.0)
    spread = {True: [], False: []}
    for k in range(2, len(grained)):
        inside = ndimage.binary_erosion(subject.label == k, iterations=2)
        if inside.sum() > 20:
            spread[bool(grained[k])].append(residual[inside].std())
    return np.mean(spread[True]) / np.mean(spread[False])


def test_synthetic_grain_textures_one_structure_of_each_pair():
    """grain adds texture inside the second structure of each look-alike pair only; the labels, and the images
    at grain 0, are the same as without it."""
    from deepatlas.data.synthetic import synthetic_base
    shape, num_classes = (32, 32, 32), 10
    _, _, grained = synthetic_base(shape, num_classes, np.random.default_rng([4, 0]))
    assert grained.sum() == 4 and not grained[:2].any()
    plain = synthetic_subjects(2, shape, num_classes=num_classes, seed=4)
    zero = synthetic_subjects(2, shape, num_classes=num_classes, seed=4, grain=0.0)
    grainy = synthetic_subjects(2, shape, num_classes=num_classes, seed=4, grain=0.1)
    for a, b, c in zip(plain, zero, grainy):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, c.label)
        assert 0.8 < texture_ratio(a, grained) < 1.25
        assert texture_ratio(c, grained) > 2
        assert c.image.min() == 0 and c.image.max() == 1
    with pytest.raises(ValueError, match="grain must be >= 0"):
        synthetic_subjects(1, SHAPE, grain=-0.1)
    with pytest.raises(ValueError, match="grain applies to base 'synthetic' only"):
        synthetic_subjects(1, SHAPE, base="mni", grain=0.1)


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn not installed")
def test_mni_base():
    subjects = load_dataset("mni", num_subjects=2, shape=SHAPE, seed=0)
    for subject in subjects:
        assert subject.image.shape == SHAPE and subject.image.dtype == np.float32
        assert 0 <= subject.image.min() and subject.image.max() <= 1
        assert sorted(np.unique(subject.label)) == [0, 1, 2, 3]
    assert nib.aff2axcodes(subjects[0].affine) == ("R", "A", "S")
    assert 0.3 < mean_dice(subjects[0].label, subjects[1].label, 4) < 0.95
    # the world centre of the volume lies near the MNI origin
    centre = subjects[0].affine @ np.array([*(np.array(SHAPE) - 1) / 2, 1])
    assert np.all(np.abs(centre[:3]) < 30)
    # WM is brighter than GM, GM brighter than CSF in a T1 image
    means = [subjects[0].image[subjects[0].label == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn not installed")
def test_mni_lobes_probe_relabels_the_brain_from_the_atlas_by_mni_position(tmp_path, monkeypatch):
    """scripts/mni_lobes_probe.py on a stand-in atlas (2 mm, MNI mm): superior frontal parcels in front of y = 0,
    right superior parietal behind it, left thalamus in a box; brain voxels take their lobe, the box's voxels its
    class, CSF and background stay the template's."""
    probe = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "mni_lobes_probe.py"), run_name="probe")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -100
    mm = np.stack(np.meshgrid(*[np.arange(101) * 2.0 - 100] * 3, indexing="ij"))  # [3, 101, 101, 101]
    box_centre = np.array([-10.0, -15, 5])[:, None, None, None]
    atlas = np.where(mm[1] > 0, 1028, 2029).astype(np.int16)
    box = np.all(np.abs(mm - box_centre) <= 8, axis=0)
    atlas[box] = 10
    path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(atlas, affine), str(path))
    monkeypatch.setitem(probe["lobar_base"].__globals__, "atlas_file", lambda: path)
    labels, t1, voxel_to_mm = probe["lobar_base"]((32, 32, 32))
    tissue, t1_template, _ = probe["original_base"]((32, 32, 32))
    np.testing.assert_array_equal(t1, t1_template)
    np.testing.assert_array_equal(labels[tissue < 2], tissue[tissue < 2])
    brain = tissue >= 2
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij")).reshape(3, -1)
    position = (voxel_to_mm[:3, :3] @ grid + voxel_to_mm[:3, 3:]).reshape(3, 32, 32, 32)
    y = position[1]
    in_box = np.all(np.abs(position - box_centre) <= 5, axis=0)
    near_box = np.all(np.abs(position - box_centre) <= 11, axis=0)
    assert set(np.unique(labels[brain])) == {2, 3, 6}
    assert (brain & in_box).sum() > 0 and np.all(labels[brain & in_box] == 6)
    assert np.all(labels[~near_box] != 6)
    assert np.all(labels[brain & (y > 4)] == 2) and np.all(labels[brain & (y < -4) & ~near_box] == 3)
    assert probe["atlas_groups"](np.array([1028, 2028, 1010, 10, 2, 47, 16, 1035, 2021])).tolist() == \
        [2, 2, 3, 6, 0, 7, 8, 4, 5]


# ---------------------------------------------------------------- stacking

def test_stack_subjects(synthetic):
    unlabelled = Subject("u", synthetic[1].image, None, synthetic[1].affine)
    images, labels, labelled = stack_subjects([synthetic[0], unlabelled])
    assert images.shape == (2, 1, *SHAPE) and images.dtype == torch.float32
    assert labels.shape == (2, 1, *SHAPE) and labels.dtype == torch.int64
    assert labelled.tolist() == [True, False]
    assert labels[1].abs().sum() == 0
    np.testing.assert_array_equal(labels[0, 0].numpy(), synthetic[0].label)
    small = Subject("small", np.zeros((8, 8, 8), np.float32), None, np.eye(4))
    with pytest.raises(ValueError, match="small"):
        stack_subjects([synthetic[0], small])
    with pytest.raises(ValueError, match="no subjects"):
        stack_subjects([])
    with pytest.raises(ValueError, match="no subject has a label"):
        num_classes_of([unlabelled])


# ---------------------------------------------------------------- NIfTI files

def affine_with(spacing=(1.0, 1.0, 1.0), origin=(-6.0, -7.0, -5.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def write_pair(root, name, rng, shape=(12, 12, 12), labelled=True, affine=None):
    """A random image (and a label map with values 0..3) under root/images, root/labels."""
    affine = affine_with() if affine is None else affine
    image = rng.normal(100, 20, shape).astype(np.float32)
    save_nifti(root / "images" / f"{name}.nii.gz", image, affine)
    if labelled:
        label = rng.integers(0, 4, shape).astype(np.int16)
        save_nifti(root / "labels" / f"{name}.nii.gz", label, affine)
        return image, label
    return image, None


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    data = {name: write_pair(tmp_path, name, rng, labelled=name != "c") for name in ("a", "b", "c")}
    return tmp_path, data


NO_PREPROCESS = Preprocess(orientation=None, percentiles=None, divisible_by=None)


def test_load_folder_partial_labels(folder):
    root, data = folder
    subjects = load_dataset(str(root), preprocess=NO_PREPROCESS)
    assert [s.name for s in subjects] == ["a", "b", "c"]
    assert [s.labelled for s in subjects] == [True, True, False]
    for subject in subjects:
        image, label = data[subject.name]
        expected = (image - image.min()) / (image.max() - image.min())
        np.testing.assert_allclose(subject.image, expected, atol=1e-5)
        np.testing.assert_array_equal(subject.affine, affine_with())
        assert isinstance(subject.header, nib.Nifti1Header)
        if label is not None:
            assert subject.label.dtype == np.int64
            np.testing.assert_array_equal(subject.label, label)
    assert num_classes_of(subjects) == 4


def test_load_folder_default_preprocess_and_workers(folder):
    root, _ = folder
    subjects = load_folder(root, preprocess=Preprocess(), num_workers=2)
    assert all(s.image.shape == (16, 16, 16) for s in subjects)  # padded to a multiple of 16
    assert all(0 <= s.image.min() and s.image.max() == 1 for s in subjects)


def test_manifests_csv_and_json(folder):
    root, data = folder
    rows = [{"image": "images/a.nii.gz", "label": "labels/a.nii.gz", "split": "train"},
            {"image": "images/b.nii.gz", "label": "", "split": "test"},
            {"image": str(root / "images" / "c.nii.gz"), "label": "", "split": ""}]
    with open(root / "list.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "list.json").write_text(json.dumps([{k: v for k, v in r.items() if v} for r in rows]))
    for manifest in ("list.csv", "list.json"):
        subjects = load_dataset(str(root / manifest), preprocess=NO_PREPROCESS)
        assert [s.split for s in subjects] == ["train", "test", "train"]
        assert [s.labelled for s in subjects] == [True, False, False]
        np.testing.assert_array_equal(subjects[0].label, data["a"][1])
    (root / "bad.csv").write_text("image,label,split\nimages/a.nii.gz,,holdout\n")
    with pytest.raises(ValueError, match="split"):
        load_manifest(root / "bad.csv")
    # The same image twice (here in the training and the test split, spelled two ways): test data would leak.
    (root / "twice.csv").write_text(f"image,label,split\nimages/a.nii.gz,,train\nimages/b.nii.gz,,train\n"
                                    f"{root / 'images' / 'a.nii.gz'},,test\n")
    with pytest.raises(ValueError, match=r"twice.csv: entries 1 and 3 list the same image .*a.nii.gz"):
        load_manifest(root / "twice.csv")


def test_missing_file_named(folder):
    root, _ = folder
    (root / "missing.csv").write_text("image,label\nimages/a.nii.gz,labels/nothere.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        load_manifest(root / "missing.csv")
    with pytest.raises(FileNotFoundError, match="images"):
        load_folder(root / "nowhere")


def test_shape_and_affine_mismatch_name_both_files(tmp_path):
    rng = np.random.default_rng(1)
    write_pair(tmp_path, "x", rng)
    save_nifti(tmp_path / "labels" / "x.nii.gz", rng.integers(0, 3, (12, 12, 10)), affine_with())
    with pytest.raises(ValueError, match=r"(?s)images/x\.nii\.gz.*labels/x\.nii\.gz"):
        load_folder(tmp_path)
    save_nifti(tmp_path / "labels" / "x.nii.gz", rng.integers(0, 3, (12, 12, 12)), affine_with(spacing=(1, 1, 2)))
    with pytest.raises(ValueError, match=r"(?s)affine mismatch.*images/x\.nii\.gz.*labels/x\.nii\.gz"):
        load_folder(tmp_path)


def test_truncated_file(folder):
    root, _ = folder
    path = root / "images" / "b.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="b.nii.gz"):
        load_folder(root)
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(ValueError, match="cannot read NIfTI file .*b.nii.gz"):
        load_folder(root)


@pytest.mark.parametrize("values, message", [(np.array([0.0, 1.5]), "non-integer"),
                                             (np.array([0, -2]), "negative")])
def test_bad_label_values(tmp_path, values, message):
    rng = np.random.default_rng(2)
    write_pair(tmp_path, "y", rng, labelled=False)
    label = rng.integers(0, 3, (12, 12, 12)).astype(values.dtype)
    label[3, 4, 5] = values[1]
    save_nifti(tmp_path / "labels" / "y.nii.gz", label, affine_with())
    with pytest.raises(ValueError, match=f"labels/y.nii.gz.*{message}"):
        load_folder(tmp_path)


def test_whole_float_labels_and_4d_image(tmp_path):
    rng = np.random.default_rng(3)
    image, _ = write_pair(tmp_path, "z", rng, labelled=False)
    save_nifti(tmp_path / "images" / "z.nii.gz", image[..., None], affine_with())  # trailing singleton
    save_nifti(tmp_path / "labels" / "z.nii.gz", rng.integers(0, 3, (12, 12, 12)).astype(np.float32), affine_with())
    subject, = load_folder(tmp_path, preprocess=NO_PREPROCESS)
    assert subject.image.shape == (12, 12, 12) and subject.label.dtype == np.int64
    save_nifti(tmp_path / "images" / "z.nii.gz", np.stack([image, image], -1), affine_with())
    with pytest.raises(ValueError, match="z.nii.gz.*3-D"):
        load_folder(tmp_path)


def test_label_map(folder):
    root, data = folder
    table = {0: 0, 1: 2, 2: 1, 3: 1}
    subjects = load_folder(root, preprocess=Preprocess(orientation=None, divisible_by=None, label_map=table))
    np.testing.assert_array_equal(subjects[0].label, np.vectorize(table.get)(data["a"][1]))
    with pytest.raises(ValueError, match=r"labels/a.nii.gz.*\[3\]"):
        load_folder(root, preprocess=Preprocess(label_map={0: 0, 1: 1, 2: 1}))
    restored = Preprocess.from_dict(json.loads(json.dumps(Preprocess(label_map=table).to_dict())))
    assert restored.label_map == table


def test_cache_key_changes_with_the_cache_format(tmp_path, monkeypatch):
    """Old cache files are never read once reading or preprocessing changes (CACHE_FORMAT bumped)."""
    image = tmp_path / "a.nii.gz"
    save_nifti(image, np.ones((2, 2, 2), np.float32), np.eye(4))
    entry = nifti_module.Entry(image, None, "train", "a")
    before = nifti_module.cache_path(entry, Preprocess(), tmp_path)
    assert nifti_module.cache_path(entry, Preprocess(), tmp_path) == before
    monkeypatch.setattr(nifti_module, "CACHE_FORMAT", nifti_module.CACHE_FORMAT + 1)
    assert nifti_module.cache_path(entry, Preprocess(), tmp_path) != before


def test_label_map_without_zero_pads_with_class_0():
    """Labels are mapped before padding: a file with no 0 (every voxel labelled 1 or 2, mapped to 0 / 1) pads with
    class 0 instead of failing with "value 0 not in label_map"."""
    label = np.random.default_rng(3).integers(1, 3, (5, 6, 7))
    settings = Preprocess(orientation=None, percentiles=None, divisible_by=8, label_map={1: 0, 2: 1})
    _, out_label, _ = settings.apply(np.random.default_rng(4).random(label.shape), label, np.eye(4))
    assert out_label.shape == (8, 8, 8)
    np.testing.assert_array_equal(out_label[1:6, 1:7, 0:7], label - 1)
    assert out_label.sum() == (label - 1).sum()  # padding is class 0


def test_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        load_folder(tmp_path)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty dataset"):
        load_manifest(tmp_path / "empty.json")
    with pytest.raises(ValueError, match="source"):
        load_dataset(str(tmp_path / "nothing.txt"))


# ---------------------------------------------------------------- preprocessing

def world(affine, index):
    return (affine @ np.array([*index, 1.0]))[:3]


def test_reorientation_lps_to_ras(tmp_path):
    rng = np.random.default_rng(4)
    ras = rng.random((6, 7, 8)).astype(np.float32)
    label = rng.integers(0, 5, (6, 7, 8))
    lps = ras[::-1, ::-1, :]  # the same voxels stored with axes running right->left, anterior->posterior
    lps_affine = np.diag([-2.0, -1.5, 1.0, 1.0])
    lps_affine[:3, 3] = [5 * 2.0, 6 * 1.5, 0.0]  # so that voxel (5, 6, 0) of lps is world (0, 0, 0)
    save_nifti(tmp_path / "images" / "p.nii.gz", lps, lps_affine)
    save_nifti(tmp_path / "labels" / "p.nii.gz", label[::-1, ::-1, :], lps_affine)
    subject, = load_folder(tmp_path, preprocess=Preprocess(percentiles=None, divisible_by=None))
    expected = (ras - ras.min()) / (ras.max() - ras.min())
    np.testing.assert_allclose(subject.image, expected, atol=1e-6)
    np.testing.assert_array_equal(subject.label, label)
    assert nib.aff2axcodes(subject.affine) == ("R", "A", "S")
    np.testing.assert_allclose(world(subject.affine, (0, 0, 0)), [0, 0, 0])
    assert left_right_axis([subject]) == 0


@pytest.mark.parametrize("orientation, axis", [("RAS", 0), ("SAR", 2), ("PIL", 2), ("ALS", 1)])
def test_left_right_axis_follows_the_orientation(tmp_path, orientation, axis):
    """The flip augmentation's axis is the one that runs left-right after preprocessing, whatever the orientation
    the data is reoriented to (or kept in, with orientation None)."""
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        save_nifti(tmp_path / "images" / f"{name}.nii.gz", rng.random((6, 7, 8)).astype(np.float32), np.eye(4))
    kept = Preprocess(orientation=None, percentiles=None, divisible_by=None)
    assert left_right_axis(load_folder(tmp_path, preprocess=kept)) == 0
    subjects = load_folder(tmp_path, preprocess=Preprocess(orientation=orientation, percentiles=None,
                                                           divisible_by=None))
    assert "".join(nib.aff2axcodes(subjects[0].affine)) == orientation
    assert left_right_axis(subjects) == axis


def test_left_right_axis_refuses_mixed_orientations():
    image = np.zeros((4, 4, 4), np.float32)
    swapped = np.eye(4)[[1, 0, 2, 3]]  # axis 0 runs anterior-posterior, axis 1 left-right
    subjects = [Subject("a", image, None, np.eye(4)), Subject("b", image, None, swapped)]
    with pytest.raises(ValueError, match="left-right in every training image.*flip: false"):
        left_right_axis(subjects)


def test_resampling_to_spacing_and_shape():
    rng = np.random.default_rng(5)
    image = rng.random((12, 12, 12)).astype(np.float32)
    label = rng.integers(0, 3, (12, 12, 12))
    affine = affine_with(spacing=(1.0, 2.0, 1.5))
    step = Preprocess(orientation=None, spacing=(2.0, 1.0, 1.5), divisible_by=None)
    out, out_label, out_affine = step.apply(image, label, affine)
    assert out.shape == out_label.shape == (6, 24, 12)
    np.testing.assert_allclose(np.abs(np.diag(out_affine)[:3]), [2.0, 1.0, 1.5])
    # the field of view keeps its centre in world coordinates
    np.testing.assert_allclose(world(out_affine, (2.5, 11.5, 5.5)), world(affine, (5.5, 5.5, 5.5)))
    assert set(np.unique(out_label)) <= {0, 1, 2}  # nearest neighbour: no new label values
    out, _, _ = Preprocess(orientation=None, shape=(8, 9, 10), divisible_by=None).apply(image, None, affine)
    assert out.shape == (8, 9, 10)
    with pytest.raises(ValueError, match="spacing or shape"):
        Preprocess(spacing=(1, 1, 1), shape=(8, 8, 8))


def test_divisible_by_keeps_world_coordinates():
    from deepatlas.data.preprocess import crop_or_pad
    rng = np.random.default_rng(6)
    image = rng.random((12, 17, 16)).astype(np.float32)
    affine = affine_with(spacing=(1.0, 0.5, 2.0))
    out, _, out_affine = Preprocess(orientation=None, percentiles=None, divisible_by=8).apply(image, None, affine)
    assert out.shape == (16, 24, 16)
    # voxel (i, j, k) of the input sits at out[i + 2, j + 3, k] and at the same world point
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(out[2:14, 3:20, :], expected, atol=1e-6)
    np.testing.assert_allclose(world(out_affine, (2, 3, 0)), world(affine, (0, 0, 0)))
    cropped, cropped_affine = crop_or_pad(image, affine, (8, 17, 10))
    np.testing.assert_array_equal(cropped, image[2:10, :, 3:13])
    np.testing.assert_allclose(world(cropped_affine, (0, 0, 0)), world(affine, (2, 0, 3)))


def test_crop_shape_then_divisible_by_keeps_world_coordinates():
    """A head in a large field of view: crop_shape crops (and pads) around the centre, then divisible_by pads; every
    kept voxel keeps its world position, and the label map is cropped the same way."""
    rng = np.random.default_rng(4)
    image = rng.normal(size=(30, 12, 20)).astype(np.float32)
    label = rng.integers(0, 3, image.shape)
    affine = affine_with(spacing=(1.0, 2.0, 1.5))
    settings = Preprocess(orientation=None, percentiles=None, crop_shape=(20, 14, 20), divisible_by=8)
    out, out_label, out_affine = settings.apply(image, label, affine)
    assert out.shape == (24, 16, 24)  # 20 -> 24, 14 -> 16, 20 -> 24
    # crop_shape: axis 0 cropped by 5 (30 -> 20), axis 1 padded by 1 before (12 -> 14); divisible_by: 2 / 1 / 2 before
    np.testing.assert_allclose(out[2:22, 2:14, 2:22], (image[5:25] - image.min()) / np.ptp(image), rtol=1e-6)
    np.testing.assert_array_equal(out_label[2:22, 2:14, 2:22], label[5:25])
    np.testing.assert_allclose(world(out_affine, (2, 2, 2)), world(affine, (5, 0, 0)))
    assert Preprocess(crop_shape=[64.0, 64, 64]).crop_shape == (64, 64, 64)
    for bad in [(1, 2), (0, 1, 1), (1.5, 2, 3), (True, 2, 3)]:
        with pytest.raises(ValueError, match="Preprocess.crop_shape must be three positive ints"):
            Preprocess(crop_shape=bad)


def test_label_map_must_cover_every_class():
    """A class no file value maps to would never be trained and would be written back as background."""
    assert Preprocess(label_map={"0": 0, "5": 1, "7": 1}).label_map == {0: 0, 5: 1, 7: 1}
    with pytest.raises(ValueError, match=r"must map onto every class 0..2; no value maps to \[1\]"):
        Preprocess(label_map={0: 0, 5: 2, 7: 2})
    with pytest.raises(ValueError, match=r"labels >= 0"):
        Preprocess(label_map={0: 0, 5: -1})


def test_nan_background_becomes_the_smallest_value_with_a_warning(tmp_path, caplog):
    """SPM writes NaN outside the brain: those voxels become background (the smallest finite value) with a
    warning naming the file, instead of turning the whole normalised image into NaN."""
    rng = np.random.default_rng(5)
    image = rng.uniform(10, 20, (8, 8, 8)).astype(np.float32)
    image[:2] = np.nan
    image[7, 7, 7] = np.inf
    save_nifti(tmp_path / "images" / "a.nii.gz", image, np.eye(4))
    with caplog.at_level("WARNING", logger="deepatlas"):
        (subject,) = load_folder(tmp_path, preprocess=Preprocess(orientation=None, divisible_by=None,
                                                                 percentiles=None))
    assert np.isfinite(subject.image).all() and (subject.image[:2] == 0).all() and subject.image[7, 7, 7] == 0
    assert "a.nii.gz: 129 NaN / infinite voxel(s) set to the smallest finite value" in caplog.text
    save_nifti(tmp_path / "images" / "a.nii.gz", np.full((4, 4, 4), np.nan, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="a.nii.gz holds no finite value"):
        load_folder(tmp_path)


# ---------------------------------------------------------------- cache and saving

def test_cache_hit_on_second_load(folder, monkeypatch):
    root, _ = folder
    cache = root / "cache"
    first = load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 3

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")
    monkeypatch.setattr(nifti_module, "load_entry", fail)
    second = load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.affine, b.affine)
        assert (a.label is None) == (b.label is None)
        assert b.header is not None
    with pytest.raises(AssertionError, match="cache"):  # other settings -> another key
        load_folder(root, preprocess=Preprocess(divisible_by=8), cache_dir=cache)


def test_cache_keeps_the_latest_version_of_each_entry(folder):
    """New settings replace an entry's cache file instead of piling up beside it; files of other entries (even
    one whose name starts with this one's) stay."""
    root, _ = folder
    cache = root / "cache"
    load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    before = {path.name for path in cache.glob("*.npz")}
    other_entry = cache / f"a-left-{'0' * 20}.npz"
    other_entry.write_bytes(b"")
    again = load_folder(root, preprocess=Preprocess(divisible_by=8), cache_dir=cache)
    after = {path.name for path in cache.glob("*.npz")} - {other_entry.name}
    assert len(before) == len(after) == 3 and not before & after
    assert other_entry.exists()
    for subject in again:
        assert all(size % 8 == 0 for size in subject.image.shape)


def test_cache_removes_abandoned_temporaries_only(folder, caplog):
    """A cache write killed mid-write leaves a hidden temporary; the next load removes it once it is older than
    ABANDONED_AFTER, and leaves a fresh one (a live writer's) and other hidden files alone."""
    root, _ = folder
    cache = root / "cache"
    load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    entry = next(cache.glob("*.npz")).name
    abandoned, fresh, other = cache / f".{entry}.k1ll3d.npz", cache / f".{entry}.wr1t1ng.npz", cache / ".notes.npz"
    for path in (abandoned, fresh, other):
        path.write_bytes(b"partial")
    old = time.time() - nifti_module.ABANDONED_AFTER - 60
    for path in (abandoned, other):
        os.utime(path, (old, old))
    with caplog.at_level(logging.INFO, logger="deepatlas"):
        load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    assert not abandoned.exists() and fresh.exists() and other.exists()
    assert "removed 1 temporary file(s) of interrupted cache writes" in caplog.text


def test_cache_write_whose_temporary_vanished_returns_the_subject(folder, monkeypatch):
    """If another process takes a slow write's temporary for abandoned and removes it, the load still succeeds;
    the entry is just not cached."""
    root, _ = folder
    cache = root / "cache"
    real_replace = os.replace

    def replace_after_removal(source, target):
        os.unlink(source)
        return real_replace(source, target)

    monkeypatch.setattr(nifti_module.os, "replace", replace_after_removal)
    subjects = load_folder(root, preprocess=Preprocess(), cache_dir=cache)
    monkeypatch.undo()
    assert len(subjects) == 3 and list(cache.iterdir()) == []
    np.testing.assert_array_equal(load_folder(root, preprocess=Preprocess())[0].image, subjects[0].image)


def test_save_nifti_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    affine = np.array([[0.0, -1.25, 0.0, 90.5], [0.75, 0.0, 0.0, -126.0], [0.0, 0.0, 2.0, -72.25], [0, 0, 0, 1]])
    image = rng.random((5, 6, 7)).astype(np.float32)
    path = tmp_path / "sub" / "out.nii.gz"
    save_nifti(path, image, affine)
    loaded = nib.load(str(path))
    np.testing.assert_array_equal(loaded.affine, affine)
    np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), image)
    label = rng.integers(0, 40, (5, 6, 7))
    save_nifti(path, label, affine, like=loaded.header)  # overwrite, a float file's geometry
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(path)).dataobj), label)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii.gz"]  # no temporary file left
    with pytest.raises(ValueError, match="nii"):
        save_nifti(tmp_path / "out.png", image, affine)
