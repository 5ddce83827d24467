"""The `deepatlas` command line end to end on tiny synthetic data: compare (JSON), evaluate, register, segment,
train with a config file, bench, info, --help everywhere, and the demo's --quick setting."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepatlas.cli import build_parser, main
from training_helpers import TINY

TINY_FLAGS = ["--shape", "16", "16", "16", "--num-train", "4", "--num-test", "3", "--num-classes", "4",
              "--reg-enc", "4", "8", "8", "8", "8", "--reg-dec", "8", "8", "8", "8", "4", "4",
              "--seg-channels", "4", "8", "8", "8", "--reg-pretrain-steps", "4", "--seg-pretrain-steps", "3",
              "--semi-steps", "2", "--joint-rounds", "1", "--reg-per-seg", "2", "--eval-pairs", "3", "--no-progress"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One `deepatlas compare --json` run shared by the tests that need trained models."""
    output = tmp_path_factory.mktemp("compare")
    from contextlib import redirect_stdout
    from io import StringIO
    buffer = StringIO()
    with redirect_stdout(buffer):
        assert main(["compare", *TINY_FLAGS, "--output", str(output), "--json"]) == 0
    return output, json.loads(buffer.getvalue())


def test_compare_over_seeds_reports_each_seed_and_the_spread(capsys, tmp_path):
    report = run_json(capsys, ["compare", *TINY_FLAGS, "--methods", "reg_only,seg_only", "--seeds", "3", "4",
                               "--output", str(tmp_path), "--json"])
    rows = report["results"]
    assert [(r["method"], r["seed"]) for r in rows] == [("reg_only", 3), ("seg_only", 3), ("reg_only", 4),
                                                        ("seg_only", 4)]
    assert (tmp_path / "seed4" / "seg_only" / "results.json").exists()
    reg = torch.tensor([r["reg_dice"] for r in rows if r["method"] == "reg_only"], dtype=torch.float64)
    assert reg[0] != reg[1]  # another seed: other subjects, another initialisation
    summary = {entry["method"]: entry for entry in report["summary"]}
    assert summary["reg_only"]["reg_dice_mean"] == pytest.approx(reg.mean().item())
    assert summary["reg_only"]["reg_dice_sd"] == pytest.approx(reg.std().item())
    assert summary["reg_only"]["seg_dice_mean"] is None and summary["seg_only"]["seeds"] == 2
    assert report["paired"] == []  # no joint run: nothing to pair
    assert main(["compare", *TINY_FLAGS, "--methods", "reg_only,seg_only", "--seeds", "3", "4",
                 "--output", str(tmp_path)]) == 0  # resumes the finished runs, prints the table
    table = capsys.readouterr().out
    assert "| method | reg Dice: seed 3 | seed 4 | mean ± sd |" in table
    assert f"{reg.mean().item():.3f} ± {reg.std().item():.3f}" in table
    assert "minus" not in table  # no joint run: nothing to pair


