"""`register` / `segment` outputs on the input files' own grids (deepatlas.native, space='native'): the sampler
against scipy, the slab loop, and known fields and label maps on files stored in another orientation, spacing and
shape than the model grid the networks run on."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from deepatlas import inference, native
from deepatlas.checkpoint import save_checkpoint
from deepatlas.data import save_nifti
from deepatlas.trainer import build_networks
from training_helpers import tiny_config

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPE = (13, 14, 15)          # not a multiple of 16: the model grid is padded to 16^3
SPACING = 1.5
K = 4


def stored(path, array, flip_first_axis=False, origin=(10.0, -20.0, 5.0)):
    """Save ``array`` (world content on a RAS grid of SPACING mm from ``origin``) as NIfTI, optionally stored with
    its first axis reversed (LAS), which holds the same world content. Returns the affine written."""
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin
    if flip_first_axis:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, array.shape[0] - 1
        affine, array = affine @ flip, array[::-1]
    save_nifti(path, np.ascontiguousarray(array), affine)
    return affine


def save_tiny_model(folder, preprocess):
    """``folder``/model.pt with tiny untrained networks (K classes) and the given preprocessing."""
    config = tiny_config(folder, preprocess=preprocess)
    torch.manual_seed(0)
    reg, seg = build_networks(config, K)
    save_checkpoint(folder / "model.pt", {"config": config.to_dict(), "num_classes": K,
                                          "reg_net": reg.state_dict(), "seg_net": seg.state_dict()})


@pytest.fixture
def scene(tmp_path):
    """Random world content (image and labels) and a model.pt with tiny untrained networks."""
    generator = np.random.default_rng(0)
    content = generator.uniform(100, 900, SHAPE).astype(np.float32)   # scanner units, not [0, 1]
    labels = generator.integers(0, K, SHAPE)
    labels[labels == 3] = 17                                           # an original value above K
    save_tiny_model(tmp_path, {"label_map": {0: 0, 1: 1, 2: 2, 17: 3}})
    return tmp_path, content, labels


class ConstantField(nn.Module):
    """A registration network whose displacement is ``shift`` model voxels everywhere."""

    def __init__(self, shift):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def forward(self, moving, fixed):
        return self.shift.expand(moving.shape[0], 3, *moving.shape[2:]).clone()


class SmoothField(nn.Module):
    """A registration network whose displacement is a fixed smooth random field (up to ~3 model voxels)."""

    def __init__(self, shape):
        super().__init__()
        coarse = 1.5 * torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
        field = nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
        self.register_buffer("field", field)

    def forward(self, moving, fixed):
        return self.field.expand(moving.shape[0], -1, -1, -1, -1).clone()


class FixedLogits(nn.Module):
    """A segmentation network that returns ``logits(image)`` on the model grid."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, image):
        return self.logits(image)


def replace_networks(monkeypatch, reg_net=None, seg_net=None):
    load = inference.load_model

    def patched(path, device="cpu"):
        model = load(path, device)
        model.reg_net = (reg_net or model.reg_net).to(model.device)
        model.seg_net = (seg_net or model.seg_net).to(model.device)
        return model
    monkeypatch.setattr(inference, "load_model", patched)
    monkeypatch.setattr(native, "SLAB_VALUES", 700)  # a few rows per slab: the loop runs many times


