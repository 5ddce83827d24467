"""The training loop: schedule, optimisers, mixed precision, DDP, logging, atomic checkpoints and exact resume."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_write, load_checkpoint, remove_stray_temporaries, save_checkpoint
from .config import TrainConfig
from .divergence import DivergenceGuard
from .memory import PeakMemory
from .nets import RegistrationNet, SegmentationNet
from .pairs import Volumes, draw_batch, mirrored_classes
from .schedule import REG, SEG_JOINT, anatomy_mode, phases, step_at, total_steps
from .steps import StepLosses, StepModels

log = logging.getLogger("deepatlas")

LATEST = "checkpoint_latest.pt"
MODEL = "model.pt"
VALIDATION = "val"  # the metrics rows of the validation images' scores
OUTPUT_FILES = (LATEST, MODEL, "metrics.json", "metrics.csv", "results.json")  # what a run writes atomically
# Fields that may differ between a run and its resumption (they do not change what training computes; eval_pairs
# only what is evaluated after it).
_RESUMABLE_CHANGES = {"device", "output", "log_every", "checkpoint_every", "divergence_ratio", "num_workers",
                      "eval_pairs"}


def build_networks(config: TrainConfig, num_classes: int) -> tuple[RegistrationNet, SegmentationNet]:
    """F_R and F_S as the config describes them (initialised from the current torch RNG)."""
    checkpointing = config.activation_checkpointing
    reg = RegistrationNet(enc_channels=config.reg_enc, dec_channels=config.reg_dec, svf=config.svf,
                          integration_steps=config.integration_steps, checkpointing=checkpointing)
    seg = SegmentationNet(num_classes, channels=config.seg_channels, norm=config.seg_norm,
                          checkpointing=checkpointing)
    return reg, seg


class Trainer:
    """Trains F_R and F_S on ``volumes`` following ``config``'s schedule (see :mod:`deepatlas.schedule`).

    ``output`` receives ``checkpoint_latest.pt`` (every ``checkpoint_every`` steps and at the end of each phase),
    ``metrics.csv`` / ``metrics.json`` and finally ``model.pt``; only rank 0 writes. With ``torch.distributed``
    initialised (``torchrun``), both networks are wrapped in DistributedDataParallel and each process takes an
    equal share of every global batch."""

    def __init__(self, config: TrainConfig, volumes: Volumes, num_classes: int, output: str | Path | None = None,
                 lr_axis: int = 0, progress: bool = True,
                 validation: Callable[["Trainer"], dict[str, float]] | None = None) -> None:
        self.config = config
        self.validation = validation
        self.num_classes = num_classes
        self.output = Path(output if output is not None else config.output)
        self.lr_axis = lr_axis
        self.mirror = mirrored_classes(config.flip_label_pairs, num_classes, config.file_label_map)
        self.progress = progress
        self.device = torch.device(config.device)
        self.rank, self.world_size = _distributed_rank_and_size()
        if config.batch_size % self.world_size:
            raise ValueError(f"config.batch_size ({config.batch_size}) must be divisible by the number of "
                             f"processes ({self.world_size})")

        torch.manual_seed(config.seed)
        reg, seg = build_networks(config, num_classes)
        self.reg_module, self.seg_module = reg.to(self.device), seg.to(self.device)
        self.models = StepModels(self._maybe_ddp(self.reg_module), self._maybe_ddp(self.seg_module),
                                 self.reg_module, self.seg_module)
        self.reg_opt = torch.optim.Adam(self.reg_module.parameters(), lr=config.lr)
        self.seg_opt = torch.optim.Adam(self.seg_module.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.losses = StepLosses(config, num_classes, self.device)
        self.peak = PeakMemory(self.device)
        self.divergence = DivergenceGuard(config.divergence_ratio)
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.window: dict[str, list[dict[str, float]]] = defaultdict(list)  # the steps not yet in a metrics row
        self.volumes = Volumes(volumes.images.to(self.device), volumes.labels.to(self.device),
                               volumes.labelled.to(self.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _maybe_ddp(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    # ---- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "version": __version__, "config": self.config.to_dict(),
                "num_classes": self.num_classes, "step": self.step,
                "reg_net": self.reg_module.state_dict(), "seg_net": self.seg_module.state_dict(),
                "reg_opt": self.reg_opt.state_dict(), "seg_opt": self.seg_opt.state_dict(),
                "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "metrics": self.metrics,
                "window": dict(self.window),
                "divergence": self.divergence.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        # A field newer than the checkpoint counts as its default there (runs from before it resume).
        saved = {**TrainConfig().to_dict(), **state["config"]}
        current = self.config.to_dict()
        changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved[k] != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"cannot resume from {source}: the config differs in {details}. Use the same config, "
                             f"or a new output folder to start afresh")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"cannot resume from {source}: it has {state['num_classes']} classes, the data "
                             f"{self.num_classes}")
        self.reg_module.load_state_dict(state["reg_net"])
        self.seg_module.load_state_dict(state["seg_net"])
        self.reg_opt.load_state_dict(state["reg_opt"])
        self.seg_opt.load_state_dict(state["seg_opt"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())  # loaded onto the training device (map_location)
        self.step = int(state["step"])
        self.metrics = list(state["metrics"])
        self.window = defaultdict(list, state.get("window", {}))  # checkpoints from before it: none open
        self.divergence.load_state_dict(state.get("divergence", {}))  # checkpoints from before it: no history

    def save(self) -> None:
        if self.is_main:
            save_checkpoint(self.output / LATEST, self.state_dict())
            self.write_metrics()

    def resume(self) -> bool:
        """Continue from ``output/checkpoint_latest.pt`` if it exists; returns whether it did. First removes the
        temporary files a killed run may have left mid-write (its checkpoint, metrics or model)."""
        if self.is_main:
            stray = remove_stray_temporaries(self.output, OUTPUT_FILES)
            if stray:
                log.info("removed %d temporary file(s) of an interrupted write in %s", len(stray), self.output)
        path = self.output / LATEST
        if not path.exists():
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device), source=str(path))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def write_metrics(self) -> None:
        """``metrics.json`` (a list of rows) and ``metrics.csv`` (one column per key seen), written atomically."""
        rows = self.metrics
        atomic_write(self.output / "metrics.json", lambda h: h.write(json.dumps(rows, indent=1).encode()))
        keys = list(dict.fromkeys(k for row in rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.output / "metrics.csv", lambda h: h.write(text.getvalue().encode()))

    def export_model(self) -> Path:
        """``model.pt``: the two networks, the config and the class count (for evaluate / register / segment)."""
        path = self.output / MODEL
        if self.is_main:
            save_checkpoint(path, {"format": 1, "version": __version__, "config": self.config.to_dict(),
                                   "num_classes": self.num_classes, "reg_net": self.reg_module.state_dict(),
                                   "seg_net": self.seg_module.state_dict()})
        return path

    # ---- loop --------------------------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> "Trainer":
        """Run the schedule from the current step to its end (or to global step ``stop_at``, where it saves a
        checkpoint: resuming from it gives the networks and metrics rows of an uninterrupted run)."""
        total = total_steps(self.config)
        end = total if stop_at is None else min(stop_at, total)
        phase_ends = _phase_ends(self.config)
        bar = _progress_bar(total, self.step, enabled=self.progress and self.is_main)
        try:
            while self.step < end:
                phase, kind = step_at(self.config, self.step)
                parts = self._train_step(phase, kind)
                self.step += 1
                rows = self.window[f"{phase.name}/{kind}"]
                rows.append(parts)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(phase.name, kind, rows), refresh=False)
                # Checkpoint steps also close the logging window, so a resumed run logs the same rows. Stopping
                # early (stop_at) saves the open window with the checkpoint instead, so that resuming from there
                # logs the rows an uninterrupted run logs too.
                checkpoint_due = self.step % self.config.checkpoint_every == 0 or self.step in phase_ends
                if checkpoint_due or self.step % self.config.log_every == 0:
                    self._log_window()
                if checkpoint_due:
                    self._validate(phase)
                if checkpoint_due or self.step == end:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return self

    def _validate(self, phase) -> None:
        """A metrics row of kind "val" with ``validation``'s scores (rank 0 only: it alone writes the metrics)."""
        if self.validation is None or not self.is_main:
            return
        scores = self.validation(self)
        self.metrics.append({"step": self.step, "phase": phase.name, "kind": VALIDATION, **scores})
        log.info("step %d, validation: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def _train_step(self, phase, kind: str) -> dict[str, float]:
        cfg = self.config
        batch = draw_batch(self.volumes, kind, cfg.seed, self.step, cfg.batch_size, cfg.flip,
                           self.lr_axis, self.rank, self.world_size, self.mirror)
        self.peak.reset()
        start = time.perf_counter()
        if kind == REG:
            self.reg_module.train()
            loss, parts = self.losses.registration(self.models, batch, anatomy_mode(cfg, phase))
            grad_norm = self._optimise(self.reg_opt, loss)
        else:
            self.seg_module.train()
            if kind == SEG_JOINT:
                self.seg_opt.zero_grad(set_to_none=True)
                parts = self.losses.segmentation(self.models, batch, self._backward)
                grad_norm = self._step(self.seg_opt)
            else:
                loss, parts = self.losses.supervised(self.models, batch)
                grad_norm = self._optimise(self.seg_opt, loss)
            self._average_running_statistics()
        if grad_norm is not None:
            parts["grad_norm"] = grad_norm
        self._stop_if_diverged(phase, kind, parts["loss"])
        parts["seconds"] = time.perf_counter() - start
        parts["peak_mem_mb"] = self.peak.peak_mb()
        return parts

    def _average_running_statistics(self) -> None:
        """Under DDP, average F_S's normalisation running statistics (BatchNorm) over the processes after each
        segmentation step: each process updated them from its own share of the batch, and the frozen F_S that
        predicts stand-in labels in registration steps must be the same network in every process."""
        if self.world_size == 1:
            return
        for buffer in self.seg_module.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer)
                buffer /= self.world_size

    def _stop_if_diverged(self, phase, kind: str, loss: float) -> None:
        """FloatingPointError on a non-finite loss or a jump (deepatlas.divergence), in every DDP process when one
        of them sees it (a process that stopped alone would leave the others waiting in their next all-reduce).
        The latest checkpoint predates the step, so nothing diverged is saved."""
        finite = math.isfinite(loss)
        problem = self.divergence.check(f"{phase.name}/{kind}", loss) if finite else f"the loss is {loss}"
        if self.world_size > 1:
            flag = torch.tensor([float(problem is not None)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and problem is None:
                problem = "another process's loss diverged"
        if problem is not None:
            raise FloatingPointError(
                f"step {self.step} ({phase.name}, {kind}): {problem}; training diverged. Any checkpoint in "
                f"{self.output} predates it. Start again in a new output folder with config.grad_clip set (e.g. 1) "
                f"or a lower config.lr (e.g. a tenth), or check the data"
                + ("; config.divergence_ratio = 0 turns off the check for jumps" if finite else ""))

    def _optimise(self, optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> float | None:
        optimiser.zero_grad(set_to_none=True)
        self._backward(loss)
        return self._step(optimiser)

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _step(self, optimiser: torch.optim.Optimizer) -> float | None:
        """One optimiser step. With config.grad_clip > 0 the network's gradient norm is clipped first (after DDP's
        all-reduce, so every process clips alike; unscaled first under fp16) and returned (before clipping)."""
        grad_norm = None
        if self.config.grad_clip > 0:
            self.scaler.unscale_(optimiser)
            params = [p for group in optimiser.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()
        self.scaler.step(optimiser)
        self.scaler.update()
        return grad_norm

    def _log_window(self) -> None:
        """One metrics row per phase and step kind of the open window (the means of its steps), then a new window."""
        for key, rows in self.window.items():
            phase, kind = key.split("/")
            keys = list(dict.fromkeys(k for row in rows for k in row))
            mean = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
            mean["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rows)
            self.metrics.append({"step": self.step, "phase": phase, "kind": kind, "steps": len(rows), **mean})
            log.debug("step %d %s", self.step, self.metrics[-1])
        self.window.clear()


def _phase_ends(config: TrainConfig) -> set[int]:
    ends, start = set(), 0
    for phase in phases(config):
        start += phase.steps
        ends.add(start)
    return ends


def _postfix(phase: str, kind: str, rows: list[dict[str, float]]) -> str:
    recent = rows[-10:]
    shown = [f"{phase}/{kind}"]
    for key in ("loss", "sim", "dice"):
        values = [r[key] for r in recent if key in r]
        if values:
            shown.append(f"{key}={sum(values) / len(values):.3f}")
    return " ".join(shown)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
