"""Distributed equivalence, crash safety, and bad input: each with a clear error and nothing lost."""
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import ModelConfig, RunConfig, RuntimeConfig, TrainConfig
from ddpm.checkpoint import CheckpointError, ema_states, latest_checkpoint, load_training_state
from ddpm.cli import main
from ddpm.monitor import LossLogger
from ddpm.training import TrainingDiverged, train
from helpers import TINY_TRAIN_ARGS, Child, checkpoint_step, free_port, logged

TINY_MODEL = dict(image_size=8, base_channels=8, channel_mults=(1, 2), bottleneck_mult=2, time_embed_dim=16)
TINY = TINY_TRAIN_ARGS


RUNTIME_FIELDS = {f for f in RuntimeConfig.__dataclass_fields__}


def tiny_run(out, **fields):
    """A tiny conditional MNIST run; `fields` go to the recipe or the runtime section by name."""
    recipe = dict(data="mnist", conditional=True, batch_size=8, lr=1e-3, ema_warmup=0)
    runtime = dict(out_dir=str(out), steps=3, sample_every=0, val_every=0)
    for name, value in fields.items():
        (runtime if name in RUNTIME_FIELDS else recipe)[name] = value
    return RunConfig(model=ModelConfig(**TINY_MODEL), train=TrainConfig(**recipe), runtime=RuntimeConfig(**runtime))


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    counted = []
    LossLogger.add = counting_add(counted)  # this process ends with the run
    result = train(tiny_run(out, device="cpu", log_every=1), progress=False)
    torch.save(result.model.state_dict(), Path(result_dir) / f"rank{rank}.pt")
    (Path(result_dir) / f"images{rank}.json").write_text(json.dumps(counted))


def counting_add(counted: list, real_add=LossLogger.add):
    """LossLogger.add that also appends the images each training step hands the log's images/s to `counted`."""
    def add(self, per_sample, t, images):
        counted.append(images)
        return real_add(self, per_sample, t, images)

    return add


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
                                join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the ranks identical
    counted = []
    monkeypatch.setattr(LossLogger, "add", counting_add(counted))
    single = train(tiny_run(tmp_path / "single", device="cpu", log_every=1), progress=False).model.state_dict()
    # train/images_per_sec counts the global batch's images: 8 a step on one process and on two (4 each), not 4
    assert json.loads((tmp_path / "images0.json").read_text()) == counted == [8, 8, 8]
    for k in single:
        torch.testing.assert_close(rank0[k], single[k], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "ddp" / "latest").is_file()  # rank 0 wrote the checkpoint
    # the gradient is the global batch's (AdamW would hide a gradient halved by two ranks; --grad-clip would not)
    norms, single_norms = (logged(tmp_path / name, "train/grad_norm") for name in ("ddp", "single"))
    assert sorted(norms) == [1, 2, 3] and sorted(single_norms) == [1, 2, 3]
    assert np.allclose([norms[s] for s in (1, 2, 3)], [single_norms[s] for s in (1, 2, 3)], rtol=1e-4)


def test_only_the_global_rank_0_is_the_main_process():
    # bug caught: each node's local rank 0 taken as main: two nodes both write the checkpoints, the EMA, model/ and
    # the trackers of one run folder
    from ddpm.distributed import DistributedContext

    assert DistributedContext(rank=0, world_size=4, local_rank=0).is_main
    assert not DistributedContext(rank=2, world_size=4, local_rank=0).is_main
    assert not DistributedContext(rank=1, world_size=4, local_rank=1).is_main


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = train(tiny_run(tmp_path / "a"), progress=False).model.state_dict()
    accumulated = train(tiny_run(tmp_path / "b", grad_accum=4), progress=False).model.state_dict()
    for k in one:
        torch.testing.assert_close(accumulated[k], one[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_kill_minus_9_mid_training_leaves_a_loadable_checkpoint_and_resume_is_exact(tmp_path):
    """Three kill -9s, each landing while training runs (after a new checkpoint appeared since that start), then
    a resume to the end: the weights, the EMA and its update count equal an uninterrupted run's."""
    run = tmp_path / "run"
    steps = 30
    # the EMA averages from step 3: a rebuilt or reset EMA would differ
    ema = ["--ema-warmup", "2", "--ema-decay", "0.8"]
    first = [sys.executable, "-m", "ddpm", "train", "mnist", "--conditional", "--out", str(run), "--steps", str(steps),
             "--checkpoint-every", "1", *ema, *TINY]
    kills = []
    for attempt in range(3):
        started_at = checkpoint_step(run)
        cmd = first if attempt == 0 else [sys.executable, "-m", "ddpm", "train", "--resume", str(run), "--quiet"]
        proc = Child(cmd, tmp_path, f"attempt{attempt}")
        deadline = time.time() + 120
        while checkpoint_step(run) <= started_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed mid-training\n" + proc.tail()
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        state = load_training_state(latest_checkpoint(run))  # always loadable
        assert started_at < state["step"] < steps  # this kill landed after new progress, before the end
        kills.append(state["step"])
    assert kills == sorted(kills) and len(set(kills)) == 3
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", "mnist", "--conditional", "--out", str(straight), "--steps", str(steps),
                 "--checkpoint-every", "1",
                 *ema, *TINY]) == 0
    a, b = load_training_state(latest_checkpoint(run)), load_training_state(latest_checkpoint(straight))
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])  # bit-identical on CPU
    ema_a, ema_b = ema_states(a)[0], ema_states(b)[0]
    assert all(torch.equal(ema_a["model"][k], ema_b["model"][k]) for k in ema_b["model"])
    assert ema_a["num_updates"] == ema_b["num_updates"] == steps
    assert not any(torch.equal(ema_a["model"][k], a["model"][k]) for k in a["model"] if k.endswith("weight"))
    # the post-hoc EMA's snapshots too: every one rewritten after a kill holds the uninterrupted run's bits
    kept = {p.name: p.read_bytes() for p in (run / "ema_snapshots").iterdir()}
    assert kept == {p.name: p.read_bytes() for p in (straight / "ema_snapshots").iterdir()} and len(kept) == 2 * steps