def read(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("padding, scipy_mode", [("zeros", "grid-constant"), ("border", "nearest")])
def test_sample_is_trilinear_interpolation_at_voxel_indices(padding, scipy_mode):
    generator = np.random.default_rng(1)
    volume = generator.normal(size=(2, 5, 6, 7))
    points = generator.uniform(-2, 8, size=(40, 3))
    got = native.sample(torch.from_numpy(volume), torch.from_numpy(points), "bilinear", padding)
    for channel in range(2):
        expected = ndimage.map_coordinates(volume[channel], points.T, order=1, mode=scipy_mode)
        np.testing.assert_allclose(got[channel].numpy(), expected, rtol=1e-10, atol=1e-10)


def test_slabs_cover_every_row_once_within_the_budget(monkeypatch):
    monkeypatch.setattr(native, "SLAB_VALUES", 1000)
    rows = list(native.slabs((13, 10, 10), channels=3))
    assert [r.start for r in rows] == list(range(0, 13, 3)) and rows[-1].stop == 13
    assert all(r.stop - r.start <= 3 for r in rows)
    assert [r.stop - r.start for r in native.slabs((2, 50, 50), channels=8)] == [1, 1]  # at least one row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moving_flipped", [False, True])
def test_register_native_moves_the_moving_file_by_the_field_in_mm(scene, monkeypatch, moving_flipped, device):
    """A field of +1 model voxel along the first (R) axis: on the fixed file's grid the warped image is the moving
    file's content one voxel further along R (zero past its edge), in its own intensities and label values, however
    the moving file is stored; the world DDF is (+1.5, 0, 0) mm and the Jacobian determinant 1."""
    folder, content, labels = scene
    replace_networks(monkeypatch, reg_net=ConstantField([1.0, 0.0, 0.0]))
    stored(folder / "moving.nii.gz", content, flip_first_axis=moving_flipped)
    stored(folder / "moving_label.nii.gz", labels, flip_first_axis=moving_flipped)
    fixed_affine = stored(folder / "fixed.nii.gz", np.random.default_rng(2).uniform(0, 1, SHAPE))
    written = inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                       folder / "out", moving_label=folder / "moving_label.nii.gz", device=device)
    for path in written.values():
        np.testing.assert_allclose(read(path)[1], fixed_affine)
    warped, warped_label = read(written["warped"])[0], read(written["warped_label"])[0]
    np.testing.assert_allclose(warped[:-1], content[1:], rtol=1e-5)
    np.testing.assert_allclose(warped[-1], 0, atol=1e-3)  # float32 grid: up to ~1e-6 of a voxel's value
    np.testing.assert_array_equal(warped_label[:-1], labels[1:])
    np.testing.assert_array_equal(warped_label[-1], 0)
    ddf = read(written["ddf"])[0]
    assert ddf.shape == (*SHAPE, 3)
    np.testing.assert_allclose(ddf, np.broadcast_to([SPACING, 0, 0], ddf.shape), atol=1e-5)
    np.testing.assert_allclose(read(written["jacobian"])[0], 1, atol=1e-6)


def test_itk_ddf_is_the_world_field_in_lps_as_a_vector_image(scene, monkeypatch):
    folder, content, _ = scene
    replace_networks(monkeypatch, reg_net=ConstantField([1.0, 0.0, -2.0]))
    stored(folder / "moving.nii.gz", content, flip_first_axis=True)
    affine = stored(folder / "fixed.nii.gz", content)
    written = inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                       folder / "out", ddf_format="itk")
    image = nib.load(written["ddf"])
    assert image.shape == (*SHAPE, 1, 3) and image.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(image.affine, affine)
    ddf = np.asarray(image.dataobj)
    np.testing.assert_allclose(ddf, np.broadcast_to([-SPACING, 0, -2 * SPACING], ddf.shape), atol=1e-5)  # RAS->LPS
    with pytest.raises(ValueError, match="ddf_format 'itk' .* needs space 'native'"):
        inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out", ddf_format="itk", space="model")
    with pytest.raises(ValueError, match=r"ddf_format must be one of \['ras', 'itk'\], got 'lps'"):
        inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out", ddf_format="lps")


