"""deepatlas.figures: every figure writes a real PNG, inputs are checked, writes are atomic."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.image import imread

from deepatlas import figures

N = 24
SHAPE = (N, N, N)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _smooth(channels=1, seed=0):
    """A smooth random field [channels, N, N, N] (coarse noise upsampled trilinearly)."""
    noise = torch.randn(1, channels, 6, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=SHAPE, mode="trilinear", align_corners=True)[0]


def _labels():
    """Nested shells and a slab: classes 1..4 over background 0."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, N)] * 3, indexing="ij")
    r = np.sqrt(z**2 + y**2 + x**2)
    lab = np.zeros(SHAPE, np.int64)
    lab[r < 0.4] = 1
    lab[(r >= 0.4) & (r < 0.7)] = 2
    lab[(np.abs(x) < 0.2) & (r < 0.9)] = 3
    lab[(z > 0.3) & (r < 0.6)] = 4
    return lab


def _assert_png(path, min_kb=10):
    """``path`` is a PNG of some size and plausible dimensions, with no temp file left beside it."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > min_kb * 1024
    height, width = imread(path).shape[:2]
    assert height >= 200 and width >= 200
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def test_registration_with_labels_from_tensors_and_arrays(tmp_path):
    fixed = _smooth(seed=1)[0]
    moving = torch.roll(fixed, 2, dims=2).numpy()
    warped = (0.8 * fixed + 0.2 * torch.from_numpy(moving)).double()
    lab = _labels()
    path = figures.plot_registration(moving, fixed, warped, tmp_path / "reg.png", moving_label=np.roll(lab, 2, 2),
                                     fixed_label=torch.from_numpy(lab), warped_label=lab, title="pair 0")
    assert os.fspath(path) == os.fspath(tmp_path / "reg.png")
    _assert_png(tmp_path / "reg.png")
    assert imread(tmp_path / "reg.png").shape[:2] == (960, 1280)  # 3 x 4 panels of 3 in at 100 dpi, plus margins


def test_registration_without_labels_and_batched_inputs(tmp_path):
    vol = _smooth(seed=2)[None]  # [1, 1, D, H, W]
    figures.plot_registration(vol, vol, vol + 0.1, tmp_path / "sub" / "dir" / "reg.png")
    _assert_png(tmp_path / "sub" / "dir" / "reg.png")


def test_deformation_grid_with_and_without_background(tmp_path):
    ddf = 2.0 * _smooth(channels=3, seed=3)
    figures.plot_deformation_grid(ddf, tmp_path / "grid.png", step=3, background=_smooth(seed=4)[0])
    figures.plot_deformation_grid(ddf.numpy(), tmp_path / "grid_plain.png")
    _assert_png(tmp_path / "grid.png")
    _assert_png(tmp_path / "grid_plain.png")


def test_deformed_lines_follow_the_in_plane_displacement():
    u_rows, u_cols = np.full((5, 7), 0.5), np.full((5, 7), -1.0)
    lines = figures._deformed_lines(u_rows, u_cols, step=2)
    assert len(lines) == 3 + 4
    x, y = lines[1]  # the row-2 line, shifted by (+0.5 up, -1 right)
    np.testing.assert_allclose(x, np.arange(7) - 1.0)
    np.testing.assert_allclose(y, np.full(7, 2.5))


def test_jacobian_with_folds_counts_them_in_the_title(tmp_path):
    det = 1.0 + 1.5 * _smooth(seed=5)[0]
    n_folded = int((det <= 0).sum())
    assert 0 < n_folded < det.numel()
    figures.plot_jacobian(det, tmp_path / "jac.png", background=_smooth(seed=6)[0])
    figures.plot_jacobian(torch.ones(SHAPE), tmp_path / "jac_identity.png")
    _assert_png(tmp_path / "jac.png")
    _assert_png(tmp_path / "jac_identity.png", min_kb=5)


def test_jacobian_norm_is_centred_at_one_and_floored_at_zero():
    norm = figures._jacobian_norm(np.array([-3.0, 0.9, 1.5]))
    assert (norm.vmin, norm.vcenter, norm.vmax) == (0.0, 1.0, 5.0)
    norm = figures._jacobian_norm(np.ones(4))
    assert norm.vmin < 1.0 < norm.vmax


def test_segmentation_manual_and_predicted(tmp_path):
    lab = _labels()
    figures.plot_segmentation(_smooth(seed=7)[0], tmp_path / "seg.png", label=lab, prediction=np.roll(lab, 1, 0))
    figures.plot_segmentation(_smooth(seed=7)[0], tmp_path / "seg_pred.png", prediction=lab.astype(np.float32))
    _assert_png(tmp_path / "seg.png")
    _assert_png(tmp_path / "seg_pred.png")


def test_dice_of_shifted_labels():
    lab = _labels()
    assert figures._dice(lab, lab, [1, 2, 3, 4]) == 1.0
    assert 0.0 < figures._dice(lab, np.roll(lab, 2, 1), [1, 2, 3, 4]) < 1.0


def test_curves_with_missing_keys_and_two_phases(tmp_path):
    rows = []
    for step in range(0, 200, 10):
        phase = "reg" if (step // 50) % 2 == 0 else "seg"
        row = {"step": step, "phase": phase, "loss": 2.0 * np.exp(-step / 40) + 0.01, "dice": step / 250}
        row.update({"sim": 0.3 - step / 1000} if phase == "reg" else {"seg_loss": 1.0 - step / 250})
        rows.append(row)
    rows.append({"step": 200, "phase": "seg", "note": "checkpoint", "ok": True})
    assert figures._curve_keys(rows) == ["loss", "dice", "sim", "seg_loss"]
    assert set(figures._series(rows, "sim")) == {"reg"}
    figures.plot_curves(rows, tmp_path / "curves.png")
    figures.plot_curves(rows, tmp_path / "curves_some.png", keys=["dice", "absent"])
    _assert_png(tmp_path / "curves.png")
    _assert_png(tmp_path / "curves_some.png")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda p: figures.plot_registration(np.zeros((4, 4)), np.zeros(SHAPE), np.zeros(SHAPE), p), "moving"),
        (lambda p: figures.plot_registration(np.zeros(SHAPE), np.zeros((8, 8, 8)), np.zeros(SHAPE), p), "fixed"),
        (lambda p: figures.plot_registration(np.zeros(SHAPE), np.zeros(SHAPE), np.zeros((2, *SHAPE)), p), "warped"),
        (lambda p: figures.plot_registration(np.zeros(SHAPE), np.zeros(SHAPE), np.zeros(SHAPE), p,
                                             fixed_label=np.zeros((N, N, 5), int)), "fixed_label"),
        (lambda p: figures.plot_segmentation(np.zeros(SHAPE), p, label=np.full(SHAPE, 0.5)), "label"),
        (lambda p: figures.plot_deformation_grid(np.zeros((2, *SHAPE)), p), "ddf"),
        (lambda p: figures.plot_deformation_grid(np.zeros(SHAPE), p), "ddf"),
        (lambda p: figures.plot_deformation_grid(np.zeros((3, *SHAPE)), p, step=0), "step"),
        (lambda p: figures.plot_deformation_grid(np.zeros((3, *SHAPE)), p, background=np.zeros((N, N))),
         "background"),
        (lambda p: figures.plot_jacobian(torch.zeros(3, *SHAPE), p), "det"),
        (lambda p: figures.plot_jacobian(np.ones((N, 1, N)), p), "det"),
        (lambda p: figures.plot_curves([{"step": 1, "phase": "reg"}], p), "rows"),
        (lambda p: figures.plot_curves([3, 4], p), "rows"),
    ],
)
def test_bad_inputs_name_the_argument(tmp_path, call, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        call(tmp_path / "bad.png")
    assert not os.path.exists(tmp_path / "bad.png")


def test_save_figure_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "fig.png"
    target.parent.mkdir()
    target.write_bytes(b"old")

    class Broken(Figure):
        def savefig(self, fname, **kwargs):
            fname.write(b"partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        figures.save_figure(Broken(), target)
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["fig.png"]

    fig = Figure(figsize=(3, 3))
    fig.subplots().plot([0, 1], [1, 0])
    figures.save_figure(fig, target)
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(target.parent) == ["fig.png"]


def test_save_figure_closes_pyplot_figures_without_touching_the_backend(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    fig = plt.figure()
    figures.plot_curves([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], tmp_path / "curves.png")
    figures.save_figure(fig, tmp_path / "pyplot.png")
    assert not plt.fignum_exists(fig.number)
    assert matplotlib.get_backend() == backend
    _assert_png(tmp_path / "pyplot.png", min_kb=1)