def test_a_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "2", *TINY]) == 0
    before = latest_checkpoint(run)
    before_bytes = before.read_bytes()
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 4
    assert "No space left" in capsys.readouterr().err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert latest_checkpoint(run) == before and before.read_bytes() == before_bytes
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no half-written leftovers
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 0


def test_nan_loss_skips_then_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    import ddpm.training as training

    real = training.training_losses
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        per_sample, t = real(*args, **kwargs)
        if calls["n"] == 3 or calls["n"] >= 6:
            per_sample = per_sample * float("nan")
        return per_sample, t

    monkeypatch.setattr(training, "training_losses", sometimes_nan)
    with pytest.warns(UserWarning, match="non-finite"):
        with pytest.raises(TrainingDiverged, match="last good checkpoint is step 5"):
            train(tiny_run(tmp_path / "run", steps=50, checkpoint_every=1, log_every=1, max_nonfinite_steps=3),
                  progress=False)
    state = load_training_state(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "4", "--checkpoint-every", "2",
                 *TINY]) == 0
    newest = latest_checkpoint(run)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_training_state(newest)
    with pytest.warns(UserWarning, match="older checkpoint"):
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert load_training_state(latest_checkpoint(run))["step"] == 4


def err(capsys):
    return capsys.readouterr().err


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "--out", str(tmp_path / "r1"), "--steps", "1", *TINY]) == 2
    assert "no image files" in err(capsys)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    assert main(["train", str(junk), "--out", str(tmp_path / "r2"), "--steps", "1", *TINY]) == 2
    assert "no image files" in err(capsys)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((9, 9, 3), i * 30, np.uint8)).save(flat / f"{i}.png")
    assert main(["train", str(flat), "--conditional", "--out", str(tmp_path / "r3"), "--steps", "1", *TINY]) == 2
    assert "subfolder per class" in err(capsys)
    assert main(["train", "mnist", "--out", str(tmp_path / "r4"), "--image-size", "20", "--steps", "1", "--quiet"]) == 2
    assert "multiple of 8" in err(capsys)
    assert main(["train", "mnist", "--out", str(tmp_path / "r5"), "--lr", "-1", "--steps", "1", "--quiet"]) == 2
    assert "lr" in err(capsys)
    assert main(["train", "mnist", "--out", str(tmp_path / "r5"), "--guidance-dropout", "1.5", "--steps", "1",
                 "--quiet"]) == 2
    assert "guidance-dropout" in err(capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "mnist", "--out", str(afile), "--steps", "1", *TINY]) == 2
    assert "is a file" in err(capsys)
    assert afile.read_text() == "x"
    # a class folder with a single image is fine
    classes = tmp_path / "classes"
    for name, count in (("a", 7), ("b", 1)):
        (classes / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((9, 9), i * 30, np.uint8)).save(classes / name / f"{i}.png")
    assert main(["train", str(classes), "--conditional", "--out", str(tmp_path / "r6"), "--steps", "1", *TINY]) == 0


