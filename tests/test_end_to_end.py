"""train -> checkpoint -> resume -> sample through the command line, on tiny settings."""
import json
import sys

import pytest
import torch

from ddpm import from_pretrained
from ddpm.checkpoint import ema_states, latest_checkpoint, load_training_state
from ddpm.cli import TRAIN_FLAGS, build_parser, main, train_config_from_args
from helpers import run_child

# The EMA averages from step 2 on (decay 0.8): a resume that rebuilt the EMA or lost its update count would differ.
TINY = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
        "--batch-size", "8", "--sample-every", "3", "--checkpoint-every", "2", "--quiet", "--lr", "1e-3",
        "--ema-warmup", "1", "--ema-decay", "0.8"]


def weights(run_dir):
    return load_training_state(latest_checkpoint(run_dir))["model"]


FLAG_VALUES = {  # one unusual value per train flag: each must land in its own config field
    "image_size": 24, "base_channels": 16, "channel_mults": (1, 2, 4), "bottleneck_mult": 3, "timesteps": 300,
    "beta_schedule": "cosine", "prediction": "v", "conditional": False, "channels": 3, "hflip": True, "batch_size": 6,
    "lr": 0.01, "warmup_steps": 9, "weight_decay": 0.5, "grad_clip": 0.25, "grad_accum": 2, "ema_decay": 0.9,
    "ema_warmup": 11, "guidance_dropout": 0.2, "snr_gamma": 5.0, "seed": 3, "out": "r", "steps": 7, "epochs": 2,
    "device": "cpu", "amp": "none", "compile": True, "num_workers": 2, "log_every": 13, "checkpoint_every": 17,
    "keep_checkpoints": 4, "sample_every": 19, "sampling_steps": 23, "guidance": 2.5, "val_every": 29, "val_size": 31,
    "max_bad_fraction": 0.5, "guide_fraction": 0.25, "cuda_graphs": "off", "time_limit": 37.0, "dist_timeout": 95.0,
    "ema_lengths": (0.04, 0.2), "ema_snapshot_every": 41, "eval_every": 43, "eval_n": 47, "eval_steps": 3,
    "keep_best": "accuracy", "tracker": ("tensorboard", "mlflow"),
}


def test_every_train_flag_reaches_its_config_field():
    assert set(FLAG_VALUES) == set(TRAIN_FLAGS)  # a new flag must be added here too
    argv = ["train", "photos", "--preset", "quickstart"]
    for flag, value in FLAG_VALUES.items():
        name = "--" + flag.replace("_", "-")
        if isinstance(value, bool):
            argv.append(name if value else "--no-" + flag.replace("_", "-"))
        else:
            argv += [name, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    config = train_config_from_args(build_parser().parse_args(argv))
    for flag, value in FLAG_VALUES.items():
        section, field = TRAIN_FLAGS[flag]
        assert getattr(getattr(config, section), field) == value, flag
    assert config.train.data == "photos"
    auto = train_config_from_args(build_parser().parse_args(["train", "mnist", "--num-workers", "auto"]))
    assert auto.runtime.num_workers is None


def test_many_options_train_resume_and_sample_end_to_end(tmp_path):
    """Cosine schedule, short T, v-prediction, min-SNR, flips, warm-up, pruning, workers, logging flags: one tiny
    run."""
    run = tmp_path / "run"
    options = ["--beta-schedule", "cosine", "--timesteps", "100", "--prediction", "v", "--snr-gamma", "5", "--hflip",
               "--warmup-steps", "2", "--weight-decay", "0", "--grad-clip", "0.5", "--log-every", "1",
               "--keep-checkpoints", "1", "--sampling-steps", "2", "--val-size", "16", "--val-every", "2",
               "--num-workers", "1", "--amp", "none", "--seed", "5", "--channels", "3", "--guidance", "2",
               "--device", "cpu", "--no-compile"]
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "4", *TINY, *options]) == 0
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt")] == ["step_00000004.pt"]  # pruned to the newest
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["diffusion"] == {**saved["diffusion"], "beta_schedule": "cosine", "timesteps": 100, "prediction": "v"}
    assert saved["model"]["in_channels"] == 3
    assert main(["train", "--resume", str(run), "--steps", "6", "--num-workers", "0", "--log-every", "2",
                 "--quiet"]) == 0
    state = load_training_state(latest_checkpoint(run))
    assert state["step"] == 6 and state["config"]["runtime"]["log_every"] == 2
    assert state["config"]["train"]["snr_gamma"] == 5
    out = tmp_path / "samples"
    assert main(["sample", str(run), "--out", str(out), "--labels", "1,2", "--sampler", "ddpm", "--quiet"]) == 0
    model, schedule, _ = from_pretrained(run, "cpu")
    assert schedule.prediction == "v" and len(schedule) == 100