def test_simpleitk_resampling_with_the_itk_ddf_reproduces_the_warped_image(scene, monkeypatch):
    """An independent check of the whole native path: SimpleITK (ITK's NIfTI reader, its
    DisplacementFieldTransform and linear resampler) applies the written ITK DDF to the moving file as stored
    (another orientation and origin than the fixed file) and gets our warped image, at every fixed voxel whose
    moving point lies inside the moving image (ITK and zero padding differ in the last half voxel)."""
    import SimpleITK as sitk
    folder, content, _ = scene
    replace_networks(monkeypatch, reg_net=SmoothField((16, 16, 16)))
    moving_affine = stored(folder / "moving.nii.gz", content, flip_first_axis=True, origin=(13.0, -21.5, 7.0))
    fixed_affine = stored(folder / "fixed.nii.gz", np.random.default_rng(4).uniform(0, 1, SHAPE))
    written = inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                       folder / "out", ddf_format="itk")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(written["ddf"]), sitk.sitkVectorFloat64))
    resampled = sitk.Resample(sitk.ReadImage(str(folder / "moving.nii.gz"), sitk.sitkFloat64),
                              sitk.ReadImage(str(folder / "fixed.nii.gz")), transform, sitk.sitkLinear, 0.0)
    expected = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # SimpleITK arrays are [z, y, x]
    ddf_ras = read(written["ddf"])[0][:, :, :, 0] * inference.RAS_TO_LPS
    voxels = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), -1).astype(np.float64)
    moving_world = voxels @ fixed_affine[:3, :3].T + fixed_affine[:3, 3] + ddf_ras
    moving_voxels = (moving_world - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T
    inside = np.all((moving_voxels > 0.01) & (moving_voxels < np.array(SHAPE) - 1.01), axis=-1)
    assert inside.mean() > 0.4 and np.abs(ddf_ras).max() > 2 * SPACING  # a real, non-trivial field
    warped = read(written["warped"])[0]
    np.testing.assert_allclose(warped[inside], expected[inside], rtol=1e-4, atol=1e-2)


def test_nan_voxels_of_the_moving_file_are_background_in_the_native_warp(scene, monkeypatch, caplog):
    """SPM writes NaN outside the brain: those voxels take the smallest finite value (one warning), so the warped
    image is finite and its other voxels keep their interpolated values instead of turning NaN next to them."""
    folder, content, _ = scene
    replace_networks(monkeypatch, reg_net=ConstantField([0.5, 0.0, 0.0]))
    with_nan = content.copy()
    with_nan[:4] = np.nan
    stored(folder / "moving.nii.gz", with_nan)
    stored(folder / "fixed.nii.gz", content)
    with caplog.at_level("WARNING", logger="deepatlas"):
        written = inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                           folder / "out")
    assert sum("NaN / infinite voxel" in r.message for r in caplog.records) == 1
    warped = read(written["warped"])[0]
    background = content[4:].min()
    np.testing.assert_allclose(warped[:3], background, rtol=1e-6)
    np.testing.assert_allclose(warped[3], (background + content[4]) / 2, rtol=1e-5)  # half a voxel into the edge
    np.testing.assert_allclose(warped[4:-1], (content[4:-1] + content[5:]) / 2, rtol=1e-5)


def test_register_model_space_writes_the_network_grid(scene, monkeypatch):
    folder, content, labels = scene
    replace_networks(monkeypatch, reg_net=ConstantField([1.0, 0.0, 0.0]))
    fixed_affine = stored(folder / "fixed.nii.gz", content)
    stored(folder / "moving.nii.gz", content, flip_first_axis=True)
    stored(folder / "moving_label.nii.gz", labels, flip_first_axis=True)
    written = inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                       folder / "out", moving_label=folder / "moving_label.nii.gz", space="model")
    model_affine = fixed_affine.copy()
    model_affine[:3, 3] -= SPACING * np.array([1, 1, 0])  # padded by 3 / 2 / 1 voxels: 1 / 1 / 0 before
    warped_label, affine = read(written["warped_label"])
    np.testing.assert_allclose(affine, model_affine)
    assert warped_label.shape == (16, 16, 16)
    np.testing.assert_array_equal(warped_label[1:12, 1:15, 0:15], labels[1:12])  # original label values
    np.testing.assert_allclose(read(written["ddf"])[0][..., 0], 1)


