"""The run configuration: one flat dataclass, loadable from YAML / JSON, every field also a command-line flag.

Defaults are the one-shot DeepAtlas setting on the embedded synthetic data, sized for a 2-core CPU; docs/model.md
lists every field with its meaning and says where a default departs from the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import DictRecord

METHODS = ("joint", "reg_only", "reg_anatomy", "seg_only")
ANATOMY_PREDICTIONS = ("soft", "hard", "weighted")
SIMILARITIES = ("ncc", "lncc", "mse")
REGULARISERS = ("diffusion", "bending")
NORMS = ("batch", "instance")
AMP_MODES = ("none", "bf16", "fp16")
EMBEDDED_DATA = ("synthetic", "mni")


@dataclass
class TrainConfig(DictRecord):
    # ---- data
    data: str = "synthetic"            # "synthetic", "mni", a folder (images/, labels/) or a .csv / .json manifest
    num_train: int = 12                # synthetic / mni: training subjects to generate
    num_test: int = 4                  # synthetic / mni: held-out (labelled) test subjects
    shape: tuple[int, int, int] = (64, 64, 64)  # synthetic / mni volume shape (each divisible by 16)
    num_classes: int = 8               # synthetic: structures incl. background (mni: fixed at 4; files: from labels)
    grain: float = 0.0                 # synthetic: texture (noise std) in one structure of each look-alike pair
    num_labelled: int = 1              # training images whose manual labels are used (1 = one-shot, -1 = all)
    data_seed: int = 0
    flip: bool = True                  # random left-right flips of both images of a pair (augmentation)
    flip_label_pairs: list = field(default_factory=list)  # [[left, right], ...]: labels a flip swaps (file values)
    preprocess: dict[str, Any] = field(default_factory=dict)  # files: deepatlas.data.Preprocess fields ({} = defaults)
    num_workers: int = 2               # files: loader workers; preprocessed volumes cached in output/data_cache
    # ---- networks
    reg_enc: tuple[int, ...] = (16, 32, 32, 32, 32)
    reg_dec: tuple[int, ...] = (32, 32, 32, 32, 16, 16)
    svf: bool = False                  # stationary velocity field + scaling and squaring (diffeomorphic)
    integration_steps: int = 7
    seg_channels: tuple[int, ...] = (8, 16, 32, 64)
    seg_norm: str = "batch"
    # ---- losses
    similarity: str = "ncc"            # the paper's global NCC; "lncc" (window lncc_window) or "mse"
    lncc_window: int = 9
    regulariser: str = "diffusion"
    lambda_r: float = 1.0              # weight of the regulariser
    lambda_a: float = 1.0              # weight of the anatomy (warped-Dice) loss
    lambda_a_reg: float | None = None  # its weight in registration steps only (None: lambda_a)
    anatomy_prediction: str = "soft"   # registration step, unlabelled image: F_S's "soft" probabilities, "hard"
                                       # argmax, or "weighted" (soft, each voxel weighted by F_S's confidence)
    anatomy_min_manual: int = 0        # registration step: anatomy term only on pairs with >= this many manual labels
    lambda_sp: float = 1.0             # weight of the supervised segmentation loss
    lambda_fold: float = 0.0           # weight of the folding penalty mean(relu(-det J)); 0 = off
    ce_weight: float = 0.0             # cross-entropy added to the supervised Dice loss
    # ---- schedule
    method: str = "joint"              # joint (DeepAtlas) | reg_only | reg_anatomy | seg_only
    reg_pretrain_steps: int = 300      # F_R unsupervised
    seg_pretrain_steps: int = 100      # F_S on the labelled images
    semi_steps: int = 50               # "Semi-DA": F_R frozen, F_S with the joint loss
    joint_rounds: int = 10             # "DA": rounds of (reg_per_seg registration steps, 1 segmentation step)
    reg_per_seg: int = 20
    batch_size: int = 1                # pairs per step (global batch; split over DDP processes)
    lr: float = 1e-3
    divergence_ratio: float = 100.0    # stop at a loss > this x the median of its last 50 (and > 10); 0 = off
    grad_clip: float = 0.0             # clip each step's gradient norm (per network) to this; 0 = off
    # ---- system
    device: str = "cpu"
    amp: str = "none"                  # "bf16" / "fp16" autocast (fp16 on CUDA only)
    activation_checkpointing: bool = False
    sequential_segmentation: bool = False  # F_S on a step's moving and fixed images one after the other
    seed: int = 0
    checkpoint_every: int = 100        # steps between checkpoints (and at the end of every stage)
    log_every: int = 10
    eval_pairs: int = 12               # test pairs used for registration Dice
    output: str = "runs/deepatlas"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of its domain."""
        choices = {"method": METHODS, "similarity": SIMILARITIES, "regulariser": REGULARISERS,
                   "seg_norm": NORMS, "amp": AMP_MODES, "anatomy_prediction": ANATOMY_PREDICTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("shape", "reg_enc", "reg_dec", "seg_channels"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.shape) != 3 or any(s < 1 for s in self.shape):
            raise ValueError(f"config.shape must be three positive ints, got {self.shape}")
        if self.anatomy_min_manual not in (0, 1, 2):
            raise ValueError(f"config.anatomy_min_manual must be 0, 1 or 2, got {self.anatomy_min_manual}")
        if self.num_workers < 0:
            raise ValueError(f"config.num_workers must be >= 0, got {self.num_workers}")
        if self.num_labelled < -1:
            raise ValueError(f"config.num_labelled must be >= 0, or -1 for all, got {self.num_labelled}")
        nonnegative = ("reg_pretrain_steps", "seg_pretrain_steps", "semi_steps", "joint_rounds", "num_test",
                       "lambda_r", "lambda_a", "lambda_sp", "lambda_fold", "ce_weight", "divergence_ratio", "grad_clip",
                       "grain")
        for name in nonnegative:
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"config.{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_a_reg is not None and not self.lambda_a_reg >= 0:
            raise ValueError(f"config.lambda_a_reg must be >= 0 or None (= lambda_a), got {self.lambda_a_reg}")
        positive = ("num_train", "num_classes", "reg_per_seg", "batch_size", "lr", "checkpoint_every", "log_every",
                    "integration_steps", "lncc_window", "eval_pairs")
        for name in positive:
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"config.{name} must be > 0, got {getattr(self, name)}")
        self.flip_label_pairs = _label_pairs(self.flip_label_pairs)
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("config.amp='fp16' needs a CUDA device; use 'bf16' or 'none' on the CPU")

    @property
    def registration_anatomy_weight(self) -> float:
        """The anatomy loss weight of registration steps: ``lambda_a_reg``, or ``lambda_a`` when it is None."""
        return self.lambda_a if self.lambda_a_reg is None else self.lambda_a_reg

    @property
    def reads_files(self) -> bool:
        """Whether ``data`` names NIfTI files (a folder or a manifest), not embedded data."""
        return self.data not in EMBEDDED_DATA

    @property
    def file_label_map(self) -> dict[int, int] | None:
        """The {original: class} table the label files are read through (None: none, or embedded data)."""
        if not self.reads_files:
            return None
        from .data.preprocess import Preprocess
        return Preprocess.from_dict(self.preprocess).label_map or None

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML (.yaml / .yml) or JSON file."""
        return cls.from_dict(read_mapping(path))


def _label_pairs(pairs: Any) -> list[list[int]]:
    """``flip_label_pairs`` as a list of [a, b] int pairs: a != b, >= 0, no label in two pairs."""
    problem = f"config.flip_label_pairs must be a list of [left, right] label pairs such as [[17, 53], [2, 41]], " \
              f"got {pairs!r}"
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ValueError(problem)
    if not all(isinstance(v, int) and not isinstance(v, bool) for pair in pairs for v in pair):
        raise ValueError(problem + " (labels are whole numbers)")
    values = [v for pair in pairs for v in pair]
    if min(values, default=0) < 0 or any(a == b for a, b in pairs):
        raise ValueError(problem + " (two different labels >= 0 per pair)")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(problem + f" (label(s) {repeated} in more than one pair)")
    return [[int(a), int(b)] for a, b in pairs]


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}") \
            from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(values).__name__}")
    return values

