"""``deepatlas demo``: the independent baselines and DeepAtlas (one-shot) on embedded data, side by side, with
NIfTI outputs and figures. Presets trade time for quality; the numbers in docs/results.md come from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write
from .config import TrainConfig
from .run import Dataset, compare, prepare_data, results_table

log = logging.getLogger("deepatlas")

# One-shot (num_labelled=1) on 32^3 / 64^3 synthetic subjects (the default: 9 structures, pairs of them with nearly
# equal intensities, so one labelled image does not teach segmentation on its own). Step counts are per method; the
# baselines get the same number of steps of the network they train as the joint model (see deepatlas.schedule).
# "gncc" is the default's budget with the paper's losses (global NCC, lambda_r 1, no clip; the demo's settings until
# 2026-12); "default" adds local NCC, lambda_r 0.3 and a gradient-norm clip of 3 (chosen while the local NCC loss
# was biased; with the fixed loss joint gains segmentation but not registration, docs/results.md), and F_S at the
# full widths 8-64 (4-8-16-32 until 2026-12-07: its stand-in labels were worse than registration's own).
GNCC = dict(shape=(32, 32, 32), num_train=10, num_test=4, num_classes=10, reg_enc=(8, 16, 16, 16, 16),
            reg_dec=(16, 16, 16, 16, 8, 8), seg_channels=(4, 8, 16, 32), lr=2e-3, ce_weight=1.0, lambda_a=0.3,
            reg_pretrain_steps=400, seg_pretrain_steps=400, semi_steps=300, joint_rounds=30, reg_per_seg=5,
            eval_pairs=12, log_every=10, checkpoint_every=100)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(shape=(32, 32, 32), num_train=6, num_test=3, num_classes=6, reg_enc=(8, 16, 16, 16, 16),
                  reg_dec=(16, 16, 16, 16, 8, 8), seg_channels=(4, 8, 16, 32), reg_pretrain_steps=20,
                  seg_pretrain_steps=10, semi_steps=5, joint_rounds=2, reg_per_seg=5, eval_pairs=6,
                  log_every=5, checkpoint_every=50),
    "default": dict(GNCC, similarity="lncc", lambda_r=0.3, grad_clip=3.0, seg_channels=(8, 16, 32, 64)),
    "gncc": GNCC,
    "long": dict(shape=(64, 64, 64), num_train=20, num_test=6, num_classes=8, reg_pretrain_steps=1500,
                 seg_pretrain_steps=300, semi_steps=200, joint_rounds=40, reg_per_seg=20, eval_pairs=30,
                 log_every=20, checkpoint_every=200),
}


def demo_config(output: str | Path, preset: str = "default", data: str = "synthetic", device: str = "cpu",
                seed: int = 0) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    return TrainConfig(**PRESETS[preset], data=data, num_labelled=1, device=device, seed=seed, data_seed=seed,
                       output=str(output))


def run_demo(output: str | Path, preset: str = "default", data: str = "synthetic", device: str = "cpu",
             seed: int = 0, progress: bool = True, figures: bool = True) -> list[dict[str, Any]]:
    """Train reg_only, seg_only and joint; write ``results.json`` / ``results.md``, the test data and the joint
    model's outputs as NIfTI, and figures. Returns the results rows."""
    output = Path(output)
    config = demo_config(output, preset, data, device, seed)
    dataset = prepare_data(config)
    results = compare(config, ("reg_only", "seg_only", "joint"), dataset=dataset, progress=progress)
    atomic_write(output / "results.json",
                 lambda h: h.write(json.dumps({"config": config.to_dict(), "results": results}, indent=1).encode()))
    atomic_write(output / "results.md", lambda h: h.write((results_table(results) + "\n").encode()))
    _write_test_data(dataset, output / "data")
    if figures:
        write_figures(output, dataset, config)
    return results


def _write_test_data(dataset: Dataset, folder: Path) -> None:
    """The test subjects as NIfTI (images/, labels/), so `deepatlas register` / `segment` can be tried on them."""
    from .data import save_nifti
    for subject in dataset.test_subjects:
        save_nifti(folder / "images" / f"{subject.name}.nii.gz", subject.image, subject.affine)
        save_nifti(folder / "labels" / f"{subject.name}.nii.gz", subject.label, subject.affine)


@torch.no_grad()
def write_figures(output: Path, dataset: Dataset, config: TrainConfig) -> None:
    """Figures of the joint model on the first test pair, its segmentation of the first test image (next to the
    supervised-only baseline's) and its training curves."""
    import deepatlas_cuda as da

    from . import figures
    from .inference import load_model

    joint = load_model(output / "joint", config.device)
    images, labels = dataset.test_images.to(joint.device), dataset.test_labels.to(joint.device)
    moving, fixed = images[0:1], images[1:2]
    ddf = joint.reg_net(moving, fixed).float()
    warped = da.warp(moving, ddf)
    warped_labels = da.warp_labels(labels[0:1], ddf, mode="nearest")
    folder = output / "figures"
    figures.plot_registration(moving[0, 0], fixed[0, 0], warped[0, 0], folder / "registration.png",
                              moving_label=labels[0, 0], fixed_label=labels[1, 0], warped_label=warped_labels[0, 0],
                              title="DeepAtlas (joint), test pair 0 -> 1")
    figures.plot_deformation_grid(ddf[0], folder / "deformation_grid.png", background=fixed[0, 0])
    figures.plot_jacobian(da.jacobian_det(ddf)[0, 0], folder / "jacobian.png", background=fixed[0, 0])
    figures.plot_segmentation(images[0, 0], folder / "segmentation_joint.png", label=labels[0, 0],
                              prediction=joint.seg_net(images[0:1]).argmax(1)[0])
    seg_only = load_model(output / "seg_only", config.device)
    figures.plot_segmentation(images[0, 0], folder / "segmentation_seg_only.png", label=labels[0, 0],
                              prediction=seg_only.seg_net(images[0:1]).argmax(1)[0])
    rows = [{**row, "phase": f"{row['phase']} ({row['kind']})"}
            for row in json.loads((output / "joint" / "metrics.json").read_text())]
    figures.plot_curves(rows, folder / "curves_joint.png",
                        keys=["loss", "sim", "smooth", "supervised", "anatomy", "dice", "peak_mem_mb"])

