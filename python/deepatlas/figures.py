"""Figures for DeepAtlas runs: registration grids, deformed grids, Jacobian maps, segmentations, training curves.

Every plotting function takes numpy arrays or torch tensors (any device, any float dtype), checks shapes, draws
on a bare ``matplotlib.figure.Figure`` with the Agg canvas (pyplot is never imported, so the caller's backend and
open windows are left alone) and writes a PNG atomically with :func:`save_figure`.

Conventions: volumes are ``[D, H, W]`` (leading singleton batch/channel dims are dropped), a displacement field
``ddf`` is ``[3, D, H, W]`` in voxels with channel ``i`` the displacement along axis ``i``, labels are integer
``[D, H, W]`` with 0 as background. Slices are the three orthogonal planes through the volume centre, drawn with
the first in-plane axis going up.

Needs matplotlib >= 3.7.
"""

import math
import numbers
import os
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .checkpoint import atomic_write

__all__ = [
    "plot_curves",
    "plot_deformation_grid",
    "plot_jacobian",
    "plot_registration",
    "plot_segmentation",
    "save_figure",
]

# (name, axis cut by the plane); the plane shows the two remaining axes in order.
ORIENTATIONS = (("axial", 0), ("coronal", 1), ("sagittal", 2))
PANEL_INCHES = 3.0
DPI = 100
FOLD_COLOR = "lime"


# --------------------------------------------------------------------------------------------- input checking


