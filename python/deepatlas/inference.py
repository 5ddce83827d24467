"""Using a trained model: load ``model.pt``, evaluate runs, register and segment NIfTI files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import deepatlas_cuda as da

from .checkpoint import atomic_write, load_checkpoint
from .config import EMBEDDED_DATA, METHODS, TrainConfig
from .native import apply_affine, sample, slab_points, slabs, voxel_map
from .run import preprocess_of
from .trainer import MODEL, build_networks

log = logging.getLogger("deepatlas")


@dataclass
class LoadedModel:
    config: TrainConfig
    num_classes: int
    reg_net: nn.Module
    seg_net: nn.Module
    device: torch.device


def models_of_runs_in(folder: Path) -> list[Path]:
    """The model.pt of each run folder directly inside ``folder`` (a compare / demo output), sorted."""
    return sorted(folder.glob(f"*/{MODEL}"))


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """The networks of a ``model.pt`` (or a run folder holding one), in eval mode on ``device``."""
    path = Path(path)
    if path.is_dir():
        runs = [] if (path / MODEL).is_file() else [str(model.parent) for model in models_of_runs_in(path)]
        if runs:
            raise FileNotFoundError(f"{path} holds no {MODEL} but the runs {runs} (a compare / demo folder); pass "
                                    f"one of them")
        path = path / MODEL
    state = load_checkpoint(path, map_location=device)
    # Inference runs the networks in float32: a model trained under fp16 autocast on a GPU loads on the CPU too.
    config = replace(TrainConfig.from_dict(state["config"]), device=device, amp="none")
    reg, seg = build_networks(config, state["num_classes"])
    reg.load_state_dict(state["reg_net"])
    seg.load_state_dict(state["seg_net"])
    target = torch.device(device)
    return LoadedModel(config, state["num_classes"], reg.to(target).eval(), seg.to(target).eval(), target)


# The network each method leaves untrained (deepatlas.config.METHODS).
UNTRAINED = {"seg_only": "registration", "reg_only": "segmentation", "reg_anatomy": "segmentation"}


def _require_trained(model: LoadedModel, network: str, model_path: str | Path) -> None:
    """Refuse to use a network that the model's training method never trained (its output is meaningless)."""
    method = model.config.method
    if UNTRAINED.get(method) == network:
        usable = [m for m in METHODS if UNTRAINED.get(m) != network]
        raise ValueError(f"model {model_path} was trained with method {method!r}, which leaves its {network} "
                         f"network untrained; use a model trained with one of {usable}")


def _check_output(output: Path, command: str, folder: bool) -> None:
    """Before any work: ``output`` must be (or become) a folder (``folder``), or a file in one."""
    from .data.nifti import strip_nifti_suffix
    if folder and strip_nifti_suffix(output.name) is not None:
        raise ValueError(f"{command}: --output {output} is a folder that receives several files; give a folder "
                         f"name, not a .nii / .nii.gz one")
    for parent in (output, *output.parents) if folder else output.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{command}: --output {output}: {parent} exists and is not a folder")


def find_models(run: str | Path) -> list[Path]:
    """``run`` is a model.pt, a run folder with one, or a folder of run folders (as ``compare`` / ``demo`` write)."""
    run = Path(run)
    if run.is_file():
        return [run]
    if (run / MODEL).is_file():
        return [run / MODEL]
    found = models_of_runs_in(run)
    if not found:
        raise FileNotFoundError(f"no {MODEL} in {run} or its sub-folders: train a model first")
    return found


def evaluate_runs(run: str | Path, device: str = "cpu", data: str | Path | None = None) -> list[dict[str, Any]]:
    """Evaluate every model under ``run`` on the test split of the data it was trained on, or with ``data`` (a
    folder or a manifest of NIfTI files) on every labelled image there, read with the model's preprocessing.
    Training time and peak memory come from the run's ``results.json`` when present."""
    from .evaluate import evaluate_registration, evaluate_segmentation
    from .run import TRAINS_REGISTRATION, TRAINS_SEGMENTATION, prepare_data

    results, datasets = [], {}
    for path in find_models(run):
        model = load_model(path, device)
        cfg = model.config
        key = json.dumps([cfg.data, cfg.num_train, cfg.num_test, cfg.shape, cfg.num_classes, cfg.data_seed,
                          cfg.preprocess, None if data is None else str(data)])
        if key not in datasets:
            datasets[key] = prepare_data(cfg) if data is None else _labelled_files(data, cfg, model.num_classes)
        dataset = datasets[key]
        images, labels = dataset.test_images.to(model.device), dataset.test_labels.to(model.device)
        # As training's own evaluation (run.run_method): registration Dice needs a pair, segmentation one image.
        needed = 1 if cfg.method in TRAINS_SEGMENTATION else 2
        if images.shape[0] < needed:
            raise ValueError(f"{path}: its data has {images.shape[0]} labelled test image(s); evaluating "
                             f"{cfg.method} needs {needed}")
        log.info("evaluate: %s (%s) on %d labelled image(s)", path, cfg.method, images.shape[0])
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
        if data is not None:
            result["data"] = str(data)
        results.append(result)
    return results