@pytest.mark.parametrize("device", DEVICES)
def test_segment_native_is_the_model_grid_classes_at_each_file_voxel(scene, monkeypatch, device):
    """Reorientation and padding only: every voxel of the file is a model-grid voxel, so the native map is the
    model's (random) classes reoriented and cropped, in original label values."""
    folder, content, _ = scene
    logits = torch.randn(1, K, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    replace_networks(monkeypatch, seg_net=FixedLogits(lambda image: logits.to(image.device)))
    affine = stored(folder / "image.nii.gz", content, flip_first_axis=True)
    written = inference.segment_file(folder / "model.pt", folder / "image.nii.gz", folder / "seg.nii.gz",
                                     device=device)
    segmentation, written_affine = read(written["segmentation"])
    np.testing.assert_allclose(written_affine, affine)
    classes = logits[0].argmax(0).numpy()[1:14, 1:15, 0:15]  # RAS model grid, padding 1 / 1 / 0 before
    expected = np.array([0, 1, 2, 17])[classes][::-1]        # stored LAS: first axis reversed
    np.testing.assert_array_equal(segmentation, expected)


def test_segment_native_resamples_a_coarser_model_grid(scene, monkeypatch):
    """Model grid at 3 mm (preprocess spacing), file at 1.5 mm: a boundary between two classes at world x = c on
    the model grid lands at x = c on the file's grid too (to within a model voxel)."""
    folder, content, _ = scene
    boundary = 10.0 + SPACING * 6.3  # world x (mm)

    def halves(image):
        model_affine = halves.affine
        x = model_affine[0, 0] * np.arange(image.shape[2]) + model_affine[0, 3]
        left = torch.from_numpy(x < boundary).view(-1, 1, 1).expand(image.shape[2:])
        return torch.stack([left, ~left], 0)[None].float() * 10
    load = inference.load_model

    def coarse_model(path, device="cpu"):
        import dataclasses
        model = load(path, device)
        preprocess = {**model.config.preprocess, "spacing": [3.0, 3.0, 3.0]}
        return dataclasses.replace(model, config=dataclasses.replace(model.config, preprocess=preprocess))
    monkeypatch.setattr(inference, "load_model", coarse_model)
    read_volume = inference._read

    def remember_affine(*args, **kwargs):
        volume = read_volume(*args, **kwargs)
        halves.affine = volume.affine
        return volume
    monkeypatch.setattr(inference, "_read", remember_affine)
    replace_networks(monkeypatch, seg_net=FixedLogits(halves))
    affine = stored(folder / "image.nii.gz", content)
    segmentation, written_affine = read(inference.segment_file(folder / "model.pt", folder / "image.nii.gz",
                                                               folder / "seg.nii.gz")["segmentation"])
    np.testing.assert_allclose(written_affine, affine)
    assert segmentation.shape == SHAPE and halves.affine[0, 0] == pytest.approx(3.0, rel=0.1)  # a coarse model grid
    x = affine[0, 0] * np.arange(SHAPE[0]) + affine[0, 3]
    expected = np.where(x < boundary, 0, 1)
    far = np.abs(x - boundary) > 3.0
    np.testing.assert_array_equal(segmentation[far], np.broadcast_to(expected[far, None, None],
                                                                     (far.sum(), *SHAPE[1:])))


def test_segment_native_leaves_voxels_cropped_away_from_the_model_grid_as_background(tmp_path, monkeypatch):
    """crop_shape keeps the central 16^3 of a 40^3 file: a structure on the model grid's last row must not be
    smeared over the 12 rows past it that the network never saw."""
    save_tiny_model(tmp_path, {"crop_shape": [16, 16, 16]})

    def last_row_is_class_1(image):
        logits = torch.zeros(1, K, *image.shape[2:])
        logits[:, 0], logits[:, 1, -1], logits[:, 0, -1] = 5, 5, 0
        return logits
    replace_networks(monkeypatch, seg_net=FixedLogits(last_row_is_class_1))
    save_nifti(tmp_path / "image.nii.gz", np.random.default_rng(0).uniform(size=(40, 40, 40)), np.eye(4))
    segmentation = read(inference.segment_file(tmp_path / "model.pt", tmp_path / "image.nii.gz",
                                               tmp_path / "seg.nii.gz")["segmentation"])[0]
    expected = np.zeros((40, 40, 40), np.int64)
    expected[27, 12:28, 12:28] = 1  # the model grid is rows 12..27 of each axis
    np.testing.assert_array_equal(segmentation, expected)


@pytest.mark.parametrize("problem", ["qform_sform_disagree", "no_orientation"])
def test_outputs_copy_the_input_geometry_and_itk_refuses_ambiguous_headers(scene, problem, caplog):
    """Native outputs carry the input's own qform / sform (and codes), so ITK reads both alike; an ITK DDF is
    refused for a file that ITK may place differently from nibabel."""
    import SimpleITK as sitk
    folder, content, labels = scene
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    for name, array in (("odd", content), ("odd_label", labels.astype(np.int16))):
        image = nib.Nifti1Image(array, affine)
        if problem == "qform_sform_disagree":
            shifted = affine.copy()
            shifted[1, 3] += 4.0
            image.set_qform(affine, code=1)
            image.set_sform(shifted, code=2)
        else:
            image.set_qform(None, code=0)
            image.set_sform(None, code=0)
        nib.save(image, str(folder / f"{name}.nii.gz"))
    with caplog.at_level("WARNING", logger="deepatlas"):
        written = inference.register_files(folder / "model.pt", folder / "odd.nii.gz", folder / "odd.nii.gz",
                                           folder / "out", moving_label=folder / "odd_label.nii.gz")
    assert any("odd.nii.gz" in r.message and ("disagree" in r.message or "no qform" in r.message)
               for r in caplog.records)
    source = sitk.ReadImage(str(folder / "odd.nii.gz"))
    for name in ("warped", "warped_label", "jacobian"):  # the 3-D outputs (ITK reads the RAS DDF as 4-D)
        output = sitk.ReadImage(str(written[name]))
        np.testing.assert_allclose(output.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(output.GetDirection(), source.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(output.GetSpacing(), source.GetSpacing(), atol=1e-6)
    for path in written.values():
        np.testing.assert_allclose(nib.load(path).affine, nib.load(folder / "odd.nii.gz").affine, atol=1e-4)
    with pytest.raises(ValueError, match="--ddf-format itk: .*odd.nii.gz: (its qform and sform disagree|no qform)"):
        inference.register_files(folder / "model.pt", folder / "odd.nii.gz", folder / "odd.nii.gz", folder / "out",
                                 ddf_format="itk")


def test_itk_ddf_is_refused_for_a_sheared_file(scene):
    folder, content, _ = scene
    sheared = np.diag([SPACING, SPACING, SPACING, 1.0])
    sheared[0, 1] = 0.3
    nib.save(nib.Nifti1Image(content, sheared), str(folder / "sheared.nii.gz"))
    stored(folder / "fixed.nii.gz", content)
    with pytest.raises(ValueError, match="sheared.nii.gz: its affine is sheared"):
        inference.register_files(folder / "model.pt", folder / "sheared.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out", ddf_format="itk")


def test_register_warns_when_the_model_grids_differ_in_voxel_size(scene, caplog):
    folder, content, _ = scene
    stored(folder / "fixed.nii.gz", content)
    coarse = nib.Nifti1Image(content, np.diag([2 * SPACING, SPACING, SPACING, 1.0]))
    nib.save(coarse, str(folder / "moving.nii.gz"))
    with caplog.at_level("WARNING", logger="deepatlas"):
        inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out")
    assert any("moving" in r.message and "voxels of [3.0, 1.5, 1.5] mm" in r.message and "fixed" in r.message
               and "[1.5, 1.5, 1.5] mm" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepatlas"):
        inference.register_files(folder / "model.pt", folder / "fixed.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out")
    assert not [r for r in caplog.records if "voxel to voxel" in r.message]


def test_files_in_microns_are_read_in_mm(scene):
    """The affine is in the file's spatial units: a file in microns (microscopy) is scaled to mm, as ITK does."""
    from deepatlas.data.nifti import read_volume
    folder, content, _ = scene
    image = nib.Nifti1Image(content, np.diag([10.0, 10.0, 20.0, 1.0]))
    image.header.set_xyzt_units("micron")
    nib.save(image, str(folder / "slide.nii.gz"))
    affine = read_volume(folder / "slide.nii.gz")[1]
    np.testing.assert_allclose(np.diag(affine), [0.01, 0.01, 0.02, 1.0])
    import SimpleITK as sitk
    np.testing.assert_allclose(sitk.ReadImage(str(folder / "slide.nii.gz")).GetSpacing(), [0.01, 0.01, 0.02])


def test_space_must_be_native_or_model(scene):
    folder, content, _ = scene
    stored(folder / "image.nii.gz", content)
    with pytest.raises(ValueError, match=r"space must be one of \['native', 'model'\], got 'world'"):
        inference.segment_file(folder / "model.pt", folder / "image.nii.gz", folder / "seg.nii.gz", space="world")


def test_cli_writes_the_files_grid_unless_space_model(scene, capsys):
    from deepatlas.cli import main
    folder, content, labels = scene
    affine = stored(folder / "image.nii.gz", content, flip_first_axis=True)
    stored(folder / "label.nii.gz", labels, flip_first_axis=True)
    for space, shape in (("native", SHAPE), ("model", (16, 16, 16))):
        flags = [] if space == "native" else ["--space", "model"]
        ddf_flags = ["--ddf-format", "itk"] if space == "native" else []
        assert main(["segment", str(folder / "image.nii.gz"), "--model", str(folder / "model.pt"), "--output",
                     str(folder / space / "seg.nii.gz"), *flags]) == 0
        assert main(["register", str(folder / "image.nii.gz"), str(folder / "image.nii.gz"), "--model",
                     str(folder / "model.pt"), "--moving-label", str(folder / "label.nii.gz"), "--output",
                     str(folder / space), *flags, *ddf_flags]) == 0
        for name in ("seg", "warped", "warped_label", "ddf", "jacobian_det"):
            image = nib.load(folder / space / f"{name}.nii.gz")
            assert image.shape[:3] == shape
            assert np.allclose(image.affine, affine) == (space == "native")
        assert nib.load(folder / space / "ddf.nii.gz").ndim == (5 if space == "native" else 4)
    capsys.readouterr()


def test_segment_several_images_into_a_folder(scene, capsys):
    from deepatlas.cli import main
    folder, content, _ = scene
    for name in ("a", "b"):
        stored(folder / f"{name}.nii.gz", content, flip_first_axis=name == "b")
    assert main(["segment", str(folder / "a.nii.gz"), str(folder / "b.nii.gz"), "--model", str(folder / "model.pt"),
                 "--output", str(folder / "segs"), "--json", "--no-progress"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written == {str(folder / f"{n}.nii.gz"): str(folder / "segs" / f"{n}_seg.nii.gz") for n in "ab"}
    a, b = (read(folder / "segs" / f"{n}_seg.nii.gz")[0] for n in "ab")
    np.testing.assert_array_equal(a, b[::-1])  # the same content, stored with the first axis reversed
    single = inference.segment_file(folder / "model.pt", folder / "a.nii.gz", folder / "a.nii.gz.seg.nii.gz")
    np.testing.assert_array_equal(read(single["segmentation"])[0], a)


def test_segment_output_names_must_be_unambiguous(scene):
    folder, content, _ = scene
    for sub in ("x", "y"):
        stored(folder / sub / "scan.nii.gz", content)
    images = [folder / "x" / "scan.nii.gz", folder / "y" / "scan.nii.gz"]
    with pytest.raises(ValueError, match="would both be written to .*scan_seg.nii.gz; rename one"):
        inference.segment_files(folder / "model.pt", images, folder / "segs")
    with pytest.raises(ValueError, match="is a file name; with 2 images give a folder"):
        inference.segment_files(folder / "model.pt", images, folder / "seg.nii.gz")


def test_register_with_both_label_maps_scores_the_registration(scene, monkeypatch, capsys):
    """A field of +1 voxel along the last axis (padded after only) maps the moving labels exactly onto a fixed map
    that is the same labels one voxel further: Dice 1 after, folding 0, written to metrics.json and printed."""
    from deepatlas.cli import main
    folder, content, labels = scene
    replace_networks(monkeypatch, reg_net=ConstantField([0.0, 0.0, 1.0]))
    shifted = np.zeros_like(labels)
    shifted[..., :-1] = labels[..., 1:]
    stored(folder / "moving.nii.gz", content)
    stored(folder / "moving_label.nii.gz", labels)
    stored(folder / "fixed.nii.gz", content)
    stored(folder / "fixed_label.nii.gz", shifted)
    argv = ["register", str(folder / "moving.nii.gz"), str(folder / "fixed.nii.gz"), "--model",
            str(folder / "model.pt"), "--moving-label", str(folder / "moving_label.nii.gz"), "--fixed-label",
            str(folder / "fixed_label.nii.gz"), "--output", str(folder / "out")]
    assert main(argv) == 0
    assert "1.000 after; 0.000% folding voxels" in capsys.readouterr().out
    scores = json.loads((folder / "out" / "metrics.json").read_text())
    assert scores["dice_after"] == 1.0 and scores["dice_per_class_after"] == [1.0] * K
    assert 0 < scores["dice_before"] < 0.5 and scores["folding_pct"] == 0.0 and scores["std_log_det"] == 0.0
    with pytest.raises(ValueError, match="give --moving-label too"):
        inference.register_files(folder / "model.pt", folder / "moving.nii.gz", folder / "fixed.nii.gz",
                                 folder / "out", fixed_label=folder / "fixed_label.nii.gz")