def test_paired_differences_per_seed_mean_sd_t_p_and_seeds_ahead():
    from deepatlas.run import paired_differences, seeds_table

    def row(method, seed, reg, seg):
        return {"method": method, "seed": seed, "reg_dice": reg, "seg_dice": seg}
    rows = [row("reg_only", 0, 0.60, None), row("seg_only", 0, None, 0.40), row("joint", 0, 0.62, 0.60),
            row("reg_only", 1, 0.50, None), row("seg_only", 1, None, 0.50), row("joint", 1, 0.49, 0.45),
            row("reg_only", 2, 0.70, None), row("seg_only", 2, None, float("nan")), row("joint", 2, 0.73, 0.70)]
    reg, seg = paired_differences(rows)  # no pair for a score a method lacks (reg_only's seg, seg_only's reg)
    assert (reg["score"], reg["baseline"], reg["seeds"], reg["ahead"]) == ("reg_dice", "reg_only", [0, 1, 2], 2)
    assert reg["differences"] == pytest.approx([0.02, -0.01, 0.03])
    # by hand: m = 0.04 / 3; sd = sqrt(((0.02 - m)^2 + (-0.01 - m)^2 + (0.03 - m)^2) / 2); t = m / (sd / sqrt 3)
    assert (reg["mean"], reg["sd"], reg["t"]) == pytest.approx((0.0133333, 0.0208167, 1.1094004), rel=1e-5)
    assert (seg["baseline"], seg["seeds"], seg["ahead"]) == ("seg_only", [0, 1], 1)  # seed 2's NaN left out
    assert (seg["mean"], seg["sd"], seg["t"]) == pytest.approx((0.075, 0.1767767, 0.6), rel=1e-5)
    # two-sided p by the closed forms of Student's t: 2 df, p = 1 - t / sqrt(t^2 + 2); 1 df, p = 1 - 2 atan(t) / pi
    assert reg["p"] == pytest.approx(1 - 1.1094004 / math.sqrt(1.1094004 ** 2 + 2), rel=1e-5)
    assert seg["p"] == pytest.approx(1 - 2 * math.atan(0.6) / math.pi, rel=1e-5)
    one_seed = paired_differences(rows[:3])[0]
    assert one_seed["t"] is None and one_seed["p"] is None  # one seed: no spread
    table = seeds_table(rows)
    assert "joint minus reg_only, reg Dice: +0.020 / -0.010 / +0.030; mean +0.013 ± 0.021, paired t 1.11 " \
           "(2 df, two-sided p 0.383); ahead on 2 of 3 seeds" in table
    assert "joint minus seg_only, seg Dice: +0.200 / -0.050; mean +0.075 ± 0.177, paired t 0.60 " \
           "(1 df, two-sided p 0.656)" in table


def test_compare_preset_is_the_demos_settings_under_the_flags():
    from deepatlas.cli import config_from_args
    from deepatlas.demo import PRESETS, demo_config
    args = build_parser().parse_args(["compare", "--preset", "default", "--lambda-a", "0.5", "--output", "x"])
    config = config_from_args(args, PRESETS[args.preset])
    assert config == dataclasses.replace(demo_config("x", "default"), lambda_a=0.5)
    args = build_parser().parse_args(["compare", "--preset", "default", "--lambda-a-reg", "0.1", "--output", "x"])
    assert config_from_args(args, PRESETS[args.preset]).lambda_a_reg == 0.1


def test_cli_choices_equal_the_modules_that_define_them():
    from deepatlas import cli, inference
    assert cli.SPACES == inference.SPACES and cli.DDF_FORMATS == inference.DDF_FORMATS


def test_every_preset_is_a_flag_and_default_differs_from_gncc_in_its_losses_and_seg_widths():
    from deepatlas.cli import PRESET_NAMES
    from deepatlas.demo import PRESETS, demo_config
    assert set(PRESET_NAMES) == set(PRESETS)
    default, gncc = demo_config("x", "default"), demo_config("x", "gncc")
    assert (default.similarity, default.lambda_r, default.grad_clip) == ("lncc", 0.3, 3.0)
    assert (gncc.similarity, gncc.lambda_r, gncc.grad_clip) == ("ncc", 1.0, 0.0)
    assert (default.seg_channels, gncc.seg_channels) == ((8, 16, 32, 64), (4, 8, 16, 32))
    assert dataclasses.replace(gncc, similarity="lncc", lambda_r=0.3, grad_clip=3.0,
                               seg_channels=(8, 16, 32, 64)) == default
    assert build_parser().parse_args(["demo", "--preset", "gncc"]).preset == "gncc"
    assert build_parser().parse_args(["demo"]).preset == "default"


def test_each_demo_setting_has_its_own_default_folder():
    """A run resumes only with its own settings: `demo --quick` after `demo` must not meet the default's checkpoints."""
    from deepatlas.cli import default_demo_output
    assert default_demo_output("default", "synthetic") == Path("deepatlas-demo")
    assert default_demo_output("quick", "synthetic") == Path("deepatlas-demo-quick")
    assert default_demo_output("gncc", "mni") == Path("deepatlas-demo-gncc-mni")
    assert default_demo_output("default", "mni") == Path("deepatlas-demo-mni")
    assert build_parser().parse_args(["demo", "--quick"]).output is None


