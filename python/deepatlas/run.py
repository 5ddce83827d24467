"""From a config to results: load the data, train one method (or all of them side by side), evaluate."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .checkpoint import atomic_write
from .config import TrainConfig
from .evaluate import evaluate_registration, evaluate_segmentation
from .pairs import Volumes
from .trainer import VALIDATION, Trainer

log = logging.getLogger("deepatlas")

TRAINS_REGISTRATION = ("joint", "reg_only", "reg_anatomy")
TRAINS_SEGMENTATION = ("joint", "seg_only")


@dataclass
class Dataset:
    """Training volumes (with the labels the method may use), labelled test volumes, and what describes them."""
    train: Volumes
    test_images: Tensor     # [T, 1, D, H, W] float32
    test_labels: Tensor     # [T, 1, D, H, W] int64
    num_classes: int
    lr_axis: int
    train_subjects: list
    test_subjects: list
    val_images: Tensor | None = None   # [V, 1, D, H, W]: labelled split-"val" images, scored at every checkpoint
    val_labels: Tensor | None = None


def prepare_data(config: TrainConfig) -> Dataset:
    """The data ``config.data`` names, split into train / test, with only ``config.num_labelled`` training label
    maps kept (-1: all that exist)."""
    from . import data

    if not config.reads_files:
        subjects = data.synthetic_subjects(config.num_train + config.num_test, shape=config.shape,
                                           num_classes=config.num_classes, seed=config.data_seed, base=config.data,
                                           grain=config.grain)
        train, test = subjects[:config.num_train], subjects[config.num_train:]
        val = []
    else:
        subjects = data.load_dataset(config.data, preprocess=preprocess_of(config),
                                     cache_dir=Path(config.output) / "data_cache", num_workers=config.num_workers)
        train = [s for s in subjects if s.split == "train"]
        test = [s for s in subjects if s.split == "test" and s.label is not None]
        val = [s for s in subjects if s.split == "val" and s.label is not None]
    if len(train) < 2:
        raise ValueError(f"{config.data}: training needs at least 2 images (split 'train'), got {len(train)}")
    num_classes = data.num_classes_of(subjects)
    if config.data == "synthetic":
        num_classes = max(num_classes, config.num_classes)
    images, labels, labelled = data.stack_subjects(train)
    if config.num_labelled > int(labelled.sum()):
        log.warning("num_labelled is %d but only %d training image(s) have a label map: using those",
                    config.num_labelled, int(labelled.sum()))
    labelled = _keep_first(labelled, config.num_labelled)
    labels = torch.where(labelled.view(-1, 1, 1, 1, 1), labels, torch.zeros_like(labels))
    if test:
        test_images, test_labels, _ = data.stack_subjects(test)
    else:
        test_images = images.new_empty((0, *images.shape[1:]))
        test_labels = labels.new_empty((0, *labels.shape[1:]))
    lr_axis = data.left_right_axis(train) if config.flip else 0  # 0: unused without flips
    if config.flip and config.reads_files:
        _warn_unpaired_sides(config, train, lr_axis, num_classes)
    val_images, val_labels = data.stack_subjects(val)[:2] if val else (None, None)
    return Dataset(Volumes(images, labels, labelled), test_images, test_labels, num_classes, lr_axis, train, test,
                   val_images, val_labels)


def preprocess_of(config: TrainConfig):
    """``config.preprocess`` as a :class:`deepatlas.data.Preprocess` (unset fields keep their defaults: RAS,
    percentile normalisation, padding to a multiple of 16). Used for the training data and at inference."""
    from .data import Preprocess
    return Preprocess.from_dict(config.preprocess)


def _warn_unpaired_sides(config: TrainConfig, train: list, lr_axis: int, num_classes: int) -> None:
    """Warn when the flip augmentation would move a one-sided structure (a left or right one) to the other side
    under the same label: its class is lateralised in the training labels and in no ``flip_label_pairs`` pair."""
    from . import data
    from .pairs import mirrored_classes
    mirror = mirrored_classes(config.flip_label_pairs, num_classes, config.file_label_map)
    unpaired = [k for k in data.lateralised_classes(train, lr_axis) if mirror is None or mirror[k] == k]
    if not unpaired:
        return
    label_map = config.file_label_map
    values = [sorted(v for v, k in label_map.items() if k == c) if label_map else [c] for c in unpaired]
    shown = ", ".join("/".join(str(v) for v in group) for group in values)
    log.warning("flip: label(s) %s lie almost only (>= 95%%) on one side of the anatomy; a left-right flip moves "
                "them to the other side under the same label. List each left/right pair in flip_label_pairs "
                "(e.g. [[17, 53]]: label values as in the files), or set flip: false", shown)


def _keep_first(labelled: Tensor, count: int) -> Tensor:
    if count < 0:
        return labelled
    keep = labelled.clone()
    keep[labelled.cumsum(0) > count] = False
    return keep


def _validation(config: TrainConfig, dataset: Dataset) -> Callable[[Trainer], dict[str, float]] | None:
    """The scores of the networks being trained on the validation images (None without any): registration Dice
    and % folding over up to ``eval_pairs`` pairs, segmentation Dice, as the test evaluation computes them."""
    if dataset.val_images is None:
        return None

    def validate(trainer: Trainer) -> dict[str, float]:
        images, labels = dataset.val_images.to(trainer.device), dataset.val_labels.to(trainer.device)
        row = {}
        if config.method in TRAINS_REGISTRATION and images.shape[0] >= 2:
            scores = evaluate_registration(trainer.reg_module, images, labels, dataset.num_classes,
                                           config.eval_pairs)
            row.update(val_reg_dice=scores["reg_dice"], val_folding_pct=scores["folding_pct"])
        if config.method in TRAINS_SEGMENTATION:
            row["val_seg_dice"] = evaluate_segmentation(trainer.seg_module, images, labels,
                                                        dataset.num_classes)["seg_dice"]
        return row
    return validate


def run_method(config: TrainConfig, dataset: Dataset, output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train ``config.method`` into ``output`` (resuming from its checkpoint if there is one), evaluate on the
    test set and write ``results.json``. Returns the results row."""
    output = Path(output)
    trainer = Trainer(config, dataset.train, dataset.num_classes, output=output, lr_axis=dataset.lr_axis,
                      progress=progress, validation=_validation(config, dataset))
    if trainer.resume():
        log.info("%s: resuming at step %d", config.method, trainer.step)
    trainer.fit()
    trainer.export_model()
    result = {"method": config.method, "reg_dice": None, "seg_dice": None, "folding_pct": None,
              "std_log_det": None}
    device = trainer.device
    images, labels = dataset.test_images.to(device), dataset.test_labels.to(device)
    if images.shape[0] >= 2 and config.method in TRAINS_REGISTRATION:
        result.update(evaluate_registration(trainer.reg_module, images, labels, dataset.num_classes,
                                            config.eval_pairs))
    if images.shape[0] >= 1 and config.method in TRAINS_SEGMENTATION:
        result.update(evaluate_segmentation(trainer.seg_module, images, labels, dataset.num_classes))
    rows = [row for row in trainer.metrics if row["kind"] != VALIDATION]
    result["seconds"] = sum(row["seconds"] * row["steps"] for row in rows)
    result["peak_mem_mb"] = max((row["peak_mem_mb"] for row in rows), default=0.0)
    result["steps"] = trainer.step
    if trainer.is_main:
        atomic_write(output / "results.json", lambda h: h.write(json.dumps(result, indent=1).encode()))
    return result


