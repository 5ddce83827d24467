"""The training schedule: which network trains at each global step, as a flat list of phases.

DeepAtlas (one-shot / semi-supervised), ``method='joint'``::

    reg_pretrain   F_R unsupervised (L_i + λ_r L_r)                     reg_pretrain_steps
    seg_pretrain   F_S supervised on the labelled images (L_sp)         seg_pretrain_steps
    semi_da        F_R frozen, F_S with the joint loss ("Semi-DA")      semi_steps
    da             alternate: reg_per_seg registration steps (F_S frozen, anatomy loss on), then one
                   segmentation step (F_R frozen)  ("DA")               joint_rounds * (reg_per_seg + 1)

The baselines get the same number of steps for the network they train, so the comparison is like for like:
``reg_only`` (F_R unsupervised), ``reg_anatomy`` (F_R + anatomy loss from manual labels only, i.e. on pairs whose
two images are both labelled) and ``seg_only`` (F_S supervised).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig

REG, SEG_SUPERVISED, SEG_JOINT = "reg", "seg_sup", "seg"


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    alternate: bool = False     # the "da" phase: reg_per_seg REG steps, then one SEG_JOINT step
    kind: str = REG             # the step kind of a phase that does not alternate


def phases(config: TrainConfig) -> list[Phase]:
    joint_reg_steps = config.joint_rounds * config.reg_per_seg
    if config.method == "joint":
        return [Phase("reg_pretrain", config.reg_pretrain_steps, kind=REG),
                Phase("seg_pretrain", config.seg_pretrain_steps, kind=SEG_SUPERVISED),
                Phase("semi_da", config.semi_steps, kind=SEG_JOINT),
                Phase("da", config.joint_rounds * (config.reg_per_seg + 1), alternate=True)]
    if config.method in ("reg_only", "reg_anatomy"):
        return [Phase("reg_train", config.reg_pretrain_steps + joint_reg_steps, kind=REG)]
    return [Phase("seg_train", config.seg_pretrain_steps + config.semi_steps + config.joint_rounds,
                  kind=SEG_SUPERVISED)]


def total_steps(config: TrainConfig) -> int:
    return sum(phase.steps for phase in phases(config))


def step_at(config: TrainConfig, step: int) -> tuple[Phase, str]:
    """The phase and step kind of global step ``step`` (0-based)."""
    start = 0
    for phase in phases(config):
        if step < start + phase.steps:
            if not phase.alternate:
                return phase, phase.kind
            position = (step - start) % (config.reg_per_seg + 1)
            return phase, REG if position < config.reg_per_seg else SEG_JOINT
        start += phase.steps
    raise IndexError(f"step {step} is past the end of the schedule ({start} steps)")


def anatomy_mode(config: TrainConfig, phase: Phase) -> str:
    """How a registration step in ``phase`` uses labels: "none" (unsupervised), "manual" (only pairs whose two
    images carry manual labels) or "joint" (missing labels replaced by F_S's prediction)."""
    if config.method == "reg_anatomy":
        return "manual"
    if config.method == "joint" and phase.name == "da":
        return "joint"
    return "none"
