"""Peak memory and time of ONE full DeepAtlas training step on the CPU, against the same networks written the way
users write them today.

One training step = one registration step (F_S frozen) + one segmentation step (F_R frozen), batch 1, a one-shot
pair (the moving image is labelled, the fixed one is not), K classes, all losses, an Adam step for each network:

    registration step:  ddf = F_R(I_m, I_f)
                        L = NCC(I_m o ddf, I_f) + diffusion(ddf) + anatomy(S_m o ddf, softmax(F_S(I_f)) [no grad])
    segmentation step:  ddf = F_R(I_m, I_f) [no grad];  logits = F_S([I_m; I_f])
                        L = anatomy(S_m o ddf, softmax(logits_f)) + Dice(softmax(logits_m), S_m)

(the losses of :class:`deepatlas.steps.StepLosses` with the default config: global NCC, diffusion, lambda = 1, no
folding penalty, no cross-entropy). Networks: the default RegistrationNet (enc 16,32,32,32,32 / dec
32,32,32,32,16,16) and SegmentationNet (8,16,32,64, batch norm). Variants, each adding one option to the previous:

    baseline        image warp: F.grid_sample with a sampling grid built from the ddf (deepatlas_cuda.reference.warp);
                    anatomy: one-hot [1, K, D, H, W] float labels warped by F.grid_sample
                    (reference.warp_labels_soft), then soft Dice; no activation checkpointing
    warp            + deepatlas_cuda.warp for the image (no grid)
    warped_dice     + the anatomy terms by the fused deepatlas_cuda.warped_dice (deepatlas.losses.anatomy_loss with
                    integer labels: the warped K-channel volume is never built), and the supervised Dice from the
                    integer labels without a one-hot (deepatlas.losses.label_soft_dice)
    checkpointing   + activation checkpointing in both networks (checkpointing=True)
    sequential      + the segmentation step runs F_S on the moving and the fixed image one after the other, backward
                      in between (sequential_segmentation=True) = our memory-saving settings
    bf16            + bf16 autocast around the networks (optional; as StepLosses with amp="bf16")

Each variant runs in a FRESH Python process (``--child``) with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation of
64 KiB or more is its own mmap and leaves the RSS when freed; see benchmarks/memory.py). The child builds the
networks and optimisers, runs a whole warm-up step at a small size (loads the kernels, starts the thread pool,
creates Adam's state), creates the full-size inputs, resets the peak-RSS mark (``/proc/self/clear_refs`` = 5) and
reads the RSS ("base": inputs + networks + optimisers), runs one timed step, and reads the peak (VmHWM).
Reported: the absolute peak RSS, and the increase over base.

    python benchmarks/train_step.py                        # 160 192 224, K = 32, all four variants
    python benchmarks/train_step.py --size 64 64 64        # quick check
    python benchmarks/train_step.py --variants baseline checkpointing bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import proc_status_kb, reset_peak_rss  # noqa: E402

MB = 2**20
VARIANTS = ("baseline", "warp", "warped_dice", "checkpointing", "sequential", "bf16")
DEFAULT_VARIANTS = VARIANTS[:5]
LABELS = {"baseline": "baseline (grid_sample, one-hot, no checkpointing)",
          "warp": "+ deepatlas warp",
          "warped_dice": "+ fused warped_dice",
          "checkpointing": "+ activation checkpointing",
          "sequential": "+ sequential segmentation step (our memory-saving settings)",
          "bf16": "+ bf16 autocast (CPU)"}


def _options(variant: str) -> dict:
    level = VARIANTS.index(variant)
    return {"da_warp": level >= 1, "fused_dice": level >= 2, "checkpointing": level >= 3, "sequential": level >= 4,
            "bf16": level >= 5}


# ---- the training step ---------------------------------------------------------------------------------------


def _make_inputs(size, num_classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 1, *size)
    # smooth-ish random images (values in [0, 1]); label values spread over all K classes
    moving = torch.rand(shape, generator=g)
    fixed = (moving + 0.1 * torch.rand(shape, generator=g)).clamp_(0, 1)
    labels = torch.randint(0, num_classes, shape, generator=g)  # int64, as deepatlas.pairs.Volumes stores labels
    return {"moving": moving, "fixed": fixed, "moving_labels": labels}


def _make_step(options: dict, num_classes: int):
    """Networks, optimisers and ``step(inputs) -> dict of loss values``."""
    import deepatlas_cuda as da
    from deepatlas import losses
    from deepatlas.nets import RegistrationNet, SegmentationNet
    from deepatlas_cuda import reference

    torch.manual_seed(0)
    reg = RegistrationNet(checkpointing=options["checkpointing"])  # default widths
    seg = SegmentationNet(num_classes, checkpointing=options["checkpointing"])  # (8, 16, 32, 64), batch norm
    reg_opt = torch.optim.Adam(reg.parameters(), lr=1e-3)
    seg_opt = torch.optim.Adam(seg.parameters(), lr=1e-3)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if options["bf16"]
                else contextlib.nullcontext)

    def warp_image(image, ddf):
        return da.warp(image, ddf) if options["da_warp"] else reference.warp(image, ddf)

    def anatomy(labels, ddf, target_probs):
        if options["fused_dice"]:
            return losses.anatomy_loss(labels, ddf, target_probs, num_classes)  # fused da.warped_dice
        warped = reference.warp_labels_soft(labels, ddf, num_classes)  # one-hot [1, K, ...] + grid_sample
        return 1 - reference.soft_dice(warped, target_probs).mean()

    def supervised_dice(logits, labels):
        if options["fused_dice"]:
            return losses.supervised_loss(logits, labels)  # label_soft_dice: no one-hot
        one_hot = losses.one_hot(labels, num_classes, logits.dtype)
        return 1 - reference.soft_dice(logits.softmax(1), one_hot).mean()

    @torch.no_grad()
    def predict(image):  # F_S frozen: eval mode, as StepLosses._predict
        seg.eval()
        with autocast():
            logits = seg(image)
        seg.train()
        return logits.float().softmax(1)

    def step(inputs: dict, between=None) -> dict:
        """One registration step, ``between()`` (if given), one segmentation step."""
        moving, fixed, labels = inputs["moving"], inputs["fixed"], inputs["moving_labels"]
        parts = {}
        # registration step (F_S frozen); the fixed image is unlabelled: F_S's prediction replaces its labels
        reg_opt.zero_grad(set_to_none=True)
        with autocast():
            ddf = reg(moving, fixed)
        ddf = ddf.float()
        similarity = losses.global_ncc_loss(warp_image(moving, ddf), fixed)
        smoothness = losses.diffusion_loss(ddf)
        anatomy_r = anatomy(labels, ddf, predict(fixed))
        loss = similarity + smoothness + anatomy_r
        loss.backward()
        reg_opt.step()
        parts.update(reg_loss=loss.item(), sim=similarity.item(), smooth=smoothness.item(),
                     reg_anatomy=anatomy_r.item())
        del ddf, similarity, smoothness, anatomy_r, loss
        if between is not None:
            between()
        # segmentation step (F_R frozen)
        seg_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            with autocast():
                ddf = reg(moving, fixed)
            ddf = ddf.float()
        if options["sequential"]:  # each term depends on one image's logits: backward one image at a time
            with autocast():
                fixed_logits = seg(fixed).float()
            anatomy_s = anatomy(labels, ddf, fixed_logits.softmax(1))
            anatomy_s.backward()
            anatomy_s = anatomy_s.detach()
            del fixed_logits
            with autocast():
                moving_logits = seg(moving).float()
            supervised = supervised_dice(moving_logits, labels)
            supervised.backward()
            loss = anatomy_s + supervised.detach()
        else:
            with autocast():
                logits = seg(torch.cat([moving, fixed]))
            logits = logits.float()
            moving_logits, fixed_logits = logits[:1], logits[1:]
            anatomy_s = anatomy(labels, ddf, fixed_logits.softmax(1))
            supervised = supervised_dice(moving_logits, labels)
            loss = 0.0 * logits.sum() + anatomy_s + supervised
            loss.backward()
        seg_opt.step()
        parts.update(seg_loss=loss.item(), seg_anatomy=anatomy_s.item(), supervised=supervised.item())
        return parts

    return step


# ---- measurement in a fresh process --------------------------------------------------------------------------


def _child(variant: str, size, num_classes: int, threads: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    options = _options(variant)
    step = _make_step(options, num_classes)
    start = time.perf_counter()
    step(_make_inputs((warmup,) * 3, num_classes, seed=1))  # kernels, thread pool, autograd, Adam state
    warmup_s = time.perf_counter() - start
    inputs = _make_inputs(size, num_classes)
    gc.collect()
    exact = reset_peak_rss()
    base_kb = proc_status_kb("VmRSS")
    phase = {}

    def between() -> None:  # peak of the registration step, then a fresh mark for the segmentation step
        phase["reg_kb"] = proc_status_kb("VmHWM")
        reset_peak_rss()

    start = time.perf_counter()
    parts = step(inputs, between if exact else None)
    step_s = time.perf_counter() - start
    seg_kb = proc_status_kb("VmHWM")
    if exact:
        peak_kb = max(phase["reg_kb"], seg_kb)
    else:  # lifetime peak: includes the warm-up (small) and anything before
        import resource
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "options": options, "size": list(size), "num_classes": num_classes,
            "threads": threads, "base_mb": base_kb * 1024 / MB, "peak_mb": peak_kb * 1024 / MB,
            "increase_mb": (peak_kb - base_kb) * 1024 / MB, "step_s": step_s,
            "reg_increase_mb": (phase["reg_kb"] - base_kb) * 1024 / MB if exact else None,
            "seg_increase_mb": (seg_kb - base_kb) * 1024 / MB if exact else None, "warmup_s": warmup_s,
            "method": "VmHWM after clear_refs" if exact else "ru_maxrss (lifetime)", "losses": parts}


def run_variant(variant: str, size, num_classes: int, threads: int, warmup: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--size", *map(str, size),
           "--classes", str(num_classes), "--threads", str(threads), "--warmup", str(warmup)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"variant": variant, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["variant"] == "baseline" and "error" not in r), None)
    lines = ["| variant | peak RSS (MB) | increase over inputs+model (MB) | % of baseline peak | "
             "% of baseline increase | reg / seg step increase (MB) | step time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {LABELS[r['variant']]} | failed: {r['error'].splitlines()[0]} | | | | | |")
            continue
        pct_peak = f"{100 * r['peak_mb'] / base['peak_mb']:.0f}%" if base else "-"
        pct_inc = f"{100 * r['increase_mb'] / base['increase_mb']:.0f}%" if base else "-"
        phases = (f"{r['reg_increase_mb']:.0f} / {r['seg_increase_mb']:.0f}"
                  if r.get("reg_increase_mb") is not None else "-")
        lines.append(f"| {LABELS[r['variant']]} | {r['peak_mb']:.0f} | {r['increase_mb']:.0f} | {pct_peak} | "
                     f"{pct_inc} | {phases} | {r['step_s']:.1f} |")
    return "\n".join(lines)


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=3, default=[160, 192, 224], metavar=("D", "H", "W"),
                        help="volume size, each divisible by 16 (default 160 192 224)")
    parser.add_argument("--classes", type=int, default=32, help="K, classes incl. background (default 32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=32, help="edge of the warm-up volume (default 32)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant (default 900)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if any(s % 16 for s in args.size):
        parser.error(f"--size: each size must be divisible by 16, got {args.size}")

    if args.child:
        print(json.dumps(_child(args.child, tuple(args.size), args.classes, args.threads, args.warmup)))
        return

    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"$ {command.strip()}")
    print(f"size {tuple(args.size)}, K = {args.classes}, batch 1, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, each variant in a fresh process", flush=True)
    results = []
    for variant in args.variants:
        r = run_variant(variant, args.size, args.classes, args.threads, args.warmup, args.timeout)
        results.append(r)
        brief = r.get("error") or (f"peak {r['peak_mb']:.0f} MB, base {r['base_mb']:.0f} MB, "
                                   f"+{r['increase_mb']:.0f} MB, {r['step_s']:.1f} s")
        print(f"  {variant}: {brief}", flush=True)
    print()
    print(table(results))
    base = next((r for r in results if r["variant"] == "baseline" and "error" not in r), None)
    if base:
        print()
        for r in results:
            if "error" not in r and r is not base:
                print(f"{r['variant']}: peak {r['peak_mb'] / base['peak_mb']:.3f}x baseline, increase "
                      f"{r['increase_mb'] / base['increase_mb']:.3f}x, time {r['step_s'] / base['step_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "torch": torch.__version__, "results": results},
                                        indent=1))


if __name__ == "__main__":
    _main()
