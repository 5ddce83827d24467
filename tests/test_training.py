"""The training loop: schedule, pair drawing, every loss decreasing, exact resume (in-process and after kill -9),
atomic checkpoints, DDP with 2 gloo processes equal to one process with the same global batch."""

import dataclasses
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

import deepatlas_cuda as da
from deepatlas.checkpoint import (CheckpointError, atomic_write, load_checkpoint, remove_stray_temporaries,
                                  save_checkpoint, temporary_file)
from deepatlas.config import TrainConfig
from deepatlas.distributed import end_process_group
from deepatlas.divergence import DivergenceGuard
from deepatlas import losses
from deepatlas.pairs import draw_batch, draw_indices, make_batch, step_generator
from deepatlas.schedule import REG, SEG_JOINT, SEG_SUPERVISED, phases, step_at, total_steps
from deepatlas.trainer import LATEST, Trainer
from training_helpers import replace, state_of, tiny_config, tiny_volumes


def assert_same_state(a, b, exact=True):
    for part in a:
        for key in a[part]:
            x, y = a[part][key], b[part][key]
            if isinstance(x, dict):
                for k in x:
                    if isinstance(x[k], torch.Tensor):
                        _close(x[k], y[k], exact, f"{part}.{key}.{k}")
            else:
                _close(x, y, exact, f"{part}.{key}")


def _close(x, y, exact, name):
    if exact:
        assert torch.equal(x, y), name
    else:
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


# ---- schedule and pairs ----------------------------------------------------------------------------------------


def test_schedule_joint_phases_and_alternation(tmp_path):
    config = tiny_config(tmp_path)
    names = [p.name for p in phases(config)]
    assert names == ["reg_pretrain", "seg_pretrain", "semi_da", "da"]
    kinds = [step_at(config, s)[1] for s in range(total_steps(config))]
    assert kinds[:6] == [REG] * 6 and kinds[6:10] == [SEG_SUPERVISED] * 4 and kinds[10:13] == [SEG_JOINT] * 3
    assert kinds[13:] == [REG, REG, REG, SEG_JOINT] * 2
    with pytest.raises(IndexError):
        step_at(config, total_steps(config))


@pytest.mark.parametrize("method", ["reg_only", "reg_anatomy", "seg_only"])
def test_baselines_get_the_joint_models_step_budget(tmp_path, method):
    joint = tiny_config(tmp_path)
    kinds = [step_at(joint, s)[1] for s in range(total_steps(joint))]
    baseline = replace(joint, method=method)
    base_kinds = [step_at(baseline, s)[1] for s in range(total_steps(baseline))]
    if method == "seg_only":
        assert base_kinds == [SEG_SUPERVISED] * (kinds.count(SEG_SUPERVISED) + kinds.count(SEG_JOINT))
    else:
        assert base_kinds == [REG] * kinds.count(REG)


def test_pairs_are_reproducible_and_respect_labels(tmp_path):
    config = tiny_config(tmp_path)
    volumes = tiny_volumes(config, labelled=1)
    a = draw_indices(volumes, SEG_JOINT, 64, step_generator(3, 7))
    b = draw_indices(volumes, SEG_JOINT, 64, step_generator(3, 7))
    assert torch.equal(a, b)
    assert (a[:, 0] != a[:, 1]).all()
    assert (volumes.labelled[a[:, 0]] | volumes.labelled[a[:, 1]]).all()
    supervised = draw_indices(volumes, SEG_SUPERVISED, 16, step_generator(0, 0))
    assert (supervised == 0).all()
    registration = draw_indices(volumes, REG, 256, step_generator(0, 1))
    assert len(set(map(tuple, registration.tolist()))) == 12  # every ordered pair of 4 images shows up


def test_ddp_shares_partition_the_global_batch(tmp_path):
    config = tiny_config(tmp_path, batch_size=4)
    volumes = tiny_volumes(config)
    whole = draw_batch(volumes, REG, 0, 5, 4, True, 0)
    halves = [draw_batch(volumes, REG, 0, 5, 4, True, 0, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h.moving for h in halves]), whole.moving)
    assert torch.equal(torch.cat([h.fixed_labels for h in halves]), whole.fixed_labels)
    with pytest.raises(ValueError, match="divisible"):
        draw_batch(volumes, REG, 0, 5, 3, True, 0, rank=0, world_size=2)


