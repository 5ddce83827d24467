"""One registration step and one segmentation step of DeepAtlas (the losses of Xu & Niethammer, 2019, Sec. 2).

Registration step (F_S frozen):  L_i(I_m∘φ, I_t) + λ_r L_r(φ) + λ_fold L_fold(φ) + λ_a L_a(S_m∘φ, S_t)
    where a missing manual segmentation S is replaced by F_S's prediction (anatomy mode "joint"; probabilities,
    argmax, or probabilities with each voxel weighted by F_S's confidence, by config.anatomy_prediction; pairs
    with fewer than config.anatomy_min_manual manual segmentations get no anatomy term), or the anatomy term is
    used only on pairs with two manual segmentations ("manual"), or not at all ("none").
Segmentation step (F_R frozen), per pair:
    only I_m labelled:  λ_a L_a(S_m∘φ, F_S(I_t)) + λ_sp L_sp(F_S(I_m), S_m)
    only I_t labelled:  λ_a L_a(F_S(I_m)∘φ, S_t) + λ_sp L_sp(F_S(I_t), S_t)
    both labelled:      λ_sp (L_sp(F_S(I_m), S_m) + L_sp(F_S(I_t), S_t))
    neither:            no loss
Supervised segmentation step: λ_sp L_sp(F_S(I), S) on labelled images.

Every loss is the mean over the pairs of the batch, so DDP's gradient average over equal shares equals one
process with the global batch. Anatomy terms use the fused ``warped_dice`` (label or probability source: no warped
K-channel volume).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import deepatlas_cuda as da

from . import losses
from .config import TrainConfig
from .pairs import Batch


@dataclass
class StepModels:
    """The networks as trained (possibly DDP-wrapped) and as used frozen (the bare modules)."""
    reg_net: nn.Module
    seg_net: nn.Module
    reg_module: nn.Module
    seg_module: nn.Module


class StepLosses:
    """Builds the loss functions once from the config and runs the steps' forward passes."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device) -> None:
        self.config = config
        self.num_classes = num_classes
        self.device = device
        self.similarity = (losses.LocalNCCLoss(config.lncc_window) if config.similarity == "lncc"
                           else losses.similarity_loss(config.similarity))
        self.regulariser = losses.regulariser_loss(config.regulariser)

    def autocast(self) -> AbstractContextManager:
        if self.config.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- registration ------------------------------------------------------------------------------------------

    def registration(self, models: StepModels, batch: Batch, anatomy: str) -> tuple[Tensor, dict[str, float]]:
        """Loss of a registration step and its parts (floats, for logging)."""
        cfg = self.config
        with self.autocast():
            ddf = models.reg_net(batch.moving, batch.fixed)
        ddf = ddf.float()  # [B, 3, D, H, W], voxels
        warped = da.warp(batch.moving, ddf)
        similarity = self.similarity(warped, batch.fixed)
        smoothness = self.regulariser(ddf)
        loss = similarity + cfg.lambda_r * smoothness
        parts = {"sim": similarity.item(), "smooth": smoothness.item()}
        if cfg.lambda_fold > 0:
            folding = losses.folding_penalty(ddf)
            loss = loss + cfg.lambda_fold * folding
            parts["fold"] = folding.item()
        if anatomy != "none" and cfg.registration_anatomy_weight > 0:
            anatomy_loss, used = self._registration_anatomy(models.seg_module, batch, ddf, anatomy)
            if used:
                loss = loss + cfg.registration_anatomy_weight * anatomy_loss
                parts["anatomy"] = anatomy_loss.item()
                parts["dice"] = 1.0 - parts["anatomy"] * ddf.shape[0] / used  # mean soft Dice of the pairs used
        parts["loss"] = loss.item()
        return loss, parts

    def _registration_anatomy(self, seg_module: nn.Module, batch: Batch, ddf: Tensor,
                              mode: str) -> tuple[Tensor, int]:
        """Anatomy loss summed over the pairs with usable labels, divided by the batch size (pairs without count as
        zero: a process's share of the global batch's mean, which keeps DDP equal to one process), and the number
        of pairs used."""
        total, used = ddf.new_zeros(()), 0
        for b in range(ddf.shape[0]):
            moving_ok, fixed_ok = bool(batch.moving_labelled[b]), bool(batch.fixed_labelled[b])
            if mode == "manual" and not (moving_ok and fixed_ok):
                continue
            if moving_ok + fixed_ok < self.config.anatomy_min_manual:
                continue
            source = batch.moving_labels[b:b + 1] if moving_ok else self._stand_in(seg_module, batch.moving[b:b + 1])
            target = batch.fixed_labels[b:b + 1] if fixed_ok else self._stand_in(seg_module, batch.fixed[b:b + 1])
            if self.config.anatomy_prediction == "weighted":
                total = total + self._weighted_anatomy(source, ddf[b:b + 1], target, moving_ok, fixed_ok)
            else:
                total = total + losses.anatomy_loss(source, ddf[b:b + 1], target, self.num_classes)
            used += 1
        return total / ddf.shape[0], used

    def _weighted_anatomy(self, source: Tensor, ddf: Tensor, target: Tensor, source_manual: bool,
                          target_manual: bool) -> Tensor:
        """``anatomy_prediction="weighted"``: each voxel's anatomy term weighted by F_S's confidence in the stand-ins
        there (the target's at x, the moving image's warped to x; 1 for a manual segmentation), so that F_S's
        uncertain predictions pull F_R less."""
        weight = torch.ones_like(ddf[:, :1])
        with torch.no_grad():
            if not target_manual:
                weight = weight * losses.confidence(target)
            if not source_manual:
                weight = weight * da.warp(losses.confidence(source), ddf, padding_mode="zeros")
        return losses.weighted_anatomy_loss(source, ddf, target, weight, self.num_classes)

    def _stand_in(self, seg_module: nn.Module, image: Tensor) -> Tensor:
        """F_S's stand-in for a missing manual segmentation in a registration step: its class probabilities
        [1, K, D, H, W] (``anatomy_prediction="soft"``, the paper's, or ``"weighted"``) or its argmax as a label
        map [1, 1, D, H, W] (``"hard"``, int64 like the manual labels)."""
        probs = self._predict(seg_module, image)
        return probs.argmax(1, keepdim=True) if self.config.anatomy_prediction == "hard" else probs

    @torch.no_grad()
    def _predict(self, seg_module: nn.Module, image: Tensor) -> Tensor:
        """F_S's class probabilities [1, K, D, H, W], frozen (eval mode: running normalisation statistics)."""
        was_training = seg_module.training
        seg_module.eval()
        with self.autocast():
            logits = seg_module(image)
        seg_module.train(was_training)
        return logits.float().softmax(1)

    # ---- segmentation ------------------------------------------------------------------------------------------

    def segmentation(self, models: StepModels, batch: Batch, backward: Callable[[Tensor], None]
                     ) -> dict[str, float]:
        """A joint segmentation step (F_R frozen): runs ``backward`` on its loss (once, or once per image with
        ``config.sequential_segmentation``) and returns the loss parts."""
        cfg = self.config
        with torch.no_grad():
            with self.autocast():
                ddf = models.reg_module(batch.moving, batch.fixed)
            ddf = ddf.float()
        pairs = ddf.shape[0]
        flags = [(bool(m), bool(f)) for m, f in zip(batch.moving_labelled.tolist(), batch.fixed_labelled.tolist())]
        logged: dict[str, list[float]] = {"supervised": [], "anatomy": []}

        def terms(logits: Tensor, side: str) -> Tensor:
            """The terms of the step's loss that depend on F_S of the ``side`` images (each term depends on one
            image only, which is what lets the two sides run one after the other)."""
            # Every logit enters the graph (times 0 where a pair has no loss), so each DDP process reduces the
            # same parameters even when its pairs carry no labels.
            loss = 0.0 * logits.sum()
            for b, (moving_ok, fixed_ok) in enumerate(flags):
                one = slice(b, b + 1)
                own_ok, other_ok = (moving_ok, fixed_ok) if side == "moving" else (fixed_ok, moving_ok)
                own_labels = (batch.moving_labels if side == "moving" else batch.fixed_labels)[one]
                if own_ok:  # L_sp on a labelled image
                    supervised = losses.supervised_loss(logits[one], own_labels, cfg.ce_weight)
                    term = cfg.lambda_sp * supervised
                    logged["supervised"].append(supervised.item())
                elif other_ok:  # L_a between the labelled side and F_S's prediction on this side
                    probs = logits[one].softmax(1)
                    if side == "moving":
                        anatomy = losses.anatomy_loss(probs, ddf[one], batch.fixed_labels[one], self.num_classes)
                    else:
                        anatomy = losses.anatomy_loss(batch.moving_labels[one], ddf[one], probs, self.num_classes)
                    term = cfg.lambda_a * anatomy
                    logged["anatomy"].append(anatomy.item())
                else:
                    continue
                loss = loss + term / pairs
            return loss

        total = 0.0
        if cfg.sequential_segmentation:
            for side, images in (("moving", batch.moving), ("fixed", batch.fixed)):
                with self.autocast():
                    logits = models.seg_net(images)
                loss = terms(logits.float(), side)
                backward(loss)
                total += loss.item()
                del logits, loss
        else:
            with self.autocast():
                logits = models.seg_net(torch.cat([batch.moving, batch.fixed]))
            logits = logits.float()
            loss = terms(logits[:pairs], "moving") + terms(logits[pairs:], "fixed")
            backward(loss)
            total = loss.item()
        parts = {"loss": total, "supervised": sum(logged["supervised"]) / pairs}
        if logged["anatomy"]:
            parts["anatomy"] = sum(logged["anatomy"]) / len(logged["anatomy"])
            parts["dice"] = 1.0 - parts["anatomy"]
        return parts

    def supervised(self, models: StepModels, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Loss of a supervised segmentation step on labelled images."""
        with self.autocast():
            logits = models.seg_net(batch.moving)
        logits = logits.float()
        supervised = losses.supervised_loss(logits, batch.moving_labels, self.config.ce_weight)
        loss = self.config.lambda_sp * supervised
        with torch.no_grad():
            dice = 1.0 - losses.soft_dice_loss(logits.softmax(1), batch.moving_labels, self.num_classes).item()
        return loss, {"loss": loss.item(), "supervised": supervised.item(), "dice": dice}
