"""The flip augmentation with left / right structures: `flip_label_pairs` swaps paired labels when an image is
mirrored (validated in the config, mapped through label_map), and training on files warns when a one-sided
structure would be flipped without a partner."""

import logging

import numpy as np
import pytest
import torch

from deepatlas.config import TrainConfig
from deepatlas.data import Subject, lateralised_classes, save_nifti
from deepatlas.pairs import Volumes, make_batch, mirrored_classes
from deepatlas.run import prepare_data


def sided_labels(shape=(12, 10, 8)):
    """Along axis 0: class 1 on the low side, class 2 on the high side, class 3 across the middle (and at the low
    edge of axis 1)."""
    label = np.zeros(shape, np.int64)
    label[1:5, 2:8, 2:6] = 1
    label[7:11, 2:8, 2:6] = 2
    label[4:8, 0:2, :] = 3
    return label


@pytest.mark.parametrize("pairs, message", [
    ([[1, 1]], "two different labels"), ([[1, 2], [2, 3]], r"label\(s\) \[2\] in more than one pair"),
    ([[1]], "left, right"), ([[1.5, 2]], "whole numbers"), ([[-1, 2]], ">= 0"), ({"1": 2}, "left, right")])
def test_config_rejects_malformed_pairs(pairs, message):
    with pytest.raises(ValueError, match=f"config.flip_label_pairs.*{message}"):
        TrainConfig(flip_label_pairs=pairs)


def test_config_pairs_round_trip_and_flag():
    from deepatlas.cli import build_parser, config_from_args
    config = TrainConfig(flip_label_pairs=[(17, 53), [2, 41]])
    assert config.flip_label_pairs == [[17, 53], [2, 41]]
    assert TrainConfig.from_dict(config.to_dict()).flip_label_pairs == [[17, 53], [2, 41]]
    args = build_parser().parse_args(["train", "--flip-label-pairs", "[[1, 2]]"])
    assert config_from_args(args).flip_label_pairs == [[1, 2]]


def test_mirrored_classes_swaps_pairs_through_the_label_map():
    assert mirrored_classes([], 5) is None
    assert mirrored_classes([[1, 3]], 5).tolist() == [0, 3, 2, 1, 4]
    label_map = {0: 0, 17: 1, 53: 2, 2: 3, 41: 4, 10: 5, 49: 5}
    # 10 / 49 merged into class 5 by the map: that pair leaves the class as it is
    assert mirrored_classes([[17, 53], [41, 2], [10, 49]], 6, label_map).tolist() == [0, 2, 1, 4, 3, 5]
    with pytest.raises(ValueError, match=r"\[17, 99\]: label\(s\) \[99\] are not in label_map"):
        mirrored_classes([[17, 99]], 6, label_map)
    with pytest.raises(ValueError, match=r"\[1, 7\]: the data has 5 classes"):
        mirrored_classes([[1, 7]], 5)
    with pytest.raises(ValueError, match="already in another pair"):
        mirrored_classes([[17, 53], [10, 2]], 6, {17: 1, 53: 2, 10: 2, 2: 3})


def test_a_flipped_label_map_trades_its_paired_classes():
    label = torch.from_numpy(sided_labels())[None]                      # [1, D, H, W]
    volumes = Volumes(torch.rand(2, 1, *label.shape[1:]), torch.stack([label, label]), torch.ones(2, dtype=torch.bool))
    mirror = mirrored_classes([[1, 2]], 4)
    batch = make_batch(volumes, torch.tensor([[0, 1], [1, 0]]), torch.tensor([True, False]), 0, mirror)
    flipped = label.flip(1)
    np.testing.assert_array_equal(batch.moving_labels[0], torch.where(flipped == 1, 2, torch.where(flipped == 2, 1,
                                                                                                   flipped)))
    np.testing.assert_array_equal(batch.fixed_labels[0], batch.moving_labels[0])
    # after the flip and the swap, class 1 is on the low side again, class 2 on the high side
    np.testing.assert_array_equal(batch.moving_labels[0] == 1, label == 1)
    np.testing.assert_array_equal(batch.moving_labels[1], label)         # not flipped: unchanged
    np.testing.assert_array_equal(batch.moving[0], volumes.images[0].flip(1))  # images are never relabelled


def subject(label, axis=0):
    label = np.ascontiguousarray(np.moveaxis(label, 0, axis))
    return Subject("s", np.zeros(label.shape, np.float32), label, np.eye(4), "train", None)


@pytest.mark.parametrize("axis", [0, 2])
def test_lateralised_classes_are_the_one_sided_ones(axis):
    label = sided_labels((12, 10, 12))
    assert lateralised_classes([subject(label, axis)], axis) == [1, 2]
    assert lateralised_classes([subject(label, axis)], (axis + 1) % 3) == [3]  # class 3 is one-sided there
    unlabelled = Subject("u", np.zeros(label.shape, np.float32), None, np.eye(4), "train", None)
    assert lateralised_classes([unlabelled], 0) == []


def write_folder(root, count=3):
    for index in range(count):
        label = sided_labels()
        label[label == 2] = 53
        label[label == 1] = 17
        image = np.random.default_rng(index).uniform(0, 1, label.shape).astype(np.float32)
        save_nifti(root / "images" / f"s{index}.nii.gz", image, np.eye(4))
        save_nifti(root / "labels" / f"s{index}.nii.gz", label, np.eye(4))


@pytest.mark.parametrize("pairs, flip, warned", [([], True, True), ([[17, 53]], True, False), ([], False, False)])
def test_training_on_files_warns_about_unpaired_one_sided_labels(tmp_path, caplog, pairs, flip, warned):
    write_folder(tmp_path / "data")
    config = TrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "run"), flip=flip, num_workers=0,
                         flip_label_pairs=pairs, preprocess={"label_map": {0: 0, 17: 1, 53: 2, 3: 3}})
    with caplog.at_level(logging.WARNING, logger="deepatlas"):
        prepare_data(config)
    messages = [r.getMessage() for r in caplog.records if "flip" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert messages[0].startswith("flip: label(s) 17, 53 lie almost only") and "flip_label_pairs" in messages[0]