def test_compare_json_has_one_entry_per_method(compared):
    output, report = compared
    methods = [r["method"] for r in report["results"]]
    assert methods == ["reg_only", "seg_only", "joint"]
    by = {r["method"]: r for r in report["results"]}
    assert by["reg_only"]["seg_dice"] is None and by["seg_only"]["reg_dice"] is None
    for key in ("reg_dice", "seg_dice", "folding_pct", "seconds", "peak_mem_mb"):
        assert isinstance(by["joint"][key], float), key
    assert 0 <= by["joint"]["reg_dice"] <= 1 and 0 <= by["joint"]["seg_dice"] <= 1
    for method in methods:
        folder = output / method
        assert {"model.pt", "checkpoint_latest.pt", "metrics.csv", "metrics.json", "results.json"} <= \
            {p.name for p in folder.iterdir()}


def test_evaluate_reproduces_the_training_runs_numbers(compared, capsys):
    output, report = compared
    evaluated = run_json(capsys, ["evaluate", str(output), "--json"])["results"]
    trained = {r["method"]: r for r in report["results"]}
    assert sorted(r["method"] for r in evaluated) == sorted(trained)
    for row in evaluated:
        for key in ("reg_dice", "seg_dice", "folding_pct"):
            if trained[row["method"]][key] is None:
                assert row[key] is None
            else:
                assert row[key] == pytest.approx(trained[row["method"]][key], abs=1e-6)


def _edited_model(model, folder, **config_changes):
    """A copy of a trained model.pt, in ``folder``, whose stored config differs in ``config_changes``."""
    from deepatlas.checkpoint import load_checkpoint, save_checkpoint
    state = load_checkpoint(model)
    state["config"].update(config_changes)
    save_checkpoint(folder / "model.pt", state)
    return folder


def test_evaluate_a_segmentation_model_with_one_test_image(compared, capsys, tmp_path):
    """As training's own evaluation: one test image is enough for segmentation Dice (a pair for registration)."""
    from deepatlas.inference import evaluate_runs
    output, _ = compared
    seg_only = _edited_model(output / "seg_only" / "model.pt", tmp_path / "a", num_test=1)
    (row,) = run_json(capsys, ["evaluate", str(seg_only), "--json"])["results"]
    assert row["method"] == "seg_only" and 0 < row["seg_dice"] <= 1
    joint = _edited_model(output / "joint" / "model.pt", tmp_path / "b", num_test=1)
    (row,) = run_json(capsys, ["evaluate", str(joint), "--json"])["results"]
    assert 0 < row["seg_dice"] <= 1 and row["reg_dice"] is None
    reg_only = _edited_model(output / "reg_only" / "model.pt", tmp_path / "c", num_test=1)
    with pytest.raises(ValueError, match="1 labelled test image.*evaluating reg_only needs 2"):
        evaluate_runs(reg_only)


def test_a_model_trained_under_fp16_on_a_gpu_loads_on_the_cpu(compared, tmp_path):
    """fp16 autocast needs CUDA for training; inference runs in float32 and must load such a model anywhere."""
    from deepatlas.inference import load_model
    output, _ = compared
    model = load_model(_edited_model(output / "joint" / "model.pt", tmp_path, amp="fp16", device="cuda"), "cpu")
    assert model.seg_net(torch.rand(1, 1, *TINY["shape"])).dtype == torch.float32
    assert model.config.amp == "none" and model.device == torch.device("cpu")


def test_label_map_inverse_keeps_background_and_the_smallest_merged_label():
    """Outputs go back to the original label values; a map that folds labels into background (or merges two
    labels into one class) writes background as 0 and a merged class as its smallest original label."""
    from types import SimpleNamespace

    from deepatlas.inference import _original_labels
    classes = np.array([0, 1, 2, 0, 2])
    label_map = {42: 0, 0: 0, 2: 1, 41: 2, 3: 0, 43: 2}
    written = _original_labels(classes, SimpleNamespace(label_map=label_map))
    np.testing.assert_array_equal(written, [0, 2, 41, 0, 41])
    np.testing.assert_array_equal(_original_labels(classes, SimpleNamespace(label_map=None)), classes)


