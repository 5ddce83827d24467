"""Using a trained model: load ``model.pt``, evaluate runs, register and segment NIfTI files."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import deepatlas_cuda as da

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .run import preprocess_of
from .trainer import MODEL, build_networks


@dataclass
class LoadedModel:
    config: TrainConfig
    num_classes: int
    reg_net: nn.Module
    seg_net: nn.Module
    device: torch.device


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """The networks of a ``model.pt`` (or a run folder holding one), in eval mode on ``device``."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL
    state = load_checkpoint(path, map_location=device)
    # Inference runs the networks in float32: a model trained under fp16 autocast on a GPU loads on the CPU too.
    config = replace(TrainConfig.from_dict(state["config"]), device=device, amp="none")
    reg, seg = build_networks(config, state["num_classes"])
    reg.load_state_dict(state["reg_net"])
    seg.load_state_dict(state["seg_net"])
    target = torch.device(device)
    return LoadedModel(config, state["num_classes"], reg.to(target).eval(), seg.to(target).eval(), target)


def find_models(run: str | Path) -> list[Path]:
    """``run`` is a model.pt, a run folder with one, or a folder of run folders (as ``compare`` / ``demo`` write)."""
    run = Path(run)
    if run.is_file():
        return [run]
    if (run / MODEL).is_file():
        return [run / MODEL]
    found = sorted(run.glob(f"*/{MODEL}"))
    if not found:
        raise FileNotFoundError(f"no {MODEL} in {run} or its sub-folders: train a model first")
    return found


def evaluate_runs(run: str | Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Evaluate every model under ``run`` on the test split of the data it was trained on. Training time and peak
    memory come from the run's ``results.json`` when present."""
    from .evaluate import evaluate_registration, evaluate_segmentation
    from .run import TRAINS_REGISTRATION, TRAINS_SEGMENTATION, prepare_data

    results, datasets = [], {}
    for path in find_models(run):
        model = load_model(path, device)
        cfg = model.config
        key = json.dumps([cfg.data, cfg.num_train, cfg.num_test, cfg.shape, cfg.num_classes, cfg.data_seed,
                          cfg.preprocess])
        if key not in datasets:
            datasets[key] = prepare_data(cfg)
        dataset = datasets[key]
        images, labels = dataset.test_images.to(model.device), dataset.test_labels.to(model.device)
        # As training's own evaluation (run.run_method): registration Dice needs a pair, segmentation one image.
        needed = 1 if cfg.method in TRAINS_SEGMENTATION else 2
        if images.shape[0] < needed:
            raise ValueError(f"{path}: its data has {images.shape[0]} labelled test image(s); evaluating "
                             f"{cfg.method} needs {needed}")
        result: dict[str, Any] = {"method": cfg.method, "reg_dice": None, "seg_dice": None, "folding_pct": None,
                                  "std_log_det": None, "seconds": None, "peak_mem_mb": None}
        if cfg.method in TRAINS_REGISTRATION and images.shape[0] >= 2:
            result.update(evaluate_registration(model.reg_net, images, labels, model.num_classes, cfg.eval_pairs))
        if cfg.method in TRAINS_SEGMENTATION:
            result.update(evaluate_segmentation(model.seg_net, images, labels, model.num_classes))
        trained = path.parent / "results.json"
        if trained.is_file():
            recorded = json.loads(trained.read_text())
            result.update({k: recorded.get(k) for k in ("seconds", "peak_mem_mb", "steps")})
        result["model"] = str(path)
        results.append(result)
    return results


def _read(path: Path, preprocess, label_path: Path | None = None):
    """(image, label or None, affine) of one NIfTI file (and its label map), checked and preprocessed exactly as
    training data is (:func:`deepatlas.data.nifti.load_entry`)."""
    from .data.nifti import Entry, load_entry
    subject = load_entry(Entry(Path(path), None if label_path is None else Path(label_path), "test", Path(path).name),
                         preprocess)
    return subject.image, subject.label, subject.affine


def register_files(model_path: str | Path, moving: Path, fixed: Path, output: Path,
                   moving_label: Path | None = None, device: str = "cpu") -> dict[str, Path]:
    """Register ``moving`` to ``fixed`` with a trained F_R. Writes, on the fixed image's (preprocessed) grid and
    affine: ``warped.nii.gz``, ``ddf.nii.gz`` ([D, H, W, 3], voxels, component i along array axis i),
    ``jacobian_det.nii.gz`` and, with ``moving_label``, ``warped_label.nii.gz`` (nearest neighbour)."""
    from .data import save_nifti
    model = load_model(model_path, device)
    preprocess = preprocess_of(model.config)
    moving_image, moving_labels, _ = _read(moving, preprocess, moving_label)
    fixed_image, _, fixed_affine = _read(fixed, preprocess)
    if moving_image.shape != fixed_image.shape:
        raise ValueError(f"moving {moving} {moving_image.shape} and fixed {fixed} {fixed_image.shape} differ in "
                         f"shape after preprocessing; resample both to one shape first")
    to_tensor = (lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None].to(model.device))
    with torch.no_grad():
        m, f = to_tensor(moving_image), to_tensor(fixed_image)
        ddf = model.reg_net(m, f).float()
        written = {"warped": output / "warped.nii.gz", "ddf": output / "ddf.nii.gz",
                   "jacobian": output / "jacobian_det.nii.gz"}
        save_nifti(written["warped"], da.warp(m, ddf)[0, 0].cpu().numpy(), fixed_affine)
        save_nifti(written["ddf"], ddf[0].permute(1, 2, 3, 0).cpu().numpy(), fixed_affine)
        save_nifti(written["jacobian"], da.jacobian_det(ddf)[0, 0].cpu().numpy(), fixed_affine)
        if moving_labels is not None:
            warped = da.warp_labels(to_tensor(moving_labels), ddf, mode="nearest")[0, 0].cpu().numpy()
            written["warped_label"] = output / "warped_label.nii.gz"
            save_nifti(written["warped_label"], _original_labels(warped, preprocess), fixed_affine)
    return written


def segment_file(model_path: str | Path, image: Path, output: Path, device: str = "cpu") -> dict[str, Path]:
    """Segment ``image`` with a trained F_S; the label map (in the original label values when the model was
    trained with a label_map) is written with the image's preprocessed affine."""
    from .data import save_nifti
    model = load_model(model_path, device)
    preprocess = preprocess_of(model.config)
    array, _, affine = _read(image, preprocess)
    with torch.no_grad():
        volume = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(model.device)
        labels = model.seg_net(volume).argmax(1)[0].cpu().numpy()
    save_nifti(output, _original_labels(labels, preprocess), affine)
    return {"segmentation": output}


def _original_labels(labels: np.ndarray, preprocess) -> np.ndarray:
    """Map model classes 0..K-1 back to the original label values of the training data's label_map. A class that
    several original labels were merged into is written as the smallest of them (so background, which a map may
    fold other labels into, stays 0 when 0 maps to 0)."""
    if not preprocess.label_map:
        return labels
    inverse = np.zeros(max(preprocess.label_map.values()) + 1, dtype=np.int64)
    for original, new in sorted(preprocess.label_map.items(), reverse=True):
        inverse[new] = original
    return inverse[labels]