def test_bad_sampling_and_model_inputs(tmp_path, capsys):
    cond, uncond = tmp_path / "cond", tmp_path / "uncond"
    assert main(["train", "mnist", "--conditional", "--out", str(cond), "--steps", "1", *TINY]) == 0
    assert main(["train", "mnist", "--out", str(uncond), "--steps", "1", *TINY]) == 0
    out = str(tmp_path / "s")
    assert main(["sample", str(cond), "--out", out, "--labels", "3,10", "--quiet"]) == 2
    assert "out of range" in err(capsys)
    assert main(["sample", str(cond), "--out", out, "--labels=-1", "--quiet"]) == 2
    assert "out of range" in err(capsys)
    assert main(["sample", str(uncond), "--out", out, "--labels", "1", "--quiet"]) == 2
    assert "unconditional" in err(capsys)
    assert main(["sample", str(uncond), "--out", out, "--guidance", "2", "--quiet"]) == 2
    assert "unconditional" in err(capsys)
    assert main(["sample", str(uncond), "--out", out, "--n", "0", "--quiet"]) == 2
    assert "--n" in err(capsys)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["sample", str(uncond), "--out", str(afile), "--quiet"]) == 2
    assert "is a file" in err(capsys) and afile.read_text() == "keep me"
    # a model folder without config.json, and weights that do not fit the config
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((uncond / "model" / "model.safetensors").read_bytes())
    assert main(["sample", str(bare), "--out", out, "--quiet"]) == 2
    assert "no config.json" in err(capsys)
    config = (uncond / "model" / "config.json").read_text()
    (uncond / "model" / "config.json").write_text(config.replace('"base_channels": 8', '"base_channels": 16'))
    assert main(["sample", str(uncond), "--out", out, "--quiet"]) == 2
    assert "do not fit" in err(capsys)
    assert main(["train", "--resume", str(cond), "--image-size", "16", "--quiet"]) == 2
    assert "--image-size" in err(capsys)


def one_line(capsys) -> str:
    """stderr of the last command, asserted to be exactly one line (no traceback)."""
    text = capsys.readouterr().err.strip()
    assert len(text.splitlines()) == 1, text
    return text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_last_tracebacks_are_one_line_errors(tmp_path, capsys):
    """Each of these ended in a traceback (ValueError, RuntimeError, JSONDecodeError) before."""
    run = tmp_path / "run"
    assert main(["train", "mnist", "--out", str(run), "--steps", "1", "--device", "cuda", *TINY]) == 2
    assert "CUDA is not available" in one_line(capsys) and not run.exists()
    assert main(["train", "mnist", "--out", str(run), "--steps", "1", "--device", "gpu0", *TINY]) == 2
    assert "not a device" in one_line(capsys)
    assert main(["train", "mnist", "--out", str(run), "--steps", "1", *TINY]) == 0
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--device", "cuda", "--quiet"]) == 2
    assert "CUDA is not available" in one_line(capsys)
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--n", "-3", "--quiet"]) == 2
    assert "--n must be >= 1, got -3" in one_line(capsys)
    assert main(["prepare", "mnist", "--out", str(tmp_path / "p"), "--image-size", "0", "--quiet"]) == 2
    assert "--image-size must be between 1 and 8192 pixels, got 0" in one_line(capsys) and not (tmp_path / "p").exists()
    huge = "1000000000000"  # found by benchmarks/flag_fuzz.py: each tried to allocate terabytes
    for flag, message in (("--timesteps", "timesteps="), ("--base-channels", "widest layer"),
                          ("--bottleneck-mult", "widest layer"), ("--image-size", "image_size=")):
        assert main(["train", "mnist", "--out", str(tmp_path / "t"), flag, huge, "--steps", "1", "--quiet"]) == 2
        assert message in one_line(capsys), flag
    for flag in ("--n", "--per-class"):
        assert main(["sample", str(run), "--out", str(tmp_path / "s"), flag, huge, "--quiet"]) == 2
        assert "more than the 10,000,000" in one_line(capsys), flag
    assert main(["eval", str(run), "--out", str(tmp_path / "e"), "--n", huge, "--no-fid", "--quiet"]) == 2
    assert "more than the 10,000,000" in one_line(capsys)
    assert main(["prepare", "mnist", "--out", str(tmp_path / "p"), "--image-size", huge, "--quiet"]) == 2
    assert "between 1 and 8192" in one_line(capsys)
    for argv in (["train", "mnist", "--out=", "--steps", "1"], ["sample", str(run), "--out="]):  # not the cwd
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "empty string" in capsys.readouterr().err
    weights = (run / "model" / "model.safetensors").read_bytes()
    (run / "model" / "config.json").write_text("{not json")
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "config.json" in one_line(capsys)
    assert (run / "model" / "model.safetensors").read_bytes() == weights  # nothing written is lost