def _write_subject(folder, name, seed, label=True):
    from deepatlas.data import save_nifti, synthetic_subjects
    subject = synthetic_subjects(1, shape=TINY["shape"], num_classes=4, seed=seed)[0]
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    save_nifti(folder / f"{name}.nii.gz", subject.image, affine)
    if label:
        save_nifti(folder / f"{name}_label.nii.gz", subject.label, affine)
    return affine


def test_register_writes_niftis_with_the_fixed_affine(compared, capsys, tmp_path):
    output, _ = compared
    _write_subject(tmp_path, "moving", 11)
    affine = _write_subject(tmp_path, "fixed", 12, label=False)
    written = run_json(capsys, ["register", str(tmp_path / "moving.nii.gz"), str(tmp_path / "fixed.nii.gz"),
                                "--model", str(output / "joint" / "model.pt"), "--moving-label",
                                str(tmp_path / "moving_label.nii.gz"), "--output", str(tmp_path / "out"), "--json"])
    assert set(written) == {"warped", "ddf", "jacobian", "warped_label"}
    for key, path in written.items():
        image = nib.load(path)
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert image.shape[:3] == TINY["shape"]
    assert nib.load(written["ddf"]).shape == (*TINY["shape"], 3)
    labels = np.asarray(nib.load(written["warped_label"]).dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    det = np.asarray(nib.load(written["jacobian"]).dataobj)
    assert np.isfinite(det).all()


def test_segment_writes_a_label_map(compared, capsys, tmp_path):
    output, _ = compared
    affine = _write_subject(tmp_path, "image", 13, label=False)
    written = run_json(capsys, ["segment", str(tmp_path / "image.nii.gz"), "--model", str(output / "joint"),
                                "--output", str(tmp_path / "seg.nii.gz"), "--json"])
    image = nib.load(written["segmentation"])
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert np.issubdtype(image.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1, 2, 3}


def test_train_with_config_file_and_flag_override(tmp_path, capsys):
    config = {**TINY, "shape": list(TINY["shape"]), "method": "reg_only", "reg_pretrain_steps": 3,
              "joint_rounds": 0, "num_test": 2}
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is valid YAML
    report = run_json(capsys, ["train", "--config", str(tmp_path / "run.yaml"), "--reg-pretrain-steps", "5",
                               "--output", str(tmp_path / "run"), "--no-progress", "--json"])
    assert report["results"][0]["steps"] == 5
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,phase,kind")


def test_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "nope.nii.gz"), "--model", str(tmp_path)]) == 2
    assert f"{tmp_path}/model.pt does not exist" in capsys.readouterr().err


def test_models_whose_method_left_the_network_untrained_are_refused(compared, tmp_path, capsys):
    """reg_only never trains F_S (segment would write one class everywhere), seg_only never trains F_R (register
    would write the identity)."""
    output, _ = compared
    _write_subject(tmp_path, "image", 14, label=False)
    image = str(tmp_path / "image.nii.gz")
    assert main(["segment", image, "--model", str(output / "reg_only"), "--output", str(tmp_path / "s.nii.gz")]) == 2
    assert "method 'reg_only', which leaves its segmentation network untrained; use a model trained with one " \
           "of ['joint', 'seg_only']" in capsys.readouterr().err
    assert main(["register", image, image, "--model", str(output / "seg_only"), "--output", str(tmp_path / "r")]) == 2
    assert "leaves its registration network untrained" in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists() and not (tmp_path / "r").exists()
    assert main(["segment", image, "--model", str(output), "--output", str(tmp_path / "s.nii.gz")]) == 2
    assert "holds no model.pt but the runs" in capsys.readouterr().err  # a compare folder: names its runs