def _to_numpy(x):
    """``x`` (tensor or array-like) as a numpy array; floating tensors of any precision become float32."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_shape(x, name, ndim, expected, shape=None):
    """``x`` as a numpy array with ``ndim`` dims (leading singleton dims dropped), optionally equal to ``shape``.

    ``expected`` is the human-readable shape put in the error message, e.g. ``"[D, H, W]"``.
    """
    arr = _to_numpy(x)
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim or (shape is not None and arr.shape != tuple(shape)):
        want = f"{expected} = {list(shape)}" if shape is not None else expected
        raise ValueError(f"{name}: expected shape {want}, got {list(arr.shape)}")
    if min(arr.shape[-3:]) < 2:
        raise ValueError(f"{name}: expected shape {expected} with every spatial size >= 2, got {list(arr.shape)}")
    return arr


def _volume(x, name, shape=None):
    """A float ``[D, H, W]`` volume (of ``shape`` when given)."""
    return _check_shape(x, name, 3, "[D, H, W]", shape).astype(np.float32, copy=False)


def _label(x, name, shape):
    """An integer ``[D, H, W]`` label map of ``shape``, or None for None."""
    if x is None:
        return None
    arr = _check_shape(x, name, 3, "[D, H, W]", shape)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name}: expected integer class labels, got non-integer values of dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------- slicing & drawing


def _mid_slice(vol, axis):
    """The 2-D plane through the centre of ``vol`` (last three dims spatial) that cuts ``axis``."""
    spatial_axis = vol.ndim - 3 + axis
    return np.take(vol, vol.shape[spatial_axis] // 2, axis=spatial_axis)


def _in_plane_axes(axis):
    """The two volume axes shown (rows, columns) by the plane that cuts ``axis``."""
    return tuple(a for a in range(3) if a != axis)


def _window(*volumes):
    """A shared (vmin, vmax) display window: the 1st and 99th percentiles of all the volumes together."""
    values = np.concatenate([v[np.isfinite(v)].ravel() for v in volumes])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)


def _new_figure(nrows, ncols, extra_width=0.0):
    """A constrained-layout Figure on the Agg canvas and its ``[nrows, ncols]`` array of axes."""
    size = (PANEL_INCHES * ncols + extra_width, PANEL_INCHES * nrows + 0.6)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _show(ax, image, **kwargs):
    """``imshow`` of a 2-D slice with the first axis going up, without ticks; returns the image artist."""
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(image, origin="lower", interpolation="nearest", **kwargs)


def _class_colors(*labels):
    """{class: colour} for every non-zero class present in any of ``labels``, the same for every panel."""
    classes = sorted(set().union(*(np.unique(lab).tolist() for lab in labels if lab is not None)) - {0})
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def _draw_contours(ax, label_slice, colors, linestyle="solid"):
    """Outline each class of ``label_slice`` present in ``colors`` with its colour."""
    for cls, color in colors.items():
        mask = label_slice == cls
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2, linestyles=linestyle)


def _class_legend(fig, colors, extra=()):
    """A figure legend below the panels: one patch per class colour, then the ``extra`` handles."""
    handles = [Patch(color=c, label=f"class {k}") for k, c in colors.items()] + list(extra)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)


def _dice(a, b, classes):
    """Mean Dice over ``classes`` between label maps ``a`` and ``b`` (classes absent from both are skipped)."""
    scores = []
    for cls in classes:
        in_a, in_b = a == cls, b == cls
        total = in_a.sum() + in_b.sum()
        if total:
            scores.append(2.0 * np.logical_and(in_a, in_b).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------------------------- writing


def save_figure(fig, path):
    """Write ``fig`` to ``path`` atomically and close it.

    The image goes to a temporary file in the destination folder (created if needed) which is then renamed over
    ``path`` with ``os.replace``, so readers never see a half-written file. The format follows the extension
    (PNG when there is none). If pyplot manages the figure it is closed there too. Returns ``path``.
    """
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format=fmt))
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(fig)
    return path


# --------------------------------------------------------------------------------------------- figures


def plot_registration(moving, fixed, warped, path, moving_label=None, fixed_label=None, warped_label=None,
                      title=None):
    """Moving / fixed / warped / |warped - fixed| on the three mid-planes, with label outlines when given.

    Rows are the axial, coronal and sagittal planes through the centre; the intensity window is shared by the
    first three columns. Each label map is outlined on its own image (``fixed_label`` also on the difference
    column), one colour per class across all panels. Column titles carry the mean absolute difference to
    ``fixed`` before and after, and the mean Dice when the labels allow. Returns ``path``.
    """
    moving = _volume(moving, "moving")
    fixed = _volume(fixed, "fixed", moving.shape)
    warped = _volume(warped, "warped", moving.shape)
    labels = [_label(lab, name, moving.shape) for lab, name in
              ((moving_label, "moving_label"), (fixed_label, "fixed_label"), (warped_label, "warped_label"))]
    colors = _class_colors(*labels)
    vmin, vmax = _window(moving, fixed, warped)
    diff = np.abs(warped - fixed)
    diff_max = max(float(np.percentile(np.abs(moving - fixed), 99)), 1e-12)
    headers = [
        "moving",
        "fixed",
        f"warped (MAE {np.abs(moving - fixed).mean():.3g} → {diff.mean():.3g})",
        "|warped − fixed|",
    ]
    moving_label_, fixed_label_, warped_label_ = labels
    if fixed_label_ is not None:
        classes = list(colors)
        if moving_label_ is not None:
            headers[0] += f" (Dice {_dice(moving_label_, fixed_label_, classes):.3f})"
        if warped_label_ is not None:
            headers[2] += f"\nDice {_dice(warped_label_, fixed_label_, classes):.3f}"
    fig, axes = _new_figure(3, 4, extra_width=0.8)
    for row, (name, axis) in enumerate(ORIENTATIONS):
        panels = ((moving, moving_label_), (fixed, fixed_label_), (warped, warped_label_))
        for col, (vol, lab) in enumerate(panels):
            _show(axes[row, col], _mid_slice(vol, axis), cmap="gray", vmin=vmin, vmax=vmax)
            if lab is not None:
                _draw_contours(axes[row, col], _mid_slice(lab, axis), colors)
        im = _show(axes[row, 3], _mid_slice(diff, axis), cmap="magma", vmin=0.0, vmax=diff_max)
        if fixed_label_ is not None:
            _draw_contours(axes[row, 3], _mid_slice(fixed_label_, axis), colors)
        axes[row, 0].set_ylabel(name)
    for col, header in enumerate(headers):
        axes[0, col].set_title(header, fontsize=9)
    fig.colorbar(im, ax=axes[:, 3].tolist(), shrink=0.6, label="|warped − fixed|")
    _class_legend(fig, colors)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _deformed_lines(u_rows, u_cols, step):
    """Polylines (x, y) of a regular grid with spacing ``step`` moved by the in-plane displacement ``(u_rows,
    u_cols)``: first the lines of constant row, then those of constant column."""
    n_rows, n_cols = u_rows.shape
    rows, cols = np.arange(n_rows), np.arange(n_cols)
    lines = [(cols + u_cols[i], i + u_rows[i]) for i in range(0, n_rows, step)]
    lines += [(j + u_cols[:, j], rows + u_rows[:, j]) for j in range(0, n_cols, step)]
    return lines


def plot_deformation_grid(ddf, path, step=4, background=None):
    """The three mid-planes of ``ddf`` drawn as a regular grid (every ``step`` voxels) moved by its in-plane
    components, over ``background`` (a ``[D, H, W]`` volume) when given. Returns ``path``."""
    ddf = _check_shape(ddf, "ddf", 4, "[3, D, H, W]").astype(np.float32, copy=False)
    if ddf.shape[0] != 3:
        raise ValueError(f"ddf: expected shape [3, D, H, W], got {list(ddf.shape)}")
    if not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step: expected a positive integer, got {step!r}")
    if background is not None:
        background = _volume(background, "background", ddf.shape[1:])
        vmin, vmax = _window(background)
    fig, axes = _new_figure(1, 3)
    for ax, (name, axis) in zip(axes[0], ORIENTATIONS):
        r, c = _in_plane_axes(axis)
        u_rows, u_cols = _mid_slice(ddf[r], axis), _mid_slice(ddf[c], axis)
        if background is not None:
            _show(ax, _mid_slice(background, axis), cmap="gray", vmin=vmin, vmax=vmax)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        for x, y in _deformed_lines(u_rows, u_cols, step):
            ax.plot(x, y, color="tab:orange", linewidth=0.8)
        ax.set_xlim(-0.5, u_rows.shape[1] - 0.5)
        ax.set_ylim(-0.5, u_rows.shape[0] - 0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: max |u| {np.hypot(u_rows, u_cols).max():.2f} vox", fontsize=9)
    fig.suptitle(f"deformed grid (step {step} voxels, in-plane displacement)")
    return save_figure(fig, path)


def _jacobian_norm(det):
    """A TwoSlopeNorm centred at 1 spanning the finite values of ``det`` symmetrically, floored at 0."""
    finite = det[np.isfinite(det)]
    span = max(float(np.abs(finite - 1.0).max()), 1e-3) if finite.size else 1.0
    return TwoSlopeNorm(vcenter=1.0, vmin=1.0 - min(span, 1.0), vmax=1.0 + span)


def plot_jacobian(det, path, background=None):
    """The three mid-planes of a Jacobian determinant map ``det`` ``[D, H, W]``.

    Diverging colours centred at 1 (blue: compression, red: expansion) with a colour bar; folded voxels
    (det <= 0) painted in a distinct colour; the title counts them over the whole volume. Over ``background``
    (a ``[D, H, W]`` volume) when given. Returns ``path``.
    """
    det = _volume(det, "det")
    if background is not None:
        background = _volume(background, "background", det.shape)
        vmin, vmax = _window(background)
    folded = det <= 0
    n_folded = int(folded.sum())
    norm = _jacobian_norm(det)
    fold_cmap = ListedColormap([FOLD_COLOR])
    fig, axes = _new_figure(1, 3, extra_width=0.8)
    for ax, (name, axis) in zip(axes[0], ORIENTATIONS):
        if background is not None:
            _show(ax, _mid_slice(background, axis), cmap="gray", vmin=vmin, vmax=vmax)
        im = _show(ax, _mid_slice(det, axis), cmap="RdBu_r", norm=norm, alpha=0.7 if background is not None else 1)
        plane_folds = _mid_slice(folded, axis)
        _show(ax, np.ma.masked_where(~plane_folds, plane_folds), cmap=fold_cmap, vmin=0, vmax=1)
        ax.set_title(f"{name} ({int(plane_folds.sum())} folded here)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="det J")
    fig.legend(handles=[Patch(color=FOLD_COLOR, label="folded (det J ≤ 0)")], loc="outside lower center",
               frameon=False)
    fig.suptitle(f"Jacobian determinant: {n_folded} folded voxels ({100.0 * n_folded / det.size:.3f}%), "
                 f"range [{np.nanmin(det):.3g}, {np.nanmax(det):.3g}]")
    return save_figure(fig, path)


def plot_segmentation(image, path, label=None, prediction=None):
    """The three mid-planes of ``image`` with the manual ``label`` outlined in solid lines and the
    ``prediction`` in dashed lines (same colour per class); the title gives their mean Dice when both are
    given. Returns ``path``."""
    image = _volume(image, "image")
    label = _label(label, "label", image.shape)
    prediction = _label(prediction, "prediction", image.shape)
    colors = _class_colors(label, prediction)
    vmin, vmax = _window(image)
    fig, axes = _new_figure(1, 3)
    for ax, (name, axis) in zip(axes[0], ORIENTATIONS):
        _show(ax, _mid_slice(image, axis), cmap="gray", vmin=vmin, vmax=vmax)
        if label is not None:
            _draw_contours(ax, _mid_slice(label, axis), colors, "solid")
        if prediction is not None:
            _draw_contours(ax, _mid_slice(prediction, axis), colors, "dashed")
        ax.set_title(name, fontsize=9)
    styles = []
    if label is not None:
        styles.append(Line2D([], [], color="black", linestyle="solid", label="manual"))
    if prediction is not None:
        styles.append(Line2D([], [], color="black", linestyle="dashed", label="predicted"))
    _class_legend(fig, colors, styles)
    if label is not None and prediction is not None:
        fig.suptitle(f"segmentation: mean Dice {_dice(prediction, label, list(colors)):.3f}")
    return save_figure(fig, path)


def _is_number(value):
    """True for a finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _curve_keys(rows):
    """The numeric keys of ``rows`` other than ``step`` and ``phase``, in order of first appearance."""
    keys = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "phase") and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def _series(rows, key):
    """{phase: (steps, values)} of ``key`` over ``rows`` sorted by step; rows without ``key`` are skipped, a
    missing step is the row's index, a missing phase is ``"all"``."""
    series = {}
    for index, row in enumerate(rows):
        value = row.get(key)
        if _is_number(value):
            step = row.get("step", index)
            series.setdefault(str(row.get("phase", "all")), []).append((step, value))
    return {phase: tuple(np.asarray(v) for v in zip(*sorted(points))) for phase, points in series.items()}


