"""The ``deepatlas`` command line: demo, train, compare, evaluate, register, segment, bench, info."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import TrainConfig, read_mapping

log = logging.getLogger("deepatlas")
# Choices that live in modules which load torch (not imported here: `deepatlas --help` stays fast); a test keeps
# them equal to deepatlas.demo.PRESETS, deepatlas.inference.SPACES and deepatlas.inference.DDF_FORMATS.
PRESET_NAMES = ("quick", "default", "gncc", "long")
SPACES = ("native", "model")
DDF_FORMATS = ("ras", "itk")


# ---- config flags ------------------------------------------------------------------------------------------------


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per TrainConfig field (``--reg-pretrain-steps 300``); flags override the
    file, the file overrides the defaults."""
    parser.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig fields")
    group = parser.add_argument_group("config fields (see docs/model.md)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                                  "help": f"default: {default!r}"}
        if isinstance(default, (dict, list)):
            group.add_argument(flag, type=json.loads, metavar="JSON", **kwargs)
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=int, nargs="+", metavar="N", **kwargs)
        elif default is None:  # optional numbers ("float | None"): the flag takes the number
            group.add_argument(flag, type=float, **kwargs)
        else:
            group.add_argument(flag, type=type(default), **kwargs)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None) is not None:
        values.update(read_mapping(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)


# ---- commands ----------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .run import prepare_data, run_method
    config = config_from_args(args)
    distributed = _distributed(config)
    with distributed as config:
        result = run_method(config, prepare_data(config), config.output, progress=not args.no_progress)
    if distributed.rank == 0:  # under torchrun every process evaluates the same networks; one report is enough
        _report([result], args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .demo import PRESETS
    from .run import compare, compare_seeds, paired_differences, seed_summary, seeds_table
    config = config_from_args(args, PRESETS[args.preset] if args.preset else None)
    methods = tuple(m.strip() for m in args.methods.split(","))
    if args.seeds is None:
        _report(compare(config, methods, progress=not args.no_progress), args.json)
        return 0
    rows = compare_seeds(config, methods, args.seeds, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"results": [_jsonable(r) for r in rows], "summary": seed_summary(rows),
                          "paired": paired_differences(rows)}))
    else:
        print(seeds_table(rows))
    return 0


def default_demo_output(preset: str, data: str) -> Path:
    """deepatlas-demo for the default demo, deepatlas-demo-quick, deepatlas-demo-gncc-mni, ... for the others: a run
    resumes only with its own settings, so each setting gets its own folder and one demo never stops on another's
    checkpoints."""
    return Path("-".join(["deepatlas-demo", *(p for p in (preset, data) if p not in ("default", "synthetic"))]))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    output = args.output or default_demo_output(args.preset, args.data)
    results = run_demo(output, preset=args.preset, data=args.data, device=args.device, seed=args.seed,
                       progress=not args.no_progress, figures=not args.no_figures)
    _report(results, args.json)
    if not args.json:
        print(f"\noutputs and figures in {output}/")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .inference import evaluate_runs
    _report(evaluate_runs(args.run, device=args.device, data=args.data), args.json)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .inference import register_files
    written = register_files(args.model, args.moving, args.fixed, args.output, moving_label=args.moving_label,
                             device=args.device, space=args.space, fixed_label=args.fixed_label,
                             ddf_format=args.ddf_format)
    _print_written(written, args.json)
    if "metrics" in written and not args.json:
        scores = json.loads(written["metrics"].read_text())
        print(f"Dice {scores['dice_before']:.3f} before, {scores['dice_after']:.3f} after; "
              f"{scores['folding_pct']:.3f}% folding voxels")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import segment_files
    output = args.output or Path("segmentation.nii.gz" if len(args.image) == 1 else "segmentations")
    written = segment_files(args.model, args.image, output, device=args.device, space=args.space,
                            progress=not args.no_progress and len(args.image) > 1)
    _print_written(written, args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_table
    rows, table = bench_table(size=args.size, repeats=args.repeats, device=args.device)
    print(json.dumps({"results": rows}) if args.json else table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import deepatlas_cuda

    from . import __version__
    info = {"deepatlas": __version__, **deepatlas_cuda.build_info(), "torch_threads": torch.get_num_threads(),
            "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                  for i in range(torch.cuda.device_count())]}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


# ---- helpers -----------------------------------------------------------------------------------------------------


def _report(results: list[dict[str, Any]], as_json: bool) -> None:
    from .run import results_table
    if as_json:
        print(json.dumps({"results": [_jsonable(r) for r in results]}))
    else:
        print(results_table(results))


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}


def _print_written(written: dict[str, Path], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: str(v) for k, v in written.items()}))
    else:
        for key, path in written.items():
            print(f"{key:>10}: {path}")


