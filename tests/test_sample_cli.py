"""`ddpm sample`: every flag end to end on a tiny model; bad values get one line; other errors keep their traceback."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DiffusionConfig, UNet, save_pretrained
from ddpm.cli import main
from ddpm.errors import DdpmError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = tiny_config(num_classes=3)
    save_pretrained(UNet(config), folder, DiffusionConfig(timesteps=20), {"class_names": ["a", "b", "c"]})
    return folder


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("sample_*.png"))}


def assert_same_images(folder, expected):
    """`folder` holds exactly the PNGs named in `expected` (none missing: an empty folder fails), pixel for pixel."""
    got = pixels(folder)
    assert list(got) == list(expected), f"{folder}: {list(got)}"
    for name, image in got.items():
        assert np.array_equal(image, expected[name]), name


def test_every_sampling_option_runs_and_seeds_reproduce(model_dir, tmp_path):
    options = ["--sampler", "ddim", "--sampling-steps", "4", "--eta", "0.5", "--clip-x0", "--dynamic-threshold", "0.99",
               "--guidance", "2", "--guidance-rescale", "0.7", "--guidance-interval", "0.2", "0.8", "--seed", "3",
               "--batch-size", "2", "--device", "cpu", "--quiet"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["sample", str(model_dir), "--out", str(a), "--labels", "0,1,2", *options]) == 0
    assert main(["sample", str(model_dir), "--out", str(b), "--labels", "0,1,2", *options]) == 0
    first = pixels(a)
    assert list(first) == ["sample_00000_class0.png", "sample_00001_class1.png", "sample_00002_class2.png"]
    assert_same_images(b, first)  # same seed, same images
    other_seed = [("4" if previous == "--seed" else value) for previous, value in zip([None] + options, options)]
    assert main(["sample", str(model_dir), "--out", str(c), "--labels", "0,1,2", *other_seed]) == 0
    other = pixels(c)
    assert list(other) == list(first) and any(not np.array_equal(first[k], v) for k, v in other.items())
    # batch b is seeded by (seed, b): the first batch does not depend on how many batches follow
    d = tmp_path / "d"
    assert main(["sample", str(model_dir), "--out", str(d), "--labels", "0,1", *options]) == 0
    assert_same_images(d, {k: first[k] for k in list(first)[:2]})


def test_dpm_solver_per_class_and_process(model_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--out", str(out), "--per-class", "2", "--sampler", "dpmpp2m",
                 "--sampling-steps", "3", "--spacing", "logsnr", "--process", "--quiet"]) == 0
    assert len(pixels(out)) == 6 and (out / "process.png").is_file() and (out / "process.gif").is_file()
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "n"), "--n", "4", "--sampler", "ddpm",
                 "--quiet"]) == 0
    assert [k.split("_class")[1] for k in pixels(tmp_path / "n")] == ["0.png", "1.png", "2.png", "0.png"]  # balanced


def test_no_ema_samples_the_raw_weights_of_the_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    tiny = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
            "--batch-size", "8", "--sample-every", "0", "--val-every", "0", "--ema-warmup", "0", "--ema-decay", "0.99",
            "--lr", "1e-2", "--quiet"]
    assert main(["train", "mnist", "--conditional", "--out", str(run), "--steps", "3", "--timesteps", "20", *tiny]) == 0
    # dynamic thresholding keeps the untrained model's x0 inside [-1, 1] without saturating every pixel
    common = ["--labels", "1", "--sampler", "ddim", "--sampling-steps", "2", "--dynamic-threshold", "0.9", "--quiet"]
    assert main(["sample", str(run), "--out", str(tmp_path / "ema"), *common]) == 0
    assert main(["sample", str(run), "--out", str(tmp_path / "raw"), "--no-ema", *common]) == 0
    assert main(["sample", str(run), "--out", str(tmp_path / "ema2"), "--ema", *common]) == 0
    ema, raw, ema2 = (pixels(tmp_path / d)["sample_00000_class1.png"] for d in ("ema", "raw", "ema2"))
    assert np.array_equal(ema, ema2) and not np.array_equal(ema, raw)


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "nan"], "finite"),  # wrote blank images and exited 0 before
    (["--guidance", "inf"], "finite"),
    (["--sampling-steps", "0"], "steps must be >= 1"),  # quietly became 50 before
    (["--eta", "-1"], "eta"),
    (["--dynamic-threshold", "1.5"], "dynamic_threshold"),
    (["--guidance-rescale", "2"], "guidance_rescale"),
    (["--guidance-interval", "0.8", "0.2"], "guidance_interval"),
    (["--batch-size", "0"], "--batch-size"),
    (["--per-class", "0"], "--per-class"),
])
def test_bad_sampling_values_get_one_line_and_write_nothing(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("*.png")) if out.exists() else True


def test_per_class_under_the_limit_but_over_it_for_the_models_classes_is_one_line(model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    # bug caught: only --per-class itself checked against the limit (before the model says how many classes it has),
    # so 4,000,000 per class of 3 classes went on to draw 12 million images instead of one line
    import ddpm.cli.sample as cli

    def drew(*args, **kwargs):
        raise AssertionError("it went on to draw the images")

    monkeypatch.setattr(cli, "sample_batches", drew)
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "s"), "--per-class", "4000000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "12,000,000 images asked for, more than the 10,000,000" in err and len(err.strip().splitlines()) == 1, err


def test_only_package_errors_become_one_line_anything_else_keeps_its_traceback(model_dir, tmp_path, monkeypatch):
    import ddpm.cli.sample as cli

    def broken(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli, "cmd_sample", broken)
    with pytest.raises(ValueError, match="a bug"):  # before, main() turned every ValueError into exit 2
        main(["sample", str(model_dir), "--out", str(tmp_path / "s")])

    def bad_input(args):
        raise DdpmError("bad input")

    monkeypatch.setattr(cli, "cmd_sample", bad_input)
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "s")]) == 2
    assert json.loads((model_dir / "config.json").read_text())["class_names"] == ["a", "b", "c"]  # only read


def test_per_class_labels_give_each_class_its_own_run_of_k():
    # bug caught: the classes cycled (0, 1, 2, 0, 1, 2) instead of K in a row: a grid of K a row then mixes classes
    from ddpm.pipeline import per_class_labels

    assert per_class_labels(2, 3).tolist() == [0, 0, 1, 1, 2, 2]


def test_each_batch_draws_its_own_noise(tiny_config):
    # bug caught: the batch index left out of the generator's seed: every batch the same noise, so n > batch size
    # writes copies (and eval scores duplicates); the images of one run compared with each other
    from ddpm import NoiseSchedule, SamplingConfig
    from ddpm.pipeline import batch_generator, sample_all

    draws = [torch.randn(4, generator=batch_generator("cpu", 0, batch)) for batch in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    model = UNet(tiny_config()).eval()
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=20))
    images = sample_all(model, schedule, n=4, batch_size=2, seed=0, sampling=SamplingConfig(sampler="ddim", steps=2))
    assert not torch.allclose(images[:2], images[2:])