@pytest.mark.parametrize("data,extra", [("mnist", ["--conditional"]), ("photos", [])])
def test_train_resume_sample(tmp_path, data, extra):
    run = tmp_path / "run"
    assert main(["train", data, "--out", str(run), "--steps", "4", *TINY, *extra]) == 0
    for name in ("latest", "config.json", "model/model.safetensors", "model/config.json"):
        assert (run / name).is_file(), name
    assert load_training_state(latest_checkpoint(run))["step"] == 4
    # resume to step 6 and compare with an uninterrupted 6-step run: bit-identical on CPU
    assert main(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", data, "--out", str(straight), "--steps", "6", *TINY, *extra]) == 0
    resumed, reference = weights(run), weights(straight)
    assert load_training_state(latest_checkpoint(run))["step"] == 6
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    ema_resumed, ema_straight = (ema_states(load_training_state(latest_checkpoint(r)))[0] for r in (run, straight))
    assert ema_resumed["num_updates"] == ema_straight["num_updates"] == 6
    assert all(torch.equal(ema_resumed["model"][k], ema_straight["model"][k]) for k in reference)
    # the EMA is an average, not a copy
    assert not torch.equal(ema_resumed["model"]["outc.weight"], resumed["outc.weight"])
    # sampling writes every image and a grid; conditional: one row per class
    out = tmp_path / "samples"
    sample_args = ["sample", str(run), "--out", str(out), "--sampler", "ddim", "--sampling-steps", "3", "--quiet",
                   "--process"]
    assert main(sample_args + (["--per-class", "2"] if extra else ["--n", "5"])) == 0
    pngs = sorted(p.name for p in out.glob("sample_*.png"))
    assert len(pngs) == (20 if extra else 5)
    assert (out / "grid.png").is_file() and (out / "process.gif").is_file()
    if extra:
        assert pngs[0].endswith("_class0.png") and pngs[-1].endswith("_class9.png")
    # tensorboard holds the promised tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_t_quarter1"} <= scalars
    assert "samples/ema" in acc.Tags()["images"]
    if data == "mnist":  # held-out digits exist: the validation loss is logged, at fixed noise
        assert {"val/loss", "val/loss_ema"} <= scalars
        # of two networks (bug caught: val/loss_ema computed on the raw weights, a copy of val/loss)
        raw, ema = ([e.value for e in acc.Scalars(tag)] for tag in ("val/loss", "val/loss_ema"))
        assert len(raw) == len(ema) >= 1 and raw != ema


def test_safetensors_export_round_trips(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "2", *TINY]) == 0
    model, schedule, config = from_pretrained(run, "cpu")
    assert config["model"]["num_classes"] == 10 and len(schedule) == 1000
    state = load_training_state(latest_checkpoint(run))
    from ddpm import UNet

    reference = UNet(model.config)
    reference.load_state_dict(ema_states(state)[0]["model"])
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), reference.eval()(x, t, y))