class _distributed:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on the CPU, NCCL on CUDA
    with one GPU per process (LOCAL_RANK); tear it down afterwards."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.started = False
        self.rank = 0

    def __enter__(self) -> TrainConfig:
        import os

        import torch
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return self.config
        cuda = self.config.device.startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        self.started = True
        self.rank = torch.distributed.get_rank()
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return dataclasses.replace(self.config, device=f"cuda:{local}")
        return self.config

    def __exit__(self, exc_type, exc, tb) -> None:
        from .distributed import end_process_group
        if self.started:
            end_process_group(tb)


def _space_flag(parser: argparse.ArgumentParser, native: str, model: str) -> None:
    parser.add_argument("--space", choices=SPACES, default="native",
                        help=f"where outputs are written: native (default): {native}; model: {model}, where the "
                             f"network ran")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports a mistyped flag before the required flags it left missing: with
    ``segment IMAGE --modle m.pt`` the error names ``--modle``, not a missing ``--model``. While parsing, required
    flags are marked optional and checked afterwards; usage and help (--help) still show them as required."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred: list[argparse.Action] = []  # the required flags while a parse runs

    def parse_known_args(self, args=None, namespace=None):
        self._deferred = [action for action in self._actions if action.required and action.option_strings]
        try:
            with _required(self._deferred, False):
                namespace, unknown = super().parse_known_args(args, namespace)
        finally:
            required, self._deferred = self._deferred, []
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        missing = [action for action in required if getattr(namespace, action.dest, None) is None]
        if missing:
            self.error("the following arguments are required: "
                       + ", ".join("/".join(action.option_strings) for action in missing))
        return namespace, unknown

    def format_usage(self) -> str:
        with _required(self._deferred, True):
            return super().format_usage()

    def format_help(self) -> str:
        with _required(self._deferred, True):
            return super().format_help()