SPACES = ("native", "model")
# Native-space DDF files: 'ras' [D, H, W, 3] in world RAS mm; 'itk' [D, H, W, 1, 3] in world LPS mm with the NIfTI
# intent 'vector', the displacement-field layout ITK, SimpleITK, ANTs (antsApplyTransforms) and 3D Slicer read.
DDF_FORMATS = ("ras", "itk")
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], np.float32)


@dataclass
class Volume:
    """One input file, as the model sees it (preprocessed, on the model grid) and as stored on disk."""

    image: np.ndarray           # [D, H, W] float32 in [0, 1], model grid
    label: np.ndarray | None    # [D, H, W] int64 classes 0..K-1, model grid
    affine: np.ndarray          # model grid voxel -> world
    native_image: np.ndarray    # [D', H', W'] float32: the file's own array and intensities (NaN -> background)
    native_label: np.ndarray | None  # [D', H', W'] int64 original label values
    native_affine: np.ndarray   # the file's voxel -> world (mm)
    native_header: Any          # the file's nibabel header: native outputs copy its qform / sform


@dataclass
class _TestSet:
    test_images: Tensor  # [T, 1, D, H, W] float32
    test_labels: Tensor  # [T, 1, D, H, W] int64


def _labelled_files(source: str | Path, config: TrainConfig, num_classes: int) -> _TestSet:
    """Every labelled image of ``source`` (folder or manifest, any split), preprocessed as ``config`` says, with
    classes checked against the model's ``num_classes``."""
    from .data import load_dataset, stack_subjects
    if str(source) in EMBEDDED_DATA:
        raise ValueError(f"evaluate --data takes a folder or a manifest of NIfTI files, got {source!r}; without "
                         f"--data a model is evaluated on the test split of the data it was trained on")
    subjects = [s for s in load_dataset(str(source), preprocess=preprocess_of(config)) if s.labelled]
    if not subjects:
        raise ValueError(f"evaluate --data {source}: no labelled image (a label map per image is needed to score)")
    largest = max(int(s.label.max()) for s in subjects)
    if largest >= num_classes:
        raise ValueError(f"evaluate --data {source}: label value {largest} after the model's label_map, but the "
                         f"model has {num_classes} classes (0..{num_classes - 1})")
    images, labels, _ = stack_subjects(subjects)
    return _TestSet(images, labels)


def _read(path: Path, preprocess, label_path: Path | None = None) -> Volume:
    """One NIfTI file (and its label map), checked and preprocessed exactly as training data is
    (:func:`deepatlas.data.nifti.load_entry`), together with its arrays as stored (NaN / infinite voxels set to
    background in both, with one warning)."""
    from .data.nifti import Entry, finite_image, load_entry, read_entry
    entry = Entry(Path(path), None if label_path is None else Path(label_path), "test", Path(path).name)
    image, native_label, native_affine, header = read_entry(entry)  # each file is read once
    native_image = finite_image(image.astype(np.float32), entry.image)
    subject = load_entry(entry, preprocess, (native_image, native_label, native_affine, header))
    return Volume(subject.image, subject.label, subject.affine, native_image, native_label, native_affine, header)


def _check_space(space: str, ddf_format: str = "ras") -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")
    if ddf_format not in DDF_FORMATS:
        raise ValueError(f"ddf_format must be one of {list(DDF_FORMATS)}, got {ddf_format!r}")
    if ddf_format == "itk" and space != "native":
        raise ValueError("ddf_format 'itk' writes a world-space transform of the input files; it needs space "
                         "'native' (a model-space DDF is in model-grid voxels)")