def test_output_paths_are_checked_before_any_work(compared, tmp_path, capsys):
    output, _ = compared
    _write_subject(tmp_path, "image", 15, label=False)
    image, model = str(tmp_path / "image.nii.gz"), str(output / "joint")
    assert main(["register", image, image, "--model", model, "--output", str(tmp_path / "out.nii.gz")]) == 2
    assert "is a folder that receives several files" in capsys.readouterr().err
    (tmp_path / "notes").write_text("a file")
    assert main(["register", image, image, "--model", model, "--output", str(tmp_path / "notes")]) == 2
    assert "notes exists and is not a folder" in capsys.readouterr().err
    assert main(["segment", image, "--model", model, "--output", f"{image}/seg.nii.gz"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["segment", image, image.replace("image", "other"), "--model", model, "--output", image]) == 2
    assert "is a file name; with 2 images give a folder" in capsys.readouterr().err


def test_mistyped_flags_are_errors_in_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--reg-pretrain-step", "5"])  # not an abbreviation of --reg-pretrain-steps
    error = capsys.readouterr().err
    assert "usage: deepatlas train" in error and "unrecognized arguments: --reg-pretrain-step 5" in error
    with pytest.raises(SystemExit):
        main(["register", "a", "b", "--model", "m", "--moving-labels", "x"])
    assert "usage: deepatlas register" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the typo is named, not the required flag it left missing
        main(["segment", "a", "--modle", "m"])
    error = capsys.readouterr().err
    assert "usage: deepatlas segment" in error and "unrecognized arguments: --modle m" in error
    with pytest.raises(SystemExit):
        main(["segment", "a"])
    error = capsys.readouterr().err
    assert "the following arguments are required: --model" in error
    assert "usage: deepatlas segment" in error and "[--model" not in error  # still shown as required
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    help_text = capsys.readouterr().out
    assert "--model MODEL" in help_text and "[--model" not in help_text


def test_info_and_bench_json(capsys):
    info = run_json(capsys, ["info", "--json"])
    assert info["cpu_kernels"] is True and "devices" in info
    bench = run_json(capsys, ["bench", "--size", "12", "--repeats", "1", "--json"])
    assert len(bench["results"]) == 4 and all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in bench["results"])


