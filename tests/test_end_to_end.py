"""train -> checkpoint -> resume -> sample through the command line, on tiny settings."""
import subprocess
import sys

import pytest
import torch

from ddpm import from_pretrained
from ddpm.checkpoint import latest_checkpoint, load_training_state
from ddpm.cli import build_parser, main, train_config_from_args

TINY = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
        "--batch-size", "8", "--sample-every", "3", "--checkpoint-every", "2", "--quiet", "--lr", "1e-3"]


def weights(run_dir):
    return load_training_state(latest_checkpoint(run_dir))["model"]


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["train", "photos", "--out", "r", "--preset", "quickstart", "--lr", "0.01",
                                      "--guidance-dropout", "0.2", "--channel-mults", "1,2,4", "--ema-decay", "0.9",
                                      "--image-size", "24", "--no-conditional", "--steps", "7", "--seed", "3",
                                      "--grad-accum", "2", "--val-every", "0"])
    config = train_config_from_args(args)
    assert config.train.data == "photos" and config.train.out_dir == "r"
    assert config.train.lr == 0.01 and config.train.p_uncond == 0.2 and config.train.ema_decay == 0.9
    assert config.model.channel_mults == (1, 2, 4) and config.model.image_size == 24
    assert config.train.conditional is False and config.train.steps == 7 and config.train.seed == 3
    assert config.train.grad_accum == 2 and config.train.val_every == 0
    assert config.train.batch_size == 64  # from the preset, not overridden
    assert config.model.base_channels == 32


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
    # sampling writes every image and a grid; conditional: one row per class
    out = tmp_path / "samples"
    sample_args = ["sample", str(run), "--out", str(out), "--sampler", "ddim", "--sampling-steps", "3", "--quiet", "--process"]
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


def test_safetensors_export_round_trips(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "2", *TINY]) == 0
    model, schedule, config = from_pretrained(run, "cpu")
    assert config["model"]["num_classes"] == 10 and len(schedule) == 1000
    state = load_training_state(latest_checkpoint(run))
    from ddpm import UNet

    reference = UNet(model.config)
    reference.load_state_dict(state["ema"]["model"])
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


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "ddpm", "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--guidance-dropout" in out and "--resume" in out