def register_files(model_path: str | Path, moving: Path, fixed: Path, output: Path,
                   moving_label: Path | None = None, device: str = "cpu", space: str = "native",
                   fixed_label: Path | None = None, ddf_format: str = "ras") -> dict[str, Path]:
    """Register ``moving`` to ``fixed`` with a trained F_R. Writes ``warped.nii.gz``, ``ddf.nii.gz``,
    ``jacobian_det.nii.gz`` and, with ``moving_label``, ``warped_label.nii.gz`` (nearest neighbour). With both
    ``moving_label`` and ``fixed_label``, ``metrics.json`` scores the registration as ``evaluate`` does, on the
    model grid: mean foreground Dice before and after, Dice per class after, % folding voxels, SD of log det.

    ``space='native'`` (default): on the fixed file's own grid and affine (its qform and sform copied). The warped
    image and labels are sampled from the moving file as stored (its intensities and original label values; zero
    outside it); the DDF is [D, H, W, 3] in mm in world (RAS) coordinates: fixed world point w corresponds to moving
    world point w + ddf; the Jacobian determinant is det(I + grad u) of the network's displacement, at each fixed
    voxel. Outside the model grid (where preprocessing cropped) the displacement is extended from its border.
    ``ddf_format='itk'`` (native space only) writes the same DDF as ITK's displacement-field file instead:
    [D, H, W, 1, 3] in world LPS mm, NIfTI intent 'vector'; ``antsApplyTransforms -i MOVING -r FIXED -t ddf.nii.gz``
    (or a SimpleITK DisplacementFieldTransform) then reproduces the warped image.
    ``space='model'``: on the preprocessed fixed grid the network ran on: the warped image is the preprocessed moving
    image, the DDF is in model-grid voxels (component i along array axis i)."""
    from .data import save_nifti
    _check_space(space, ddf_format)
    output = Path(output)
    _check_output(output, "register", folder=True)
    model = load_model(model_path, device)
    _require_trained(model, "registration", model_path)
    preprocess = preprocess_of(model.config)
    if fixed_label is not None and moving_label is None:
        raise ValueError("register: a fixed label map scores the registration against the warped moving one; give "
                         "--moving-label too")
    moving_volume = _read(moving, preprocess, moving_label)
    fixed_volume = _read(fixed, preprocess, fixed_label)
    if ddf_format == "itk":
        _check_itk_geometry({moving: moving_volume, fixed: fixed_volume})
    if moving_volume.image.shape != fixed_volume.image.shape:
        raise ValueError(f"moving {moving} {moving_volume.image.shape} and fixed {fixed} {fixed_volume.image.shape} "
                         f"differ in shape after preprocessing; F_R needs one grid for both: resample them to one "
                         f"shape first, or train with preprocess shape (or spacing and crop_shape) set")
    _warn_on_voxel_size_mismatch(moving, moving_volume, fixed, fixed_volume)
    to_tensor = (lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None].to(model.device))
    with torch.no_grad():
        m, f = to_tensor(moving_volume.image), to_tensor(fixed_volume.image)
        ddf = model.reg_net(m, f).float()                # [1, 3, D, H, W] model-grid voxels
        det = da.jacobian_det(ddf)[0]                    # [1, D, H, W]
        if space == "model":
            warped = da.warp(m, ddf)[0, 0].cpu().numpy()
            ddf_out = ddf[0].permute(1, 2, 3, 0).cpu().numpy()
            det_out = det[0].cpu().numpy()
            labels = None
            if moving_volume.label is not None:
                classes = da.warp_labels(to_tensor(moving_volume.label), ddf, mode="nearest")[0, 0].cpu().numpy()
                labels = _original_labels(classes, preprocess)
            affine, like = fixed_volume.affine, None
        else:
            warped, labels, ddf_out, det_out = _register_native(ddf[0], det, moving_volume, fixed_volume,
                                                                model.device)
            affine, like = fixed_volume.native_affine, fixed_volume.native_header
        scores = None if fixed_label is None else _registration_scores(moving_volume, fixed_volume, ddf,
                                                                       model.num_classes)
    written = {"warped": output / "warped.nii.gz", "ddf": output / "ddf.nii.gz",
               "jacobian": output / "jacobian_det.nii.gz"}
    save_nifti(written["warped"], warped, affine, like)
    if ddf_format == "itk":
        save_nifti(written["ddf"], (ddf_out * RAS_TO_LPS)[:, :, :, None, :], affine, like, intent="vector")
    else:
        save_nifti(written["ddf"], ddf_out, affine, like)
    save_nifti(written["jacobian"], det_out, affine, like)
    if labels is not None:
        written["warped_label"] = output / "warped_label.nii.gz"
        save_nifti(written["warped_label"], labels, affine, like)
    if scores is not None:
        written["metrics"] = output / "metrics.json"
        atomic_write(written["metrics"], lambda handle: handle.write(json.dumps(scores, indent=1).encode()))
    return written