def test_compile_option_trains_the_same_weights_and_samples_the_same_images(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_cheaply(model, **options):  # the wiring under test, not inductor's C++ code generation (minutes on CPU)
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_cheaply)
    eager = train(tiny_run(tmp_path / "eager"), progress=False).model.state_dict()
    assert compiled == []
    state = train(tiny_run(tmp_path / "compiled", compile=True), progress=False).model.state_dict()
    assert compiled == ["UNet"]
    assert state.keys() == eager.keys()  # checkpoints keep the plain parameter names
    for k in eager:
        torch.testing.assert_close(state[k], eager[k], atol=1e-5, rtol=1e-4)
    assert load_training_state(latest_checkpoint(tmp_path / "compiled"))["model"].keys() == eager.keys()
    # --compile and --device say how and where a run continues, so --resume takes them (and records them)
    assert main(["train", "--resume", str(tmp_path / "eager"), "--steps", "4", "--compile", "--device", "cpu",
                 "--quiet"]) == 0
    assert compiled == ["UNet", "UNet"]
    resumed = load_training_state(latest_checkpoint(tmp_path / "eager"))
    runtime = resumed["config"]["runtime"]
    assert resumed["step"] == 4 and runtime["device"] == "cpu" and runtime["compile"]
    # a run moved from a GPU: its noise generator state (CUDA's Philox, 16 bytes) cannot seed a CPU generator
    path = latest_checkpoint(tmp_path / "eager")
    resumed["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(resumed, path)
    with pytest.warns(UserWarning, match="another kind of device"):
        # the runtime saved with the run carries over (compile would stay on); --no-compile turns it off
        assert main(["train", "--resume", str(tmp_path / "eager"), "--steps", "5", "--device", "cpu", "--no-compile",
                     "--quiet"]) == 0
    assert load_training_state(latest_checkpoint(tmp_path / "eager"))["step"] == 5

    args = ["--per-class", "1", "--sampler", "ddim", "--sampling-steps", "3", "--quiet"]
    assert main(["sample", str(tmp_path / "compiled"), "--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["sample", str(tmp_path / "compiled"), "--out", str(tmp_path / "fast"), "--compile", *args]) == 0
    assert compiled == ["UNet", "UNet", "UNet"]
    plain, fast = (np.asarray(Image.open(tmp_path / d / "grid.png"), dtype=int) for d in ("plain", "fast"))
    assert np.abs(plain - fast).max() <= 1  # same images up to a rounding of the 8-bit pixels


def test_unreadable_files_are_replaced_reported_and_past_a_threshold_stop_the_run(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((9, 9, 3), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "05.png").write_bytes(b"not a png")  # found only when first loaded
    run = tmp_path / "run"
    # the whole folder per step
    tiny = [a if a != "8" or TINY[i - 1] != "--batch-size" else "12" for i, a in enumerate(TINY)]
    assert main(["train", str(folder), "--out", str(run), "--steps", "2", *tiny]) == 0
    assert (run / "bad_files.txt").read_text().split() == [str(folder / "05.png")]
    assert "1 unreadable image file" in capsys.readouterr().out
    for i in range(11):
        (folder / f"{i:02d}.png").write_bytes(b"broken")
    assert main(["train", str(folder), "--out", str(tmp_path / "run2"), "--steps", "2", *tiny]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "00.png" in err and len(err.strip().splitlines()) == 1


def test_ddpm_warnings_print_as_one_line_and_other_libraries_keep_their_format():
    # The bug it catches: a warning a user must read (a fallback from CUDA graphs, a skipped file, a skipped
    # step) printed as Python's two lines with a source file path, or the CLI's format leaking out of main().
    import warnings

    from ddpm.cli import one_line_warnings
    from ddpm.errors import DdpmWarning

    default = warnings.formatwarning
    with one_line_warnings("train"):
        ours = warnings.formatwarning(DdpmWarning("CUDA graphs need a CUDA device"), DdpmWarning, "/x/t.py", 3, "s")
        theirs = warnings.formatwarning(UserWarning("deprecated"), UserWarning, "/x/lib.py", 7, "src")
    assert ours == "ddpm train: warning: CUDA graphs need a CUDA device\n"
    assert "lib.py:7" in theirs and warnings.formatwarning is default


def test_a_folder_with_checkpoints_but_no_latest_pointer_is_a_run_and_its_newest_checkpoint_is_used(tmp_path):
    # bugs caught: a run whose `latest` file is missing (deleted, or the crash came before it was written) taken for
    # an empty folder, so a new run overwrites it; without `latest`, the oldest checkpoint used instead of the newest
    from ddpm.config import ConfigError
    from ddpm.run_setup import check_new_run_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    check_new_run_dir(run)  # an empty checkpoints/ is no run yet
    for step in (2, 10, 4):
        (run / "checkpoints" / f"step_{step:08d}.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_new_run_dir(run)
    assert latest_checkpoint(run).name == "step_00000010.pt"
