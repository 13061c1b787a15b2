"""`ddpm eval` and its parts on tiny random models: splits, classifier (accuracy, sensitivity to intensity),
validation loss, model-call counts, the sweep, its CSV and plot, resuming, errors."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DiffusionConfig, NoiseSchedule, UNet, save_pretrained
from ddpm.classifier import classifier_for, predict, train_classifier
from ddpm.cli import main
from ddpm.config import SamplingConfig
from ddpm.data import load_dataset, validation_set
from ddpm.diffusion import validation_loss
from ddpm.eval_report import format_table, quality_lines, quality_plot_png, sweep_csv, write_sweep_files
from ddpm.evaluation import model_calls_per_image, real_sets
from ddpm.files import to_uint8
from ddpm.metrics import class_accuracy, frechet_distance_of_features

SHORT = DiffusionConfig(timesteps=50)


def make_run(folder, tiny_config, num_classes=None, data="mnist"):
    """A run folder as training leaves it (model/ export + config.json naming the data), with random weights."""
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=num_classes))
    save_pretrained(model, folder / "model", SHORT, {"step": 7})
    (folder / "config.json").write_text(json.dumps({"train": {"data": data}}))
    return folder


def pixel_rows(images):
    return {bytes(row) for row in images.flatten(1).numpy()}


def test_mnist_floor_is_held_out_and_the_classifier_trains_on_the_training_digits():
    real = real_sets("mnist", 8, 1, 10, n=50, ref_n=300)
    assert real.floor.shape == (50, 1, 8, 8) and real.reference.shape == (300, 1, 8, 8)
    assert real.floor.dtype == torch.uint8
    train = pixel_rows(to_uint8(load_dataset("mnist", 8, split="train").dataset.tensors[0]))
    holdout = pixel_rows(to_uint8(load_dataset("mnist", 8, split="holdout").dataset.tensors[0]))
    # the classifier: all 4,000 training digits (which include the reference); its accuracy: the 1,000 held out
    assert len(real.classifier_images) == 4000 and pixel_rows(real.classifier_images) == train
    assert pixel_rows(real.reference) <= train and pixel_rows(real.unseen_images) == holdout
    # the floor: fresh digits neither model trained on, drawn across all classes (not the first classes in file order)
    assert pixel_rows(real.floor) <= holdout and not pixel_rows(real.floor) & train
    assert set(real.floor_labels.tolist()) == set(range(10))
    # the reference does not move with n (its cached features stay valid)
    assert torch.equal(real_sets("mnist", 8, 1, 10, n=20, ref_n=300).reference, real.reference)
    # the floor is capped at the held-out split's size
    assert len(real_sets("mnist", 8, 1, 10, n=5000, ref_n=300).floor) == 1000


def test_real_sets_without_a_holdout_keep_the_floor_from_the_classifier(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        (tmp_path / f"class{k}").mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"class{k}" / f"{i}.png")
    real = real_sets(str(tmp_path), 8, 3, 3, n=100, ref_n=100)
    floor, reference, trained, unseen = (pixel_rows(s) for s in (real.floor, real.reference, real.classifier_images,
                                                                 real.unseen_images))
    assert len(floor) == len(unseen) == 12 and len(trained) == 36 and len(reference) == 36  # 48 = 12 + 36
    assert floor == unseen and not floor & trained and not floor & reference
    assert len(floor | trained) == 48
    assert "never the floor" in real.notes["classifier"]


@pytest.fixture(scope="module")
def digit_classifier():
    images, labels = load_dataset("mnist", 8, split="train", conditional=True).dataset.tensors
    return train_classifier(to_uint8(images), labels, 10, steps=300, seed=0)


def test_class_accuracy_is_high_for_real_labels_and_chance_for_shuffled_ones(digit_classifier):
    images, labels = load_dataset("mnist", 8, split="holdout", conditional=True).dataset.tensors  # never seen
    logits, features = predict(digit_classifier, to_uint8(images))
    assert features.shape == (1000, 128)
    assert class_accuracy(logits, labels) > 0.75
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert 0.05 < class_accuracy(logits, shuffled) < 0.16


def brighter(images, factor):
    return (images.float() * factor).round().clamp(0, 255).to(torch.uint8)


def gamma(images, exponent):
    return (255 * (images.float() / 255) ** exponent).round().clamp(0, 255).to(torch.uint8)


def test_classifier_features_see_brightness_and_gamma(digit_classifier):
    """Over-guided digits look like real ones made brighter: the features must tell them from real digits.
    Measured here: 14.8x, 16.2x and 8.2x the floor; trained on classes alone (intensity_weight=0) the same
    network gave 4.5x, 3.3x and 2.7x, which these bounds reject."""
    train = to_uint8(load_dataset("mnist", 8, split="train").dataset.tensors[0])
    holdout = to_uint8(load_dataset("mnist", 8, split="holdout").dataset.tensors[0])
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    floor_images, fresh_images = holdout[order[:500]], holdout[order[500:]]
    reference_images = train[torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:1000]]
    reference = predict(digit_classifier, reference_images)[1]

    def distance(images):
        return frechet_distance_of_features(predict(digit_classifier, images)[1], reference)

    floor = distance(floor_images)
    ratios = {"fresh": distance(fresh_images) / floor,  # other real digits: near the floor
              "1.3x brighter": distance(brighter(floor_images, 1.3)) / floor,  # clamped at white
              "gamma 0.7": distance(gamma(floor_images, 0.7)) / floor,  # mid-tones lifted
              "0.8x dimmer": distance(brighter(floor_images, 0.8)) / floor}
    assert ratios["1.3x brighter"] > 8 and ratios["gamma 0.7"] > 8 and ratios["0.8x dimmer"] > 5, ratios
    assert ratios["fresh"] < 2, ratios


def test_the_classifier_is_trained_once_then_loaded(tmp_path, monkeypatch):
    images, labels = load_dataset("mnist", 8, split="holdout", conditional=True).dataset.tensors
    images = to_uint8(images[:64])
    held, held_labels = load_dataset("mnist", 8, split="train", conditional=True).dataset.tensors
    model, record, stem = classifier_for(images, labels[:64], 10, tmp_path, "64 digits", steps=5,
                                         holdout_images=to_uint8(held[:32]), holdout_labels=held_labels[:32])
    assert stem.with_suffix(".safetensors").is_file() and record["trained_on"] == "64 digits"
    assert record["holdout_images"] == 32 and 0 <= record["holdout_accuracy"] <= 1 and record["train_seconds"] >= 0
    monkeypatch.setattr("ddpm.classifier.train_classifier", lambda *a, **k: pytest.fail("retrained instead of loading"))
    loaded, again, same_stem = classifier_for(images, labels[:64], 10, tmp_path, "64 digits", steps=5)
    assert same_stem == stem and again["train_accuracy"] == record["train_accuracy"]
    assert np.array_equal(predict(model, images)[0], predict(loaded, images)[0])


class CountingModel(torch.nn.Module):
    """A stand-in network that predicts zero noise and counts the images it is asked about."""

    def __init__(self, num_classes):
        super().__init__()
        self.null_class = num_classes  # None: unconditional
        self.images_seen = 0

    def forward(self, x, t, y=None):
        self.images_seen += len(x)
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(sampler="ddim", steps=10, guidance=3.0),
    SamplingConfig(sampler="ddim", steps=10, guidance=1.0),
    SamplingConfig(sampler="ddim", steps=10, guidance=0.0),
    SamplingConfig(sampler="ddim", steps=12, guidance=2.0, guidance_interval=(0.3, 0.7), guidance_rescale=0.5),
    # logsnr spacing ends on indices 2 and 0, trailing on 6: the interval (0, 0.1) guides two steps of one, none of the
    # other
    SamplingConfig(sampler="dpmpp2m", steps=7, guidance=2.0, guidance_interval=(0.0, 0.1), spacing="logsnr"),
    SamplingConfig(sampler="dpmpp2m", steps=9, guidance=4.0, guidance_interval=(0.2, 1.0)),
    SamplingConfig(sampler="ddpm", guidance=1.5, guidance_interval=(0.1, 0.4)),
], ids=str)
@pytest.mark.parametrize("batched", [False, True])
def test_model_calls_per_image_counts_what_the_sampler_runs(sampling, batched):
    """The count must equal the network evaluations a real sampling run makes, per image (a guided step is
    two, one of 2N batched or two of N), across samplers, spacings and guidance intervals."""
    from ddpm.guidance import make_denoiser
    from ddpm.samplers import run_sampler

    schedule = NoiseSchedule.from_config(SHORT)
    model = CountingModel(10)
    denoiser = make_denoiser(model, torch.arange(4) % 10, sampling, schedule=schedule, batched=batched)
    run_sampler(denoiser, schedule, (4, 1, 4, 4), sampling, generator=torch.Generator().manual_seed(0))
    assert model_calls_per_image(sampling, schedule) == model.images_seen / 4
    if sampling.guidance_interval is not None:  # the interval matters: guided everywhere would count more
        assert model_calls_per_image(sampling, schedule) < 2 * sampling.steps_for(len(schedule))


def test_model_calls_of_an_unconditional_model_are_its_steps():
    schedule = NoiseSchedule.from_config(SHORT)
    sampling = SamplingConfig(sampler="ddim", steps=10, guidance=3.0)
    assert model_calls_per_image(sampling, schedule, conditional=False) == 10


def sweep_record():
    """A record as `ddpm eval` writes it: a floor and rows over two samplers, steps, w and one option."""
    def row(sampler, steps, calls, w, fd, accuracy, **options):
        settings = dataclasses.asdict(SamplingConfig(sampler=sampler, steps=steps, guidance=w, **options))
        interval = settings["guidance_interval"]
        settings["guidance_interval"] = list(interval) if interval else None  # as JSON gives it
        return {"sampler": sampler, "steps": steps, "model_calls": calls, "guidance": w, "settings": settings,
                "accuracy": accuracy, "classifier_fd": fd, "precision": 0.7, "recall": 0.6, "saturated": 0.01,
                "seconds": 1.5}

    return {"floor": {"description": "real", "n": 12, "accuracy": 0.95, "classifier_fd": 0.5, "precision": 0.8,
                      "recall": 0.75, "saturated": 0.002},
            "rows": [row("ddim", 40, 80, 3.0, 2.0, 0.92), row("ddim", 10, 20, 3.0, 4.0, 0.9),
                     row("ddim", 10, 10, 1.0, 3.0, 0.8),
                     row("ddim", 10, 14, 3.0, 1.0, 0.85, guidance_interval=(0.2, 0.8)),
                     row("dpmpp2m", 10, 20, 3.0, 1.5, 0.91)]}


def test_sweep_csv_has_the_floor_then_one_line_per_setting():
    import csv

    lines = list(csv.DictReader(sweep_csv(sweep_record()).splitlines()))
    assert [line["sampler"] for line in lines] == ["real", "ddim", "ddim", "ddim", "ddim", "dpmpp2m"]
    floor, first, interval = lines[0], lines[2], lines[4]
    assert floor["steps"] == floor["model_calls"] == floor["guidance"] == "" and float(floor["classifier_fd"]) == 0.5
    assert float(floor["precision"]) == 0.8 and float(floor["saturated"]) == 0.002
    assert (first["steps"], first["model_calls"], first["guidance"], first["guidance_interval"]) == (
        "10", "20", "3", "0.4-1")
    assert float(first["fid"] or 0) == 0 and float(first["recall"]) == 0.6 and float(first["seconds"]) == 1.5
    assert interval["guidance_interval"] == "0.2-0.8" and interval["model_calls"] == "14"
    assert interval["clip_x0"] == "False" and interval["guidance_rescale"] == "0"


def test_quality_lines_join_steps_and_keep_settings_apart():
    lines = quality_lines(sweep_record()["rows"], "classifier_fd")
    assert lines == {"ddim w=3": [(20, 4.0), (80, 2.0)], "ddim w=1": [(10, 3.0)],  # labels name only non-defaults
                     "ddim w=3 interval=0.2-0.8": [(14, 1.0)], "dpmpp2m w=3": [(20, 1.5)]}
    first_row = sweep_record()["rows"][0]
    switched_off = {**first_row, "settings": {**first_row["settings"], "guidance_interval": None}}
    if SamplingConfig().guidance_interval is not None:
        assert list(quality_lines([switched_off], "classifier_fd")) == ["ddim w=3 no-interval"]


def test_write_sweep_files_writes_a_csv_and_a_two_panel_png(tmp_path):
    files = write_sweep_files(sweep_record(), tmp_path)
    assert files == {"csv": str(tmp_path / "eval.csv"), "plot": str(tmp_path / "quality_vs_steps.png")}
    assert (tmp_path / "eval.csv").read_text().startswith("sampler,steps,model_calls,guidance,")
    with Image.open(tmp_path / "quality_vs_steps.png") as png:
        width, height = png.size
    assert width > 1.8 * height  # two panels side by side
    # without a classifier (unconditional models): FID alone; nothing to plot: no file
    rows = [{**r, "fid": 10.0 - r["model_calls"] / 10} for r in sweep_record()["rows"]]
    for r in rows:
        del r["classifier_fd"], r["accuracy"]
    assert quality_plot_png({"rows": rows, "floor": {"fid": 2.0}}) is not None
    assert quality_plot_png({"rows": [], "floor": {}}) is None


def test_validation_loss_is_the_same_at_every_call(tiny_config):
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=10)).train()
    schedule = NoiseSchedule.from_config(SHORT)
    held = validation_set("mnist", 8, 1, conditional=True, n=64)
    assert held.images.shape == (64, 1, 8, 8) and held.labels.shape == (64,)
    rng_before = torch.get_rng_state()
    first = validation_loss(model, schedule, held.images, held.labels, seed=0, batch_size=24)
    second = validation_loss(model, schedule, held.images, held.labels, seed=0)
    assert first == pytest.approx(second, rel=1e-6, abs=0)  # batch size changes nothing but the summation order
    assert validation_loss(model, schedule, held.images, held.labels, seed=0) == second  # bit-identical
    assert validation_loss(model, schedule, held.images, held.labels, seed=1) != second
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    with pytest.raises(ValueError, match="labels"):
        validation_loss(model, schedule, held.images, None)


class Predictor(torch.nn.Module):
    """An unconditional stand-in network whose output is `predict(x, t)` (one parameter, for the device lookup)."""

    null_class = None

    def __init__(self, predict):
        super().__init__()
        self.predict = predict
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        return self.predict(x, t) * self.weight


def test_validation_loss_of_a_zero_predictor_is_the_noise_power():
    images = torch.rand(256, 1, 8, 8) * 2 - 1
    zero = Predictor(lambda x, t: torch.zeros_like(x))
    loss = validation_loss(zero, NoiseSchedule.from_config(SHORT), images, seed=3)
    assert loss == pytest.approx(1.0, abs=0.05)  # E[eps^2] = 1 over 16,384 draws


def test_validation_loss_reads_a_v_model_as_v_and_visits_every_timestep_once():
    # bugs caught: a v-predicting model's output scored as eps (its val/loss then no longer in the eps unit that runs
    # compare), the timesteps spread over 0..T-2 (the last index never validated). For images of zeros,
    # x_t = sigma_t eps, so the ideal v = alpha_t eps - sigma_t x0 = (alpha_t / sigma_t) x_t scores 0 exactly.
    schedule = NoiseSchedule.from_config(dataclasses.replace(SHORT, prediction="v"))
    alpha, sigma = schedule.sqrt_alphas_cumprod.double(), schedule.sqrt_one_minus_alphas_cumprod.double()
    seen = []

    def ideal_v(x, t):
        seen.extend(t.tolist())
        return (alpha[t] / sigma[t]).view(-1, 1, 1, 1).float() * x

    loss = validation_loss(Predictor(ideal_v), schedule, torch.zeros(50, 1, 4, 4), seed=0, batch_size=16)
    assert loss == pytest.approx(0.0, abs=1e-6)
    assert sorted(seen) == list(range(50))  # n = T: each index once


EVAL = ["--sampling-steps", "2", "--classifier-steps", "100", "--ref-n", "40", "--quiet"]


def test_the_sweep_gives_one_row_per_w_and_resumes(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=10)
    assert main(["eval", str(run), "--n", "12", "--batch-size", "5", "--guidance", "0", "1", "2.5", "--no-fid",
                 *EVAL]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["guidance"] for r in result["rows"]] == [0.0, 1.0, 2.5]
    assert all(0 <= r["accuracy"] <= 1 and r["classifier_fd"] >= 0 and r["generated_now"] == 12 for r in result["rows"])
    assert all(0 <= r[k] <= 1 for r in [*result["rows"], result["floor"]] for k in ("precision", "recall", "saturated"))
    # each row carries its count of model calls (checked against real sampler runs in test_model_calls_per_image_...)
    schedule = NoiseSchedule.from_config(SHORT)
    assert [r["model_calls"] for r in result["rows"]] == [
        model_calls_per_image(SamplingConfig(**r["settings"]), schedule) for r in result["rows"]]
    # w=0: one call a step; w=2.5 guides
    assert result["rows"][0]["model_calls"] == 2 < result["rows"][2]["model_calls"]
    assert result["floor"]["n"] == 12 and result["floor"]["accuracy"] > 0.3  # 12 real digits, a 100-step classifier
    assert result["files"]["plot"] and Path(result["files"]["plot"]).is_file()
    assert (run / "eval" / "eval.csv").read_text().count("\n") == 1 + 1 + 3  # header, floor, one line per w
    assert "fid" not in result["rows"][0] and result["inception"] is None and result["model_step"] == 7
    lines = out.splitlines()
    assert any(line.split()[:1] == ["real"] and "floor" in line for line in lines)
    # the default sampler
    assert [line.split()[3] for line in lines if line.split()[:2] == ["dpmpp2m", "2"]] == ["0", "1", "2.5"]
    # take away part of w=1 (two files of batch 1, one truncated file of batch 2): only those batches are drawn again
    folder = Path(result["rows"][1]["samples"])
    pngs = sorted(folder.glob("sample_*.png"))
    assert len(pngs) == 12 and pngs[3].name == "sample_00003_class3.png"
    before = {p.name: p.read_bytes() for p in pngs}
    pngs[5].unlink()
    pngs[6].unlink()
    pngs[11].write_bytes(before[pngs[11].name][:20])
    assert main(["eval", str(run), "--n", "12", "--batch-size", "5", "--guidance", "0", "1", "2.5", "--no-fid",
                 *EVAL]) == 0
    again = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["generated_now"] for r in again["rows"]] == [0, 5 + 2, 0]  # batch 1 (5 images) and batch 2 (2) redrawn
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("sample_*.png"))} == before  # the same images as before
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in result["rows"]]


def test_unconditional_models_have_one_row_and_refuse_a_guidance_list(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=None, data="photos")
    assert main(["eval", str(run), "--guidance", "0", "1", "--no-fid", *EVAL]) == 2
    err = capsys.readouterr().err
    assert "unconditional" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(run), "--n", "4", "--no-fid", *EVAL]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    row = result["rows"][0]
    assert [r["guidance"] for r in result["rows"]] == [None]
    # the photos are labelled by photo, so a classifier of those labels scores the unconditional samples in its
    # features (the bug this catches: no classifier at all, hence no metric but FID for unconditional models)
    assert result["classifier"] is not None and "accuracy" not in row and row["classifier_fd"] > 0
    assert 0 <= result["floor"]["accuracy"] <= 1 and 0 <= row["precision"] <= 1


def test_the_data_says_whether_it_has_classes(tmp_path):
    # an unconditional model (num_classes None) takes DATA's labels whenever DATA has them
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8), "L").save(tmp_path / f"flat_{i}.png")
    assert real_sets(str(tmp_path), 8, 1, None, n=4, ref_n=4).num_classes is None  # a flat folder: no classifier
    assert real_sets("mnist", 8, 1, None, n=4, ref_n=4).num_classes == 10
    assert real_sets("photos", 8, 3, None, n=4, ref_n=4).num_classes == 7


def test_eval_errors_are_one_line(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=10)
    loose = tmp_path / "loose"  # a model folder with no run around it: nothing names its data
    save_pretrained(UNet(tiny_config(num_classes=10)), loose, SHORT)
    cases = [
        (["eval", str(loose), "--no-fid"], "--data"),
        (["eval", str(run), "--n", "4", "--inception", str(tmp_path / "none.pt"), *EVAL], "--inception PATH"),
        (["eval", str(run), "--n", "1", "--no-fid"], "--n must be >= 2"),
        (["eval", str(run), "--data", "photos", "--no-fid", *EVAL], "classes"),
        (["eval", str(tmp_path / "nothing"), "--no-fid"], "not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_format_table_puts_the_floor_first():
    rows = [{"sampler": "ddim", "steps": 50, "model_calls": 50, "guidance": 0.0, "fid": 30.0, "accuracy": 0.1},
            {"sampler": "dpmpp2m", "steps": 20, "model_calls": 40, "guidance": 3.0, "fid": 12.5, "accuracy": 0.9,
             "settings": {"dynamic_threshold": 0.995, "guidance_interval": [0.2, 0.8], "clip_x0": False}}]
    table = format_table(rows, {"fid": 2.0, "accuracy": 0.95})
    lines = table.splitlines()
    assert "FID" in lines[0] and "class acc" in lines[0] and "classifier FD" not in lines[0]
    assert lines[2].split()[:3] == ["real", "2.00", "0.950"]
    assert lines[4].split() == ["dpmpp2m", "20", "40", "3", "dt=0.995", "interval=0.2-0.8", "12.50", "0.900"]


@pytest.mark.parametrize("data, channels, classes, hflip", [("mnist", 1, 10, False), ("photos", 3, 7, True)])
def test_the_judging_classifier_learns_mirrored_images_except_for_digits(tmp_path, monkeypatch, data, channels, classes,
                                                                          hflip):
    # bug caught: digits mirrored in the classifier's training (it then reads a mirrored 3 as a 3: a model drawing
    # mirrored digits keeps its class accuracy and feature distance), or photos not (a classifier that overfits)
    from ddpm import evaluation

    class Stop(Exception):
        pass

    asked = {}

    def classifier_for(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(evaluation, "classifier_for", classifier_for)
    with pytest.raises(Stop):
        evaluation.prepare_evaluator(data, 16, channels, classes, tmp_path, n=8, ref_n=16, fid=False)
    assert asked["hflip"] is hflip


def test_a_classifier_of_other_training_steps_is_trained_anew_not_read_from_the_cache(tmp_path):
    # bug caught: the step count left out of the cache's key (`ddpm eval --classifier-steps 200` after a run at
    # 800 silently judges with the 800-step classifier, and eval.json names the wrong one)
    images, labels = load_dataset("mnist", 8, split="holdout", conditional=True).dataset.tensors
    images, labels = to_uint8(images[:32]), labels[:32]
    _, first, stem_2 = classifier_for(images, labels, 10, tmp_path, "32 digits", steps=2)
    _, second, stem_3 = classifier_for(images, labels, 10, tmp_path, "32 digits", steps=3)
    assert stem_2 != stem_3 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_eval_draws_its_samples_from_the_seed_it_is_given(tmp_path, tiny_config):
    # bug caught: --seed recorded in eval.json but not handed to the sampler (every seed scores seed 0's images,
    # so a seed-to-seed spread measures nothing); the images of two seeds compared pixel for pixel
    run = make_run(tmp_path / "run", tiny_config, num_classes=10)
    images = {}
    for seed in (0, 3):
        assert main(["eval", str(run), "--n", "4", "--seed", str(seed), "--guidance", "2", "--no-fid", *EVAL]) == 0
        (row,) = json.loads((run / "eval" / "eval.json").read_text())["rows"]
        pngs = sorted(Path(row["samples"]).glob("*.png"))
        assert len(pngs) == 4 and f"_seed{seed}_" in Path(row["samples"]).parent.name
        images[seed] = np.stack([np.asarray(Image.open(png)) for png in pngs])
    assert not np.array_equal(images[0], images[3])