# ---- training ----------------------------------------------------------------------------------------------------


def _fixed_batch_losses(trainer, batches):
    """Each step kind's loss on fixed batches, without training."""
    out = {}
    for kind, batch in batches.items():
        with torch.no_grad():
            if kind == REG:
                _, parts = trainer.losses.registration(trainer.models, batch, "joint")
            elif kind == SEG_JOINT:
                parts = trainer.losses.segmentation(trainer.models, batch, lambda loss: None)
            else:
                _, parts = trainer.losses.supervised(trainer.models, batch)
        out.update({f"{kind}.{k}": v for k, v in parts.items() if k in ("loss", "sim", "anatomy", "supervised")})
    return out


AMP_CASES = [pytest.param("cpu", "none", id="cpu"), pytest.param("cpu", "bf16", id="cpu-bf16"),
             pytest.param("cuda", "fp16", id="cuda-fp16", marks=pytest.mark.cuda),
             pytest.param("cuda", "bf16", id="cuda-bf16", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device, amp", AMP_CASES)
def test_tiny_training_decreases_every_loss(tmp_path, device, amp):
    """Every loss decreases on fixed batches, in float32 and under autocast (bf16; fp16 with a gradient scaler on
    CUDA), where the networks run in reduced precision and the ops and losses in float32."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = tiny_config(tmp_path, num_train=3, flip=False, lr=3e-3, reg_pretrain_steps=20,
                         seg_pretrain_steps=20, semi_steps=8, joint_rounds=3, reg_per_seg=4, device=device, amp=amp)
    volumes = tiny_volumes(config, labelled=1)
    trainer = Trainer(config, volumes, config.num_classes, progress=False)
    batches = {kind: draw_batch(trainer.volumes, kind, 123, 0, 2, False, 0)
               for kind in (REG, SEG_JOINT, SEG_SUPERVISED)}
    before = _fixed_batch_losses(trainer, batches)
    trainer.fit()
    after = _fixed_batch_losses(trainer, batches)
    assert set(before) == set(after) and len(before) >= 7
    for key in before:
        assert after[key] < before[key], (key, before[key], after[key])
    assert trainer.step == total_steps(config)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert {row["phase"] for row in rows} == {"reg_pretrain", "seg_pretrain", "semi_da", "da"}
    assert all(row["peak_mem_mb"] > 0 and row["seconds"] > 0 for row in rows)
    with trainer.losses.autocast():
        ddf = trainer.reg_module(batches[REG].moving, batches[REG].fixed)
    assert ddf.dtype == {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")


@pytest.mark.parametrize("num_labelled, warned", [(6, True), (4, False), (-1, False)])
def test_asking_for_more_labelled_images_than_exist_warns(tmp_path, caplog, num_labelled, warned):
    from deepatlas.run import prepare_data
    config = tiny_config(tmp_path, num_train=4, num_labelled=num_labelled)
    with caplog.at_level(logging.WARNING, logger="deepatlas"):
        dataset = prepare_data(config)
    assert int(dataset.train.labelled.sum()) == 4
    messages = [r.getMessage() for r in caplog.records if "num_labelled" in r.getMessage()]
    assert (messages == ["num_labelled is 6 but only 4 training image(s) have a label map: using those"]) == warned


def test_registration_net_starts_at_identity(tmp_path):
    config = tiny_config(tmp_path)
    trainer = Trainer(config, tiny_volumes(config), config.num_classes, progress=False)
    volumes = trainer.volumes
    with torch.no_grad():
        ddf = trainer.reg_module(volumes.images[:1], volumes.images[1:2])
    assert ddf.abs().max() < 1e-3


@pytest.mark.parametrize("stop_at", [10, 7])  # a checkpoint step; a step inside a logging window (log_every 2)
def test_resume_equals_uninterrupted_training(tmp_path, stop_at):
    config = tiny_config(tmp_path / "a")
    volumes = tiny_volumes(config)
    full = Trainer(config, volumes, config.num_classes, progress=False).fit()

    interrupted = replace(config, output=str(tmp_path / "b"))
    stopped = Trainer(interrupted, volumes, config.num_classes, progress=False).fit(stop_at=stop_at)
    assert load_checkpoint(tmp_path / "b" / LATEST)["step"] == stop_at
    resumed = Trainer(interrupted, volumes, config.num_classes, progress=False)
    assert resumed.resume() and resumed.step == stop_at
    assert resumed.divergence.history == stopped.divergence.history != {}  # the jump check's loss history
    resumed.fit()
    assert_same_state(state_of(full), state_of(resumed))
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) != []
    strip = (lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb")} for r in rows])
    assert strip(full.metrics) == strip(resumed.metrics)


@pytest.mark.cuda
def test_resume_on_cuda(tmp_path):
    """The checkpoint is loaded onto the training device; the CPU random state in it must go back to the CPU."""
    config = tiny_config(tmp_path, device="cuda")
    volumes = tiny_volumes(config)
    Trainer(config, volumes, config.num_classes, progress=False).fit(stop_at=10)
    resumed = Trainer(config, volumes, config.num_classes, progress=False)
    assert resumed.resume() and resumed.step == 10
    resumed.fit()
    assert resumed.step == total_steps(config)


def test_resume_refuses_a_different_config(tmp_path):
    config = tiny_config(tmp_path)
    volumes = tiny_volumes(config)
    Trainer(config, volumes, config.num_classes, progress=False).fit(stop_at=5)
    changed = Trainer(replace(config, lambda_r=2.0), volumes, config.num_classes, progress=False)
    with pytest.raises(ValueError, match="lambda_r"):
        changed.resume()
    harmless = replace(config, num_workers=0, eval_pairs=5, log_every=1)  # what training computes is unchanged
    assert Trainer(harmless, volumes, config.num_classes, progress=False).resume()


def test_a_checkpoint_from_before_a_new_config_field_resumes(tmp_path):
    """A field added since the checkpoint was written counts as its default there: the run resumes, unless the
    current config sets the new field to something else."""
    config = tiny_config(tmp_path)
    volumes = tiny_volumes(config)
    Trainer(config, volumes, config.num_classes, progress=False).fit(stop_at=5)
    state = load_checkpoint(tmp_path / LATEST)
    del state["config"]["flip_label_pairs"]
    save_checkpoint(tmp_path / LATEST, state)
    assert Trainer(config, volumes, config.num_classes, progress=False).resume()
    paired = Trainer(replace(config, flip_label_pairs=[[1, 2]]), volumes, config.num_classes, progress=False)
    with pytest.raises(ValueError, match=r"flip_label_pairs: \[\] -> \[\[1, 2\]\]"):
        paired.resume()


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    """A real `deepatlas train` process killed with SIGKILL after a checkpoint, then run again: the final model
    equals the uninterrupted run's."""
    common = ["--shape", "16", "16", "16", "--num-train", "4", "--num-test", "2", "--num-classes", "4",
              "--reg-enc", "4", "8", "8", "8", "8", "--reg-dec", "8", "8", "8", "8", "4", "4",
              "--seg-channels", "4", "8", "8", "8", "--reg-pretrain-steps", "30", "--seg-pretrain-steps", "10",
              "--semi-steps", "5", "--joint-rounds", "4", "--reg-per-seg", "5", "--checkpoint-every", "4",
              "--log-every", "4", "--eval-pairs", "2", "--no-progress"]
    command = [sys.executable, "-m", "deepatlas.cli", "--log-level", "WARNING", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command + common + ["--output", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True)
    killed = subprocess.Popen(command + common + ["--output", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / LATEST
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if latest.exists() and load_checkpoint(latest)["step"] >= 12:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed; make it longer"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model.pt").exists()
    step_at_kill = load_checkpoint(latest)["step"]
    assert 12 <= step_at_kill < 70
    # A kill mid-write (the metrics follow each checkpoint) may leave a temporary file; the resumed run removes it.
    subprocess.run(command + common + ["--output", str(tmp_path / "killed")], check=True, env=env,
                   capture_output=True)
    assert not list((tmp_path / "killed").glob(".*.tmp"))
    a = load_checkpoint(tmp_path / "full" / "model.pt")
    b = load_checkpoint(tmp_path / "killed" / "model.pt")
    for net in ("reg_net", "seg_net"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_resume_removes_the_temporary_files_of_an_interrupted_write(tmp_path):
    """What a writer killed mid-write leaves (.<name>.<random>.tmp next to a checkpoint, the metrics, the model) is
    removed when the run starts again; other files in the folder are not touched."""
    config = tiny_config(tmp_path)
    stray = [tmp_path / f".{name}.k3x9a1.tmp" for name in (LATEST, "metrics.json", "model.pt")]
    kept = [tmp_path / "notes.tmp", tmp_path / ".other.k3x9a1.tmp", tmp_path / "metrics.json.tmp"]
    for path in stray + kept:
        path.write_bytes(b"partial")
    assert not Trainer(config, tiny_volumes(config), config.num_classes, progress=False).resume()
    assert [p.exists() for p in stray] == [False] * 3 and all(p.exists() for p in kept)


def test_stray_temporaries_are_recognised_by_the_names_temporary_file_gives(tmp_path):
    """The cleanups match mkstemp's real names (not only hand-made ones like those above): every temporary of the
    named files goes, the files themselves, other names and other suffixes stay."""
    stray = []
    for name in ("model.pt", "metrics.json"):
        handle, temporary = temporary_file(tmp_path / name)
        os.close(handle)
        stray.append(Path(temporary))
    handle, other_suffix = temporary_file(tmp_path / "model.pt", ".npz")
    os.close(handle)
    kept = [tmp_path / "model.pt", tmp_path / ".model.pt.tmp", tmp_path / ".model.ptx.ab12.tmp", Path(other_suffix)]
    for path in kept:
        path.touch()
    assert remove_stray_temporaries(tmp_path, ["model.pt", "metrics.json"]) == sorted(stray)
    assert all(path.exists() for path in kept)
    assert remove_stray_temporaries(tmp_path / "missing", ["model.pt"]) == []


def test_checkpoint_round_trip_and_weights_only(tmp_path):
    state = {"step": 3, "weights": torch.randn(4, 4), "nested": {"rng": torch.get_rng_state()}}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], state["weights"])
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / LATEST
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def write_half_then_die(handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_half_then_die)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]


def test_disk_full_is_a_clear_error_without_partial_files(tmp_path):
    import errno

    def no_space(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="no space left"):
        atomic_write(tmp_path / "x.pt", no_space)
    assert list(tmp_path.iterdir()) == []


def test_output_path_that_cannot_be_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path / "file" / "run" / "c.pt", {"step": 0})


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="not writable"):
            save_checkpoint(folder / "c.pt", {"step": 0})
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("code", ["EACCES", "EROFS"])
def test_refused_temporary_file_is_a_clear_error(tmp_path, monkeypatch, code):
    """The unwritable-folder path without relying on permissions (which root ignores): the OS refuses the
    temporary file, as it does for a read-only folder or file system."""
    import errno

    import deepatlas.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointError, match="not writable") as caught:
        save_checkpoint(tmp_path / "run" / "c.pt", {"step": 0})
    assert str(tmp_path / "run" / "c.pt") in str(caught.value)
    assert list((tmp_path / "run").iterdir()) == []


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_files_and_validation(tmp_path):
    (tmp_path / "c.yaml").write_text("method: seg_only\nshape: [32, 32, 48]\nlambda_a: 0.5\n")
    config = TrainConfig.load(tmp_path / "c.yaml")
    assert config.method == "seg_only" and config.shape == (32, 32, 48) and config.lambda_a == 0.5
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert TrainConfig.load(tmp_path / "c.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({"lamda_a": 1}))
    with pytest.raises(ValueError, match="lamda_a"):
        TrainConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.yaml").write_text("method: [unclosed")
    with pytest.raises(ValueError, match="broken.yaml"):
        TrainConfig.load(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match="config.method"):
        TrainConfig(method="joint_typo")
    with pytest.raises(ValueError, match="config.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="config.lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="config.lambda_r"):
        TrainConfig(lambda_r=float("nan"))
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(amp="fp16", device="cpu")


# ---- distributed -------------------------------------------------------------------------------------------------


def _ddp_fit(rank, output, result_file):
    config = tiny_config(output, batch_size=2, seg_norm="instance")
    trainer = Trainer(config, tiny_volumes(config), config.num_classes, progress=False).fit()
    if rank == 0:
        torch.save(state_of(trainer), result_file)


def _ddp_worker(rank, world_size, init_file, output, result_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        _ddp_fit(rank, output, result_file)  # the trainer lives in that frame only, so it is freed before the end
    finally:
        end_process_group()


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    config = tiny_config(tmp_path / "single", batch_size=2, seg_norm="instance")
    single = Trainer(config, tiny_volumes(config), config.num_classes, progress=False).fit()
    result = tmp_path / "ddp_state.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result)),
                                nprocs=2, join=True)
    assert_same_state(state_of(single), torch.load(result, weights_only=True), exact=False)
    assert (tmp_path / "ddp" / "model.pt").exists() is False  # only fit() ran; rank 0 wrote the checkpoint
    assert (tmp_path / "ddp" / LATEST).exists()


def _ddp_batch_norm_worker(rank, world_size, init_file, output):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        config = tiny_config(output, batch_size=2, seg_norm="batch")
        trainer = Trainer(config, tiny_volumes(config), config.num_classes, progress=False).fit()
        torch.save(dict(trainer.seg_module.named_buffers()), Path(output) / f"buffers{rank}.pt")
    finally:
        end_process_group()


def test_ddp_batch_norm_running_statistics_are_the_same_in_every_process(tmp_path):
    """Each process updates F_S's BatchNorm running statistics from its own share; they are averaged after every
    segmentation step, so the frozen F_S of the registration steps (stand-in labels) is one network."""
    torch.multiprocessing.spawn(_ddp_batch_norm_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                join=True)
    first, second = (torch.load(tmp_path / f"buffers{rank}.pt", weights_only=True) for rank in range(2))
    assert first.keys() == second.keys() and any("running_var" in name for name in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert all(first[n].abs().sum() > 0 for n in first if "running_mean" in n)  # the statistics were updated


def _ddp_diverging_fit(rank, output) -> str:
    """Rank 1's registration loss jumps 10^4-fold at step 33; returns the error the rank stopped with."""
    config = tiny_config(output, batch_size=2, seg_norm="instance", reg_pretrain_steps=40, checkpoint_every=10)
    trainer = Trainer(config, tiny_volumes(config), config.num_classes, progress=False)
    if rank == 1:
        _explode_registration_loss(trainer, from_step=33, factor=1e4)
    try:
        trainer.fit()
        return "finished without an error"
    except FloatingPointError as error:
        return str(error)


def _ddp_diverging_worker(rank, world_size, init_file, output, message_folder):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        (Path(message_folder) / f"rank{rank}.txt").write_text(_ddp_diverging_fit(rank, output))
    finally:
        end_process_group()


def test_ddp_one_diverging_process_stops_every_process(tmp_path):
    """When only rank 1's loss jumps, both ranks stop at the same step (no rank left waiting in an all-reduce,
    which the 60 s gloo timeout would turn into a different error) and the latest checkpoint predates the jump."""
    spawned = torch.multiprocessing.spawn(
        _ddp_diverging_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(tmp_path)),
        nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not spawned.join(timeout=5):
        if time.monotonic() > deadline:
            for process in spawned.processes:
                process.kill()
            pytest.fail("the DDP processes did not stop within 300 s")
    messages = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert "step 33 (reg_pretrain, reg): the loss jumped" in messages[1], messages[1]
    assert "step 33 (reg_pretrain, reg): another process's loss diverged" in messages[0], messages[0]
    assert load_checkpoint(tmp_path / "ddp" / LATEST)["step"] == 30


def test_sequential_segmentation_step_equals_the_joint_one(tmp_path):
    """With instance norm (no batch statistics), F_S on one image at a time gives the same gradients."""
    config = tiny_config(tmp_path, seg_norm="instance", batch_size=3)
    volumes = tiny_volumes(config, labelled=2)
    grads = []
    for sequential in (False, True):
        trainer = Trainer(replace(config, sequential_segmentation=sequential), volumes, config.num_classes,
                          progress=False)
        batch = draw_batch(volumes, SEG_JOINT, 0, 4, 3, True, 0)
        assert batch.moving_labelled.any() or batch.fixed_labelled.any()
        trainer.seg_opt.zero_grad()
        parts = trainer.losses.segmentation(trainer.models, batch, lambda loss: loss.backward())
        grads.append(([p.grad.clone() for p in trainer.seg_module.parameters()], parts))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert grads[0][1]["loss"] == pytest.approx(grads[1][1]["loss"], rel=1e-5)


def test_hard_anatomy_prediction_uses_the_argmax_label_map(tmp_path):
    """anatomy_prediction="hard": an unlabelled image of a registration step is stood in for by F_S's argmax (int64
    labels, the fused label path); "soft" and "weighted" by its probabilities. All give a finite anatomy term with a
    ddf gradient."""
    config = tiny_config(tmp_path, batch_size=2)
    volumes = tiny_volumes(config, labelled=1)
    batch = draw_batch(volumes, REG, 0, 4, 2, True, 0)
    for prediction in ("soft", "hard", "weighted"):
        trainer = Trainer(replace(config, anatomy_prediction=prediction), volumes, config.num_classes, progress=False)
        image = volumes.images[:1]
        stand_in = trainer.losses._stand_in(trainer.seg_module, image)
        probs = trainer.losses._predict(trainer.seg_module, image)
        if prediction == "hard":
            assert stand_in.dtype == torch.int64 and stand_in.shape == (1, 1, *config.shape)
            assert torch.equal(stand_in, probs.argmax(1, keepdim=True))
        else:
            assert torch.equal(stand_in, probs)
        loss, parts = trainer.losses.registration(trainer.models, batch, "joint")
        assert "anatomy" in parts and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in trainer.reg_module.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="anatomy_prediction"):
        tiny_config(tmp_path, anatomy_prediction="argmax")


def test_weighted_anatomy_prediction_weighs_each_voxel_by_the_confidence_of_the_stand_ins(tmp_path, monkeypatch):
    """anatomy_prediction="weighted": the registration anatomy term of a pair is the weighted Dice whose weight is
    F_S's confidence in the fixed image's stand-in times its confidence in the moving image's, warped; a manual
    segmentation has weight 1."""
    config = tiny_config(tmp_path, batch_size=1, anatomy_prediction="weighted")
    volumes = tiny_volumes(config, labelled=1)
    trainer = Trainer(config, volumes, config.num_classes, progress=False)
    batch = draw_batch(volumes, REG, 0, 4, 1, True, 0)
    ddf = torch.randn(1, 3, *config.shape) * 0.5
    # An untrained F_S is about equally unsure everywhere: stand-ins whose confidence varies from voxel to voxel.
    stand_in = {side: (torch.randn(1, config.num_classes, *config.shape) * 3).softmax(1)
                for side in ("moving", "fixed")}
    predictions = {batch.moving.data_ptr(): stand_in["moving"], batch.fixed.data_ptr(): stand_in["fixed"]}
    monkeypatch.setattr(trainer.losses, "_predict", lambda seg_module, image: predictions[image.data_ptr()])
    for moving_ok, fixed_ok in ((False, False), (True, False), (False, True)):
        flagged = dataclasses.replace(batch, moving_labelled=torch.tensor([moving_ok]),
                                      fixed_labelled=torch.tensor([fixed_ok]))
        source = batch.moving_labels if moving_ok else stand_in["moving"]
        target = batch.fixed_labels if fixed_ok else stand_in["fixed"]
        weight = torch.ones(1, 1, *config.shape)
        if not fixed_ok:
            weight = weight * losses.confidence(stand_in["fixed"])
        if not moving_ok:
            weight = weight * da.warp(losses.confidence(stand_in["moving"]), ddf, padding_mode="zeros")
        assert weight.std() > 0.05 * weight.mean()
        got, used = trainer.losses._registration_anatomy(trainer.seg_module, flagged, ddf, "joint")
        want = losses.weighted_anatomy_loss(source, ddf, target, weight, config.num_classes)
        assert used == 1
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, losses.anatomy_loss(source, ddf, target, config.num_classes))


@pytest.mark.parametrize("min_manual", [0, 1, 2])
def test_anatomy_min_manual_skips_pairs_with_fewer_manual_labels(tmp_path, min_manual):
    """anatomy_min_manual: a registration step's anatomy term counts only pairs with at least that many manual
    segmentations (0 = F_S stands in for both, the paper's)."""
    config = tiny_config(tmp_path, batch_size=2, anatomy_min_manual=min_manual)
    volumes = tiny_volumes(config, labelled=1)
    trainer = Trainer(config, volumes, config.num_classes, progress=False)
    batch = draw_batch(volumes, REG, 0, 4, 2, True, 0)
    for manual in (0, 1, 2):  # flags per pair: (moving, fixed) manual
        flags = torch.tensor([manual >= 1, manual >= 1]), torch.tensor([manual >= 2, manual >= 2])
        labelled = dataclasses.replace(batch, moving_labelled=flags[0], fixed_labelled=flags[1])
        _, parts = trainer.losses.registration(trainer.models, labelled, "joint")
        assert ("anatomy" in parts) == (manual >= min_manual)
    with pytest.raises(ValueError, match="anatomy_min_manual"):
        tiny_config(tmp_path, anatomy_min_manual=3)


def test_lambda_a_reg_weighs_the_anatomy_term_of_registration_steps_only(tmp_path):
    """lambda_a_reg replaces lambda_a in registration steps (None: lambda_a); 0 drops the term there."""
    config = tiny_config(tmp_path, batch_size=2, lambda_a=0.5)
    volumes = tiny_volumes(config, labelled=1)
    batch = draw_batch(volumes, REG, 0, 4, 2, True, 0)
    labelled = dataclasses.replace(batch, moving_labelled=torch.tensor([True, True]),
                                   fixed_labelled=torch.tensor([True, True]))
    losses_by_weight = {}
    for weight in (None, 0.0, 2.0):
        trainer = Trainer(replace(config, lambda_a_reg=weight), volumes, config.num_classes, progress=False)
        loss, parts = trainer.losses.registration(trainer.models, labelled, "joint")
        assert ("anatomy" in parts) == (weight != 0.0)
        losses_by_weight[weight] = loss.item(), parts
    base = losses_by_weight[0.0][0]  # similarity + lambda_r * smoothness, the same initial F_R in every run
    anatomy = losses_by_weight[2.0][1]["anatomy"]
    assert losses_by_weight[2.0][0] == pytest.approx(base + 2.0 * anatomy, rel=1e-5)
    assert losses_by_weight[None][0] == pytest.approx(base + 0.5 * anatomy, rel=1e-5)
    assert replace(config, lambda_a_reg=None).registration_anatomy_weight == 0.5
    with pytest.raises(ValueError, match="lambda_a_reg"):
        tiny_config(tmp_path, lambda_a_reg=-1.0)


def test_divergence_guard_flags_a_jump_above_both_the_ratio_and_the_floor():
    guard = DivergenceGuard(ratio=100, window=50, min_history=20, floor=10)
    for i in range(19):
        assert guard.check("reg", 0.1 + 0.01 * (i % 3)) is None
    assert guard.check("reg", 50.0) is None  # 19 earlier losses: too few to judge
    assert guard.check("reg", 5.0) is None  # 45x the median, but under the floor
    assert "jumped to 12" in guard.check("reg", 12.0)  # over 100x the median (0.11) and the floor
    assert guard.check("seg", 1e6) is None  # each key has its own history
    off = DivergenceGuard(ratio=0)
    assert all(off.check("reg", value) is None for value in [0.1] * 30 + [1e9])


@pytest.mark.parametrize("factor, message", [(1e4, "the loss jumped"), (float("nan"), "the loss is nan")])
def test_training_stops_at_a_diverging_loss_before_it_is_checkpointed(tmp_path, factor, message):
    """A registration loss that jumps 10^4-fold (or turns NaN) at step 33 stops the run with FloatingPointError;
    the latest checkpoint is the one from step 30, before the jump."""
    config = tiny_config(tmp_path, reg_pretrain_steps=40, checkpoint_every=10)
    trainer = Trainer(config, tiny_volumes(config), config.num_classes, progress=False)
    _explode_registration_loss(trainer, from_step=33, factor=factor)
    with pytest.raises(FloatingPointError, match=f"step 33 \\(reg_pretrain, reg\\): {message}.*diverged"):
        trainer.fit()
    assert load_checkpoint(tmp_path / LATEST)["step"] == 30
    resumed = Trainer(replace(config, divergence_ratio=0), tiny_volumes(config), config.num_classes,
                      progress=False)
    assert resumed.resume() and resumed.step == 30  # the check may be switched off on resume


def _explode_registration_loss(trainer, from_step, factor):
    """Multiply the trainer's registration loss by ``factor`` from step ``from_step`` on."""
    registration = trainer.losses.registration

    def exploding(models, batch, anatomy):
        loss, parts = registration(models, batch, anatomy)
        if trainer.step >= from_step:
            loss = loss * factor
            parts = {**parts, "loss": loss.item()}
        return loss, parts

    trainer.losses.registration = exploding


@pytest.mark.parametrize("kind", [REG, SEG_SUPERVISED, SEG_JOINT])
def test_grad_clip_bounds_every_steps_gradient_norm_and_reports_it(tmp_path, kind):
    """config.grad_clip: the network's gradient norm is clipped before the optimiser step (parts["grad_norm"] holds
    the norm before clipping); 0 (the default) leaves gradients alone and reports nothing."""
    volumes = tiny_volumes(tiny_config(tmp_path), labelled=2)
    phase = next(p for p in phases(tiny_config(tmp_path)) if p.kind == kind)  # reg_pretrain, seg_pretrain, semi_da
    norms = {}
    for clip in (0.0, 1e-3):
        trainer = Trainer(tiny_config(tmp_path, grad_clip=clip), volumes, 4, progress=False)
        parts = trainer._train_step(phase, kind)
        module = trainer.reg_module if kind == REG else trainer.seg_module
        norms[clip] = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
        if clip:
            assert parts["grad_norm"] == pytest.approx(norms[0.0].item(), rel=1e-4)  # the same step, unclipped
        else:
            assert "grad_norm" not in parts
    assert norms[0.0] > 1e-2 and norms[1e-3] == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(ValueError, match="config.grad_clip"):
        tiny_config(tmp_path, grad_clip=float("nan"))


def test_end_process_group_frees_what_a_failed_runs_frames_held(tmp_path):
    """end_process_group(tb) clears the locals of the traceback's finished frames and collects garbage before it
    destroys the group, so a DDP module held by a failed run's frames cannot keep the group alive into the
    interpreter's exit (where freeing it can abort the process)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    held = []

    def failing_run():
        module = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        held.append(weakref.ref(module))
        raise FloatingPointError("diverged")

    try:
        failing_run()
    except FloatingPointError as error:
        assert held[0]() is not None  # the frame still holds the module
        end_process_group(error.__traceback__)
        assert held[0]() is None
    assert not torch.distributed.is_initialized()


def test_logged_registration_dice_is_the_mean_over_the_pairs_used(tmp_path):
    """With manual labels only (reg_anatomy), a pair without both label maps adds nothing to the anatomy term; the
    logged Dice is the mean soft Dice of the pairs that have them, not diluted by the others."""
    config = tiny_config(tmp_path, method="reg_anatomy", batch_size=2)
    trainer = Trainer(config, tiny_volumes(config, labelled=2), config.num_classes, progress=False)
    batch = make_batch(trainer.volumes, torch.tensor([[0, 1], [2, 3]]), torch.zeros(2, dtype=torch.bool), 0)
    loss, parts = trainer.losses.registration(trainer.models, batch, "manual")
    with torch.no_grad():
        ddf = trainer.reg_module(batch.moving, batch.fixed)
        only_pair = losses.anatomy_loss(batch.moving_labels[:1], ddf[:1], batch.fixed_labels[:1], 4).item()
    assert parts["dice"] == pytest.approx(1 - only_pair, abs=1e-6)
    assert parts["anatomy"] == pytest.approx(only_pair / 2, abs=1e-6)  # the loss term: a share of the batch mean


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """Checkpoints, metrics, NIfTI outputs and figures are written to a temporary file and renamed; they must
    still get 0666 less the umask (others can read a run's results), not the temporary file's 0600."""
    import numpy as np
    from matplotlib.figure import Figure

    from deepatlas.data import save_nifti
    from deepatlas.figures import save_figure
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})
        atomic_write(tmp_path / "m.json", lambda handle: handle.write(b"[]"))
        save_nifti(tmp_path / "v.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
        save_figure(Figure(), tmp_path / "f.png")
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["c.pt", "m.json", "v.nii.gz", "f.png", "plain.txt"], 0o666 & ~umask)