def _is_dice(key):
    """True for overlap scores (plotted on a linear 0..1 axis), False for losses."""
    return "dice" in key.lower()


def plot_curves(rows, path, keys=None):
    """Training curves from a metrics log: one panel per key (default: every numeric key but ``step`` and
    ``phase``) against ``step``, one line per phase. Losses spanning a decade or more of positive values use a
    log y-axis; Dice keys a 0..1 axis. Rows may lack keys. Returns ``path``."""
    if isinstance(rows, (str, bytes)) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("rows: expected a list of dicts like {'step': 10, 'phase': 'reg', 'loss': 0.4}")
    rows = list(rows)
    keys = _curve_keys(rows) if keys is None else list(keys)
    if not keys:
        raise ValueError("rows: expected at least one numeric metric besides 'step' and 'phase'")
    phases = list(dict.fromkeys(str(row.get("phase", "all")) for row in rows))
    phase_colors = {p: colormaps["tab10"](i % 10) for i, p in enumerate(phases)}
    ncols = min(3, len(keys))
    fig, axes = _new_figure(math.ceil(len(keys) / ncols), ncols)
    for ax, key in zip(axes.ravel(), keys):
        series = _series(rows, key)
        for phase, (steps, values) in series.items():
            ax.plot(steps, values, color=phase_colors[phase], label=phase, marker="o" if len(steps) < 20 else None,
                    markersize=3, linewidth=1.2)
        values = np.concatenate([v for _, v in series.values()]) if series else np.empty(0)
        if _is_dice(key):
            if values.size and values.min() >= 0 and values.max() <= 1:
                ax.set_ylim(0, 1.02)
        elif values.size and values.min() > 0 and values.max() >= 10 * values.min():
            ax.set_yscale("log")
        ax.set_title(key if series else f"{key} (no data)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    fig.legend(handles=[Line2D([], [], color=c, label=p) for p, c in phase_colors.items()],
               loc="outside lower center", ncols=min(len(phases), 8), frameon=False)
    return save_figure(fig, path)