def test_every_subcommand_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "train", "compare", "evaluate", "register", "segment", "bench", "info"}
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_console_script_demo_quick_json(tmp_path):
    """The installed `deepatlas` entry point (or `python -m deepatlas.cli`), --quick, --json parses."""
    result = subprocess.run([sys.executable, "-m", "deepatlas.cli", "--log-level", "WARNING", "demo", "--quick",
                             "--json", "--no-progress", "--output", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [r["method"] for r in report["results"]] == ["reg_only", "seg_only", "joint"]
    figures = {p.name for p in (tmp_path / "demo" / "figures").iterdir()}
    assert {"registration.png", "deformation_grid.png", "jacobian.png", "curves_joint.png"} <= figures
    assert len(list((tmp_path / "demo" / "data" / "images").iterdir())) == 3
    assert torch.load(tmp_path / "demo" / "joint" / "model.pt", weights_only=True)["num_classes"] >= 2


def test_torchrun_two_processes_train_what_one_process_trains(tmp_path, capsys):
    """The documented DDP command end to end on the CPU (gloo): `torchrun --nproc_per_node=2 -m deepatlas.cli
    train` writes the files one process writes, prints one report, and trains the same networks as one process
    with the same global batch."""
    flags = [*TINY_FLAGS, "--method", "joint", "--batch-size", "2", "--seg-norm", "instance", "--json"]
    single = run_json(capsys, ["train", *flags, "--output", str(tmp_path / "single")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "deepatlas.cli", "--log-level", "WARNING", "train", *flags, "--output", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, result.stdout  # rank 0 only
    ddp = reports[0]["results"][0]
    assert ddp["steps"] == single["results"][0]["steps"]
    for score in ("reg_dice", "seg_dice", "folding_pct"):
        assert ddp[score] == pytest.approx(single["results"][0][score], abs=1e-3), score
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in
                                                                          (tmp_path / "single").iterdir())
    models = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("single", "ddp")]
    for net in ("reg_net", "seg_net"):
        for key, value in models[0][net].items():
            torch.testing.assert_close(models[1][net][key], value, rtol=1e-4, atol=1e-6, msg=f"{net}.{key}")


def test_train_and_evaluate_on_a_nifti_manifest(tmp_path, capsys):
    """User data: a CSV manifest with train / test splits, 2 of 4 training images labelled."""
    rows = ["image,label,split"]
    for i in range(6):
        _write_subject(tmp_path, f"s{i}", 20 + i)
        split = "test" if i >= 4 else "train"
        label = f"s{i}_label.nii.gz" if i in (0, 1, 4, 5) else ""
        rows.append(f"s{i}.nii.gz,{label},{split}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    flags = [f for f in TINY_FLAGS if f != "--no-progress"]
    report = run_json(capsys, ["train", *flags, "--no-progress", "--data", str(tmp_path / "data.csv"),
                               "--num-labelled", "-1", "--output", str(tmp_path / "run"), "--json"])
    joint = report["results"][0]
    assert joint["method"] == "joint" and 0 <= joint["reg_dice"] <= 1 and 0 <= joint["seg_dice"] <= 1
    assert len(list((tmp_path / "run" / "data_cache").iterdir())) == 6  # preprocessed once, reused by evaluate
    evaluated = run_json(capsys, ["evaluate", str(tmp_path / "run"), "--json"])["results"][0]
    assert evaluated["seg_dice"] == pytest.approx(joint["seg_dice"], abs=1e-6)
    # The same two test images listed elsewhere (another manifest, any split; a folder): the same scores.
    (tmp_path / "other.csv").write_text("image,label\ns4.nii.gz,s4_label.nii.gz\ns5.nii.gz,s5_label.nii.gz\n")
    for name in ("s4", "s5"):
        for kind, file in (("images", f"{name}.nii.gz"), ("labels", f"{name}_label.nii.gz")):
            (tmp_path / "folder" / kind).mkdir(parents=True, exist_ok=True)
            os.link(tmp_path / file, tmp_path / "folder" / kind / f"{name}.nii.gz")
    for source in ("other.csv", "folder"):
        elsewhere = run_json(capsys, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / source),
                                      "--json"])["results"][0]
        for key in ("seg_dice", "reg_dice", "folding_pct"):
            assert elsewhere[key] == pytest.approx(evaluated[key], abs=1e-9)
        assert elsewhere["data"] == str(tmp_path / source)
    (tmp_path / "unlabelled.csv").write_text("image\ns2.nii.gz\n")
    for source, message in ((tmp_path / "unlabelled.csv", "no labelled image"), ("synthetic", "folder or a manifest")):
        assert main(["evaluate", str(tmp_path / "run"), "--data", str(source)]) == 2
        assert message in capsys.readouterr().err


def test_validation_images_are_scored_at_every_checkpoint(tmp_path, capsys):
    """Split "val" images (labelled) are scored at each checkpoint into metrics rows of kind "val"; they take no
    part in training or in the test scores."""
    rows = ["image,label,split"]
    for i, split in enumerate(["train", "train", "train", "val", "val", "test", "test"]):
        _write_subject(tmp_path, f"s{i}", 30 + i)
        rows.append(f"s{i}.nii.gz,s{i}_label.nii.gz,{split}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    report = run_json(capsys, ["train", *TINY_FLAGS, "--data", str(tmp_path / "data.csv"), "--num-labelled", "1",
                               "--checkpoint-every", "5", "--output", str(tmp_path / "run"), "--json"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    validation = [row for row in metrics if row["kind"] == "val"]
    steps = report["results"][0]["steps"]
    assert [row["step"] for row in validation] == sorted({*range(5, steps + 1, 5), 4, 7, 9, steps})
    for row in validation:
        assert 0 <= row["val_reg_dice"] <= 1 and 0 <= row["val_seg_dice"] <= 1 and row["val_folding_pct"] >= 0
    trained = [row for row in metrics if row["kind"] != "val"]
    assert report["results"][0]["seconds"] == pytest.approx(sum(r["seconds"] * r["steps"] for r in trained))