def _warn_on_voxel_size_mismatch(moving: Path, moving_volume: Volume, fixed: Path, fixed_volume: Volume) -> None:
    """F_R matches voxels, not millimetres: two model grids of one shape but other voxel sizes (a model trained
    without ``preprocess.spacing``) are registered as if their voxels were the same size."""
    from .data.preprocess import voxel_spacing
    sizes = voxel_spacing(moving_volume.affine), voxel_spacing(fixed_volume.affine)
    if not np.allclose(*sizes, rtol=0.01):
        log.warning("register: after preprocessing, moving %s has voxels of %s mm and fixed %s of %s mm; the "
                    "network maps voxel to voxel, so the two are registered as if equal (train with "
                    "preprocess.spacing set to resample every file to one voxel size)", moving,
                    np.round(sizes[0], 3).tolist(), fixed, np.round(sizes[1], 3).tolist())


def _check_itk_geometry(volumes: dict[Path, Volume]) -> None:
    """An ITK DDF is in the world that ITK reads from the files; refuse files whose geometry ITK may read
    differently from nibabel (a world-space field would then be wrong there)."""
    from .data.nifti import itk_geometry_problem
    for path, volume in volumes.items():
        problem = itk_geometry_problem(volume.native_header)
        if problem is not None:
            raise ValueError(f"register --ddf-format itk: {path}: {problem}, so an ITK displacement field computed "
                             f"here would not match it in ITK; fix the file's header or use --ddf-format ras")


def _registration_scores(moving: Volume, fixed: Volume, ddf: Tensor, num_classes: int) -> dict[str, Any]:
    """What ``evaluate`` reports for one pair, on the model grid (classes 0..K-1; NaN Dice: class in neither map)."""
    from .metrics import mean_foreground_dice, registration_metrics
    as_tensor = (lambda a: torch.from_numpy(a)[None, None].to(ddf.device))
    moving_labels, fixed_labels = as_tensor(moving.label), as_tensor(fixed.label)
    after = registration_metrics(moving_labels, fixed_labels, ddf, num_classes, per_class=True)
    before = float(mean_foreground_dice(moving_labels, fixed_labels, num_classes))
    return {"dice_before": before, "dice_after": after["reg_dice"],
            "dice_per_class_after": after["reg_dice_per_class"][0].tolist(),
            "folding_pct": after["folding_pct"], "std_log_det": after["std_log_det"]}


def _register_native(ddf: Tensor, det: Tensor, moving: Volume, fixed: Volume, device: torch.device):
    """(warped image, warped labels or None, world DDF in mm [D, H, W, 3], det) on the fixed file's grid, for the
    model-grid displacement ``ddf`` [3, D, H, W] and its Jacobian determinant ``det`` [1, D, H, W]. Each fixed voxel
    x goes to the model grid (p), is displaced there (p + u(p)), and goes to the moving file's grid."""
    shape = fixed.native_image.shape
    fixed_to_model = voxel_map(fixed.native_affine, fixed.affine)
    model_to_moving = voxel_map(moving.affine, moving.native_affine)
    fixed_world, moving_world = (torch.from_numpy(np.asarray(a, np.float64)) for a in (fixed.native_affine,
                                                                                      moving.affine))
    image = torch.from_numpy(moving.native_image)[None].to(device)
    # Label values as float64 sample exactly (any int up to 2^53); nearest never mixes two of them.
    label = (None if moving.native_label is None
             else torch.from_numpy(moving.native_label.astype(np.float64))[None].to(device))
    warped = np.empty(shape, np.float32)
    labels = None if label is None else np.empty(shape, np.int64)
    world = np.empty((*shape, 3), np.float32)
    det_out = np.empty(shape, np.float32)
    ddf = ddf.double()
    for rows in slabs(shape, channels=4):
        x = slab_points(shape, rows, device)
        p = apply_affine(fixed_to_model, x)
        displaced = p + sample(ddf, p, "bilinear", "border").movedim(0, -1)
        q = apply_affine(model_to_moving, displaced)
        warped[rows] = sample(image, q, "bilinear", "zeros")[0].cpu().numpy()
        if label is not None:
            labels[rows] = sample(label, q, "nearest", "zeros")[0].round().long().cpu().numpy()
        world[rows] = (apply_affine(moving_world, displaced) - apply_affine(fixed_world, x)).cpu().numpy()
        det_out[rows] = sample(det, p, "bilinear", "border")[0].cpu().numpy()
    return warped, labels, world, det_out


