"""Tiny DeepAtlas configurations and data for the training, resume, DDP and CLI tests (16^3 volumes, narrow
networks: a step takes tens of milliseconds on a 2-core CPU)."""

import dataclasses

import torch

from deepatlas.config import TrainConfig
from deepatlas.data import stack_subjects, synthetic_subjects
from deepatlas.pairs import Volumes

TINY = dict(shape=(16, 16, 16), num_train=4, num_test=2, num_classes=4, reg_enc=(4, 8, 8, 8, 8),
            reg_dec=(8, 8, 8, 8, 4, 4), seg_channels=(4, 8, 8, 8), reg_pretrain_steps=6, seg_pretrain_steps=4,
            semi_steps=3, joint_rounds=2, reg_per_seg=3, log_every=2, checkpoint_every=5, eval_pairs=2)


def tiny_config(output, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(output), **overrides})


def tiny_volumes(config: TrainConfig, labelled: int = 1) -> Volumes:
    """Synthetic training volumes of ``config``'s shape with the first ``labelled`` label maps kept."""
    subjects = synthetic_subjects(config.num_train, shape=config.shape, num_classes=config.num_classes,
                                  seed=config.data_seed)
    images, labels, _ = stack_subjects(subjects)
    keep = torch.arange(len(subjects)) < labelled
    labels = torch.where(keep.view(-1, 1, 1, 1, 1), labels, torch.zeros_like(labels))
    return Volumes(images, labels, keep)


def state_of(trainer):
    """Every number a resumed run must reproduce: both networks (incl. normalisation buffers) and optimisers."""
    return {"reg": trainer.reg_module.state_dict(), "seg": trainer.seg_module.state_dict(),
            "reg_opt": trainer.reg_opt.state_dict()["state"], "seg_opt": trainer.seg_opt.state_dict()["state"]}


def replace(config: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(config, **changes)