@contextlib.contextmanager
def _required(actions: list[argparse.Action], value: bool):
    """``required = value`` on ``actions`` for the block, then back to what it was."""
    previous = [action.required for action in actions]
    for action in actions:
        action.required = value
    try:
        yield
    finally:
        for action, before in zip(actions, previous):
            action.required = before


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepatlas", description="DeepAtlas joint registration + segmentation (Xu & Niethammer, "
                     "MICCAI 2019) on the deepatlas_cuda ops.", allow_abbrev=False)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        # No abbreviations: a mistyped flag (--reg-pretrain-step) must be an error, not another flag's prefix.
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", cmd_demo, "train the independent baselines and DeepAtlas (one-shot) on embedded data, "
                                     "print the comparison, write outputs and figures")
    demo.add_argument("--output", type=Path, help="output folder (default: deepatlas-demo, or with --quick, --long, "
                                                  "another preset or --data mni: deepatlas-demo-quick, ...)")
    speed = demo.add_mutually_exclusive_group()
    speed.add_argument("--quick", dest="preset", action="store_const", const="quick",
                       help="under a minute on a 2-core CPU (a smoke test, not real results)")
    speed.add_argument("--long", dest="preset", action="store_const", const="long",
                       help="a longer setting for real results (64^3, 8 structures, 10x the steps)")
    speed.add_argument("--preset", choices=PRESET_NAMES,
                       help="a named preset (deepatlas/demo.py); gncc: the default's budget with global NCC, "
                            "lambda_r 1 and no gradient clip (the demo's settings until 2026-12)")
    demo.set_defaults(preset="default")
    demo.add_argument("--data", choices=["synthetic", "mni"], default="synthetic",
                      help="synthetic anatomy, or the MNI152 template from the installed nilearn package")
    _common(demo, seed=True, json_flag=True, progress=True)
    demo.add_argument("--no-figures", action="store_true", help="skip the PNG figures")

    train = command("train", cmd_train, "train one method (config file and/or flags); resumes from the output "
                                        "folder's checkpoint when there is one; runs under torchrun for DDP")
    add_config_flags(train)
    _common(train, json_flag=True, progress=True, device=False)

    compare = command("compare", cmd_compare, "train the independent baselines and the joint model on the same "
                                              "data and compare them (one folder per method under --output)")
    add_config_flags(compare)
    compare.add_argument("--preset", choices=PRESET_NAMES,
                         help="start from a `deepatlas demo` preset's settings (--config and flags override them)")
    compare.add_argument("--seeds", type=int, nargs="+", metavar="S",
                         help="repeat the comparison for each seed (training and data seed; outputs in "
                              "OUTPUT/seed<S>) and report each score's mean and sd over seeds")
    compare.add_argument("--methods", default="reg_only,seg_only,joint",
                         help="comma-separated: joint, reg_only, reg_anatomy, seg_only")
    _common(compare, json_flag=True, progress=True, device=False)

    evaluate = command("evaluate", cmd_evaluate, "evaluate trained model(s) on the test split of their data")
    evaluate.add_argument("run", type=Path, help="a model.pt, a run folder, or a compare/demo folder")
    evaluate.add_argument("--data", help="evaluate on every labelled image of this folder or manifest instead "
                                         "(read with the model's preprocessing)")
    _common(evaluate, json_flag=True)

    register = command("register", cmd_register, "register MOVING to FIXED: warped image (+ labels), DDF and "
                                                  "Jacobian-determinant map as NIfTI on the fixed image's grid")
    register.add_argument("moving", type=Path)
    register.add_argument("fixed", type=Path)
    register.add_argument("--model", type=Path, required=True, help="model.pt of a training run")
    register.add_argument("--moving-label", type=Path, help="label map of MOVING, warped with nearest neighbour")
    register.add_argument("--fixed-label", type=Path, help="label map of FIXED: with --moving-label, writes "
                                                           "metrics.json (Dice before / after, folding)")
    register.add_argument("--output", type=Path, default=Path("registered"), help="output folder")
    _space_flag(register, "FIXED's own grid and affine: the moving file's intensities and label values, the DDF in "
                          "mm (world RAS)", "the preprocessed FIXED grid, the DDF in its voxels")
    register.add_argument("--ddf-format", choices=DDF_FORMATS, default="ras",
                          help="ddf.nii.gz in native space: ras (default): [D, H, W, 3] world RAS mm; itk: ITK's "
                               "displacement-field file ([D, H, W, 1, 3] world LPS mm, intent vector) for "
                               "antsApplyTransforms, SimpleITK and 3D Slicer")
    _common(register, json_flag="{output name: file written}")

    segment = command("segment", cmd_segment, "segment IMAGE(s) with a trained model -> label map NIfTI(s)")
    segment.add_argument("image", type=Path, nargs="+")
    segment.add_argument("--model", type=Path, required=True, help="model.pt of a training run")
    segment.add_argument("--output", type=Path, default=None,
                         help="a .nii.gz file for one image (default: segmentation.nii.gz), or a folder that receives "
                              "<image name>_seg.nii.gz per image (default with several images: segmentations)")
    _space_flag(segment, "IMAGE's own grid and affine (class probabilities resampled, then the most probable class)",
                "the preprocessed grid")
    _common(segment, json_flag="{image: label map written} ({'segmentation': file} for one image and a file "
                               "--output)", progress=True)

    bench = command("bench", cmd_bench, "time the ops against the plain-PyTorch way (markdown table of ratios)")
    bench.add_argument("--size", type=int, default=96, help="cube edge of the benchmark volume")
    bench.add_argument("--repeats", type=int, default=5)
    _common(bench, json_flag=True)

    info = command("info", cmd_info, "build information of deepatlas_cuda and the devices torch sees")
    info.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def _common(parser: argparse.ArgumentParser, seed: bool = False, json_flag: bool | str = False,
            progress: bool = False, device: bool = True) -> None:
    """Flags shared by commands; ``json_flag`` True or a description of the JSON object printed."""
    if device:
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if json_flag:
        shape = json_flag if isinstance(json_flag, str) else "with a 'results' list"
        parser.add_argument("--json", action="store_true", help=f"print one JSON object {shape}")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a command's unknown arguments are reported with its own usage
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, FloatingPointError) as error:
        if args.log_level == "DEBUG":
            raise
        print(f"deepatlas {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