def segment_file(model_path: str | Path, image: Path, output: Path, device: str = "cpu",
                 space: str = "native") -> dict[str, Path]:
    """Segment ``image`` with a trained F_S and write the label map (in the original label values when the model
    was trained with a label_map) to ``output``. ``space='native'`` (default): on the image file's own grid and
    affine, the class probabilities resampled trilinearly to each voxel, then the most probable class;
    ``space='model'``: on the preprocessed grid the network ran on."""
    _check_space(space)
    _check_output(Path(output), "segment", folder=False)
    model = load_model(model_path, device)
    _require_trained(model, "segmentation", model_path)
    _segment(model, Path(image), Path(output), space)
    return {"segmentation": Path(output)}


def segment_files(model_path: str | Path, images: list[Path], output: Path, device: str = "cpu",
                  space: str = "native", progress: bool = False) -> dict[str, Path]:
    """:func:`segment_file` for each of ``images``, loading the model once. ``output`` is a .nii / .nii.gz file
    for a single image (the result is ``{"segmentation": output}``), otherwise a folder that receives
    ``<image name>_seg.nii.gz`` per image (the result maps each image to its label map)."""
    from .data.nifti import strip_nifti_suffix
    _check_space(space)
    images, output = [Path(i) for i in images], Path(output)
    if not images:
        raise ValueError("segment: no image given")
    if strip_nifti_suffix(output.name) is not None:
        if len(images) > 1:
            raise ValueError(f"segment: --output {output} is a file name; with {len(images)} images give a folder")
        return segment_file(model_path, images[0], output, device, space)
    _check_output(output, "segment", folder=True)
    targets: dict[Path, Path] = {}
    for image in images:
        target = output / f"{strip_nifti_suffix(image.name) or image.stem}_seg.nii.gz"
        clash = next((other for other, t in targets.items() if t == target), None)
        if clash is not None:
            raise ValueError(f"segment: {clash} and {image} would both be written to {target}; rename one")
        targets[image] = target
    model = load_model(model_path, device)
    _require_trained(model, "segmentation", model_path)
    from tqdm import tqdm
    for image, target in tqdm(targets.items(), desc="segment", unit="image", disable=not progress):
        _segment(model, image, target, space)
    return {str(image): target for image, target in targets.items()}


def _segment(model: LoadedModel, image: Path, output: Path, space: str) -> None:
    from .data import save_nifti
    preprocess = preprocess_of(model.config)
    volume = _read(image, preprocess)
    with torch.no_grad():
        logits = model.seg_net(torch.from_numpy(np.ascontiguousarray(volume.image))[None, None].to(model.device))
        if space == "model":
            classes, affine, like = logits.argmax(1)[0].cpu().numpy(), volume.affine, None
        else:
            classes = _segment_native(logits[0].float().softmax(0), volume)
            affine, like = volume.native_affine, volume.native_header
    save_nifti(output, _original_labels(classes, preprocess), affine, like)


def _segment_native(probabilities: Tensor, volume: Volume) -> np.ndarray:
    """The most probable class [D', H', W'] at each voxel of the file's grid, from model-grid ``probabilities``
    [K, D, H, W] sampled trilinearly (border: the file's outer voxel centres may lie up to half a model voxel
    outside the model grid). Voxels further outside (preprocessing cropped them away) are class 0."""
    shape = volume.native_image.shape
    to_model = voxel_map(volume.native_affine, volume.affine)
    extent = torch.tensor(probabilities.shape[1:], dtype=torch.float64, device=probabilities.device) - 0.5
    classes = np.empty(shape, np.int64)
    for rows in slabs(shape, channels=probabilities.shape[0]):
        points = apply_affine(to_model, slab_points(shape, rows, probabilities.device))
        covered = ((points >= -0.5 - 1e-6) & (points <= extent + 1e-6)).all(-1)
        best = sample(probabilities, points, "bilinear", "border").argmax(0)
        classes[rows] = torch.where(covered, best, 0).cpu().numpy()
    return classes


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