def compare(config: TrainConfig, methods: tuple[str, ...] = ("reg_only", "seg_only", "joint"),
            dataset: Dataset | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate each method on the same data and seed, each in ``config.output/<method>``."""
    dataset = dataset if dataset is not None else prepare_data(config)
    results = []
    for method in methods:
        start = time.perf_counter()
        method_config = dataclasses.replace(config, method=method)
        log.info("training %s", method)
        result = run_method(method_config, dataset, Path(config.output) / method, progress=progress)
        log.info("%s done in %.0f s", method, time.perf_counter() - start)
        results.append(result)
    return results


def compare_seeds(config: TrainConfig, methods: tuple[str, ...], seeds: list[int], progress: bool = True
                  ) -> list[dict[str, Any]]:
    """:func:`compare` once per seed (the training seed and the data seed both set to it: new subjects, new
    initialisation), each in ``config.output/seed<s>``. Returns every results row with its ``seed``. One-shot
    scores move by a few Dice points from seed to seed, more than the differences between methods often are."""
    rows = []
    for seed in seeds:
        seed_config = dataclasses.replace(config, seed=seed, data_seed=seed,
                                          output=str(Path(config.output) / f"seed{seed}"))
        rows.extend({**row, "seed": seed} for row in compare(seed_config, methods, progress=progress))
    return rows


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the mean and sample standard deviation over seeds of reg Dice and seg Dice (None where the
    method has no such score), and the number of seeds."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        entry: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for key in ("reg_dice", "seg_dice"):
            values = torch.tensor([row[key] for row in mine if row[key] is not None], dtype=torch.float64)
            entry[f"{key}_mean"] = values.mean().item() if len(values) else None
            entry[f"{key}_sd"] = values.std().item() if len(values) > 1 else None
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict[str, Any]], method: str = "joint") -> list[dict[str, Any]]:
    """``method`` minus each other method, per score (reg Dice, seg Dice) that both have, seed by seed: a paired
    comparison (the same subjects and initialisation on each seed), so the seed-to-seed spread that both share drops
    out. Per pair: the seeds, the differences, their mean and sample sd, the paired t statistic
    (mean / (sd / sqrt(n)), n - 1 degrees of freedom; None below 2 seeds or when sd is 0), its two-sided p-value
    (Student's t; None with t) and on how many seeds ``method`` is ahead. A seed where either score is missing is
    left out."""
    from scipy.stats import t as student_t
    methods = list(dict.fromkeys(row["method"] for row in rows))
    pairs = []
    for key in ("reg_dice", "seg_dice"):
        def scores(name: str) -> dict[int, float]:
            return {row["seed"]: row[key] for row in rows
                    if row["method"] == name and row[key] is not None and row[key] == row[key]}
        mine = scores(method)
        for baseline in (name for name in methods if name != method):
            theirs = scores(baseline)
            seeds = [seed for seed in mine if seed in theirs]
            if not seeds:
                continue
            differences = torch.tensor([mine[seed] - theirs[seed] for seed in seeds], dtype=torch.float64)
            mean = differences.mean().item()
            sd = differences.std().item() if len(seeds) > 1 else None
            t = mean / (sd / len(seeds) ** 0.5) if sd else None
            p = float(2 * student_t.sf(abs(t), len(seeds) - 1)) if t is not None else None
            pairs.append({"score": key, "method": method, "baseline": baseline, "seeds": seeds,
                          "differences": differences.tolist(), "mean": mean, "sd": sd, "t": t, "p": p,
                          "ahead": int((differences > 0).sum())})
    return pairs


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of a multi-seed comparison: each seed's score and the mean ± sd per method."""
    seeds = list(dict.fromkeys(row["seed"] for row in rows))

    def cell(method: str, key: str, seed: int) -> str:
        value = next(row[key] for row in rows if row["method"] == method and row["seed"] == seed)
        return "—" if value is None else f"{value:.3f}"

    def spread(entry: dict[str, Any], key: str) -> str:
        mean, sd = entry[f"{key}_mean"], entry[f"{key}_sd"]
        return "—" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")

    seed_names = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| method | reg Dice: {seed_names} | mean ± sd | seg Dice: {seed_names} | mean ± sd |",
             "|---|" + "---:|" * (2 * len(seeds) + 2)]
    for entry in seed_summary(rows):
        method = entry["method"]
        reg = " | ".join(cell(method, "reg_dice", s) for s in seeds)
        seg = " | ".join(cell(method, "seg_dice", s) for s in seeds)
        lines.append(f"| {method} | {reg} | {spread(entry, 'reg_dice')} | {seg} | {spread(entry, 'seg_dice')} |")
    for pair in paired_differences(rows):
        score = "reg Dice" if pair["score"] == "reg_dice" else "seg Dice"
        per_seed = " / ".join(f"{d:+.3f}" for d in pair["differences"])
        n = len(pair["seeds"])
        spread_t = "" if pair["t"] is None else \
            f" ± {pair['sd']:.3f}, paired t {pair['t']:.2f} ({n - 1} df, two-sided p {pair['p']:.3f})"
        lines.append(f"\n{pair['method']} minus {pair['baseline']}, {score}: {per_seed}; mean {pair['mean']:+.3f}"
                     f"{spread_t}; ahead on {pair['ahead']} of {n} seeds")
    return "\n".join(lines)


def results_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the comparison (one row per method)."""
    def show(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"
    lines = ["| method | reg Dice | seg Dice | % folding | time (s) | peak memory (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {show(r['reg_dice'])} | {show(r['seg_dice'])} | "
                     f"{show(r['folding_pct'], 3)} | {show(r['seconds'], 0)} | {show(r['peak_mem_mb'], 0)} |")
    before = next((r["reg_dice_before"] for r in results if r.get("reg_dice_before") is not None), None)
    if before is not None:
        lines.append(f"\nDice of the test pairs before registration: {before:.3f}")
    return "\n".join(lines)