def test_errors_are_one_line_and_lose_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "photos", "--out", str(run), "--steps", "2", *TINY]) == 0
    before = (run / "latest").read_text()
    assert main(["train", "photos", "--out", str(run), "--steps", "2", *TINY]) == 2  # would overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert (run / "latest").read_text() == before
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--labels", "1"]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--n", "0"]) == 2
    assert main(["train", "photos", "--out", str(tmp_path / "x"), "--image-size", "12", "--steps", "1", "--quiet"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a sampling flag that no chosen sampler reads was dropped silently (ddpm took all T steps, DPM-Solver++ no eta,
    # DDIM no spacing); each is one line now, and a sweep in which some sampler reads it goes on
    for flags, words in ((["--sampler", "ddpm", "--sampling-steps", "10"], "--sampling-steps: the ddpm sampler"),
                         (["--eta", "0.5"], "--eta: the dpmpp2m sampler does not read it"),
                         (["--sampler", "ddim", "--spacing", "logsnr"], "--spacing: the ddim sampler")):
        assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--n", "1", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "it is for --sampler" in err[0]
    assert not (tmp_path / "s").exists()


def test_a_bad_value_is_one_line_before_any_note_on_the_weights(tmp_path, capsys):
    # bug caught: values checked only once the model was opened, after the note that a young run's post-hoc default
    # cannot be rebuilt: two lines for one bad value (benchmarks/flag_fuzz.py counted 133 such cases)
    import warnings

    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")  # every note is kept, not only the first from each place
        assert main(["sample", str(run), "--out", str(tmp_path / "ok"), "--n", "1", "--quiet"]) == 0
        assert any("cannot be rebuilt well" in str(note.message) for note in notes)  # what a bad value must not follow
        for flags in (["--device", "nonsense"], ["--eta", "-1"], ["--dynamic-threshold", "2"], ["--n", "0"],
                      ["--per-class", "0"], ["--guide", str(tmp_path / "nothing")], ["--guide-ema-length", "0"],
                      ["--ema-length", "0.5"]):
            notes.clear()
            capsys.readouterr()
            assert main(["sample", str(run), "--out", str(tmp_path / "s"), *flags]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("ddpm sample: error:") and not notes, (flags, err, notes)


def test_python_dash_m_help_shows_real_defaults_only(tmp_path):
    # one interpreter runs `python -m ddpm COMMAND --help` for each command (runpy is what -m does): an import of
    # torch per command cost 5 s each
    driver = ("import runpy, sys\n"
              "for command in ('train', 'sample', 'eval'):\n"
              "    sys.argv = ['ddpm', command, '--help']\n"
              "    try:\n"
              "        runpy.run_module('ddpm', run_name='__main__', alter_sys=True)\n"
              "    except SystemExit as done:\n"
              "        assert done.code in (0, None)\n"
              "    print('=' * 8, flush=True)\n")
    child = run_child([sys.executable, "-c", driver], tmp_path, "help")
    assert child.returncode == 0, child.tail()
    outputs = child.stdout()
    train, sample, evaluate = outputs.split("=" * 8 + "\n")[:3]
    assert "--guidance-dropout" in train and "--resume" in train
    assert "(default: None)" not in train and "(default 64)" in train and "(default 0.995)" in train
    for out in (sample, evaluate):
        assert "--sampler" in out and "(default: None)" not in out and "(default: False)" not in out


@pytest.mark.slow
def test_resume_with_epochs_extends_a_run_defined_by_steps(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "3", *TINY,
                 "--batch-size", "1000"]) == 0
    # 4,000 training digits / batch 1000 = 4 steps per epoch: --epochs 2 means 8 steps, crossing an epoch boundary
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    state = load_training_state(latest_checkpoint(run))
    runtime = state["config"]["runtime"]
    assert state["step"] == 8 and runtime["epochs"] == 2 and runtime["steps"] is None
    straight = tmp_path / "straight"
    assert main(["train", "mnist", "--conditional", "--out", str(straight), "--epochs", "2", *TINY,
                 "--batch-size", "1000"]) == 0
    reference = weights(straight)
    assert all(torch.equal(state["model"][k], reference[k]) for k in reference)  # exact across the epoch boundary


def test_the_old_name_of_the_previews_step_count_still_works_with_a_note(tmp_path, capsys):
    # The bug it catches (issue 34): renaming train's --sample-steps to --sampling-steps (the name sample and eval
    # use) breaking the scripts that still say --sample-steps, or taking it silently.
    from helpers import TINY_TRAIN_ARGS

    assert main(["train", "mnist", "--out", str(tmp_path / "run"), "--steps", "1", "--sample-steps", "7",
                 "--val-every", "0", *TINY_TRAIN_ARGS]) == 0
    assert "--sample-steps is now --sampling-steps" in capsys.readouterr().err
    assert load_training_state(latest_checkpoint(tmp_path / "run"))["config"]["runtime"]["sample_steps"] == 7


@pytest.mark.parametrize("preset", ["landscape64", "cifar10-64"])
def test_the_seed_presets_train_v_prediction_with_min_snr_5_and_flags_still_override(preset):
    # bug caught: the seed presets left on the plain eps loss, which lost to v + min-SNR-5 on the 8,000-step colour
    # run (benchmarks/RESULTS.md, "Colour"); or a preset's objective that a flag can no longer override
    config = train_config_from_args(build_parser().parse_args(["train", "some/folder", "--preset", preset]))
    assert (config.diffusion.prediction, config.train.snr_gamma) == ("v", 5.0)
    assert (config.model.image_size, config.train.lr) == (64, 3e-4)
    seed_objective = train_config_from_args(build_parser().parse_args(
        ["train", "some/folder", "--preset", preset, "--prediction", "eps"]))
    assert seed_objective.diffusion.prediction == "eps"
