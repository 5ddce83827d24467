"""Probe: how much can labels add to registration on the synthetic data, and how much of it do networks learn?

`pairs`: for each ordered pair of the test subjects (the same 12 pairs `deepatlas compare` evaluates), optimise a
dense displacement directly with Adam (no network, so no generalisation and no training budget in the way) for
  image          L_i + lambda_r L_r                  (what reg_only trains F_R on),
  image+labels   L_i + lambda_r L_r + lambda_a L_a   (L_a on the pair's manual labels: what labels add),
  labels         lambda_r L_r + L_a                  (labels alone),
with the default preset's losses and weights, and print the mean registration Dice of each (and "before").

`models`: registration Dice of trained models on 12 pairs of their own training subjects (the first four) next to
the test pairs: whether a network fits, on the pairs it was trained on, what direct optimisation reaches; and how
well F_R segments the test images by warping the one-shot atlas onto them (what F_S competes with in joint training).

A probe, not part of the package: docs/results.md ("How much room") has what it gave.

    OMP_NUM_THREADS=1 PYTHONPATH=python .venv/bin/python scripts/registration_room_probe.py pairs --seed 0
    OMP_NUM_THREADS=1 PYTHONPATH=python .venv/bin/python scripts/registration_room_probe.py models RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import deepatlas_cuda as da
from deepatlas.demo import demo_config
from deepatlas.evaluate import evaluate_registration, test_pairs
from deepatlas.inference import load_model
from deepatlas.losses import anatomy_loss, diffusion_loss, similarity_loss
from deepatlas.metrics import mean_foreground_dice, registration_metrics
from deepatlas.run import prepare_data


def objectives(config) -> dict[str, tuple[float, float]]:
    """Name -> (image weight, anatomy weight); the regulariser always has weight ``config.lambda_r``."""
    return {"image": (1.0, 0.0), "image+labels": (1.0, config.lambda_a), "labels": (0.0, 1.0)}


def optimise(moving, fixed, moving_labels, fixed_labels, config, num_classes: int, image_weight: float,
             anatomy_weight: float, iterations: int, lr: float) -> torch.Tensor:
    """A displacement [1, 3, D, H, W] minimising the objective, from zero."""
    similarity = similarity_loss(config.similarity, window=config.lncc_window)
    ddf = torch.zeros(1, 3, *moving.shape[2:], requires_grad=True)
    optimiser = torch.optim.Adam([ddf], lr=lr)
    for _ in range(iterations):
        optimiser.zero_grad()
        loss = config.lambda_r * diffusion_loss(ddf)
        if image_weight:
            loss = loss + image_weight * similarity(da.warp(moving, ddf), fixed)
        if anatomy_weight:
            loss = loss + anatomy_weight * anatomy_loss(moving_labels, ddf, fixed_labels, num_classes)
        loss.backward()
        optimiser.step()
    return ddf.detach()


def probe_pairs(args) -> None:
    config = replace(demo_config("unused", args.preset, seed=args.seed), grain=args.grain)
    config = config if args.num_train is None else replace(config, num_train=args.num_train)
    dataset = prepare_data(config)
    images, labels, k = dataset.test_images, dataset.test_labels, dataset.num_classes
    weights = objectives(config)
    dice = {"before": []} | {name: [] for name in weights}
    folding = {name: [] for name in weights}
    for m, f in test_pairs(images.shape[0], config.eval_pairs):
        dice["before"].append(float(mean_foreground_dice(labels[m, 0], labels[f, 0], k)))
        for name, (image_weight, anatomy_weight) in weights.items():
            ddf = optimise(images[m:m + 1], images[f:f + 1], labels[m:m + 1], labels[f:f + 1], config, k,
                           image_weight, anatomy_weight, args.iterations, args.lr)
            row = registration_metrics(labels[m:m + 1], labels[f:f + 1], ddf, k)
            dice[name].append(row["reg_dice"])
            folding[name].append(row["folding_pct"])
    print(f"seed {args.seed}, grain {args.grain}, {args.iterations} Adam steps (lr {args.lr}), "
          f"{len(dice['before'])} test pairs. reg Dice: " + ", ".join(f"{n} {mean(v):.3f}" for n, v in dice.items())
          + "; % folding: " + ", ".join(f"{n} {mean(v):.3f}" for n, v in folding.items()), flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def probe_models(args) -> None:
    for run in args.runs:
        model = load_model(run)
        dataset = prepare_data(model.config)
        train = dataset.train_subjects[:4]
        images = torch.stack([torch.from_numpy(s.image)[None] for s in train]).float()
        labels = torch.stack([torch.from_numpy(s.label)[None] for s in train]).long()
        on_train = evaluate_registration(model.reg_net, images, labels, model.num_classes)["reg_dice"]
        on_test = evaluate_registration(model.reg_net, dataset.test_images, dataset.test_labels,
                                        model.num_classes)["reg_dice"]
        print(f"{run}: reg Dice on training pairs {on_train:.3f}, on test pairs {on_test:.3f}, atlas "
              f"segmentation Dice on test images {atlas_segmentation_dice(model, dataset):.3f}", flush=True)


@torch.no_grad()
def atlas_segmentation_dice(model, dataset) -> float:
    """Mean foreground Dice of segmenting each test image by registration: the first training subject (the
    one-shot setting's labelled image, the atlas) warped onto it by F_R, its labels through the nearest warp."""
    atlas = dataset.train_subjects[0]
    test_count = dataset.test_images.shape[0]
    atlas_image = torch.from_numpy(atlas.image)[None, None].float().expand(test_count, -1, -1, -1, -1)
    ddf = model.reg_net(atlas_image, dataset.test_images)
    atlas_labels = torch.from_numpy(atlas.label)[None, None].long()
    return float(registration_metrics(atlas_labels, dataset.test_labels, ddf, model.num_classes)["reg_dice"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pairs = commands.add_parser("pairs", help="direct optimisation on the test pairs")
    pairs.add_argument("--seed", type=int, default=0, help="data seed, as `compare --seeds`")
    pairs.add_argument("--preset", default="default")
    pairs.add_argument("--grain", type=float, default=0.0)
    pairs.add_argument("--num-train", type=int, help="as `compare --num-train` (it moves the test subjects)")
    pairs.add_argument("--iterations", type=int, default=300)
    pairs.add_argument("--lr", type=float, default=0.05)
    models = commands.add_parser("models", help="trained models on training and test pairs")
    models.add_argument("runs", nargs="+", help="run folders (each holding a model.pt)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    probe_pairs(args) if args.command == "pairs" else probe_models(args)


if __name__ == "__main__":
    main()
