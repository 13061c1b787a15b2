"""`ddpm eval` and its parts on tiny random models: splits, classifier, validation loss, the sweep, resuming, errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DiffusionConfig, NoiseSchedule, UNet, save_pretrained
from ddpm.classifier import classifier_for, predict, train_classifier
from ddpm.cli import format_table, main
from ddpm.data import load_dataset, to_uint8
from ddpm.evaluation import real_sets
from ddpm.metrics import class_accuracy, validation_loss, validation_set

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


def test_real_sets_are_disjoint_and_the_mnist_classifier_uses_the_holdout():
    real = real_sets("mnist", 8, 1, 10, n=50, ref_n=300)
    assert real.floor.shape == (50, 1, 8, 8) and real.reference.shape == (300, 1, 8, 8) and real.floor.dtype == torch.uint8
    holdout = to_uint8(load_dataset("mnist", 8, split="holdout").dataset.tensors[0])
    assert torch.equal(real.classifier_images, holdout) and len(real.classifier_labels) == 1000
    # the floor is none of the reference images (the sets are positions in one permutation of the train split)
    assert not pixel_rows(real.floor) & pixel_rows(real.reference)
    # the reference does not move with n (its cached features stay valid)
    assert torch.equal(real_sets("mnist", 8, 1, 10, n=20, ref_n=300).reference, real.reference)
    # the floor is capped at a quarter of the pool
    assert len(real_sets("mnist", 8, 1, 10, n=5000, ref_n=300).floor) == 1000


def test_real_sets_without_a_holdout_keep_classifier_images_apart(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        (tmp_path / f"class{k}").mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"class{k}" / f"{i}.png")
    real = real_sets(str(tmp_path), 8, 3, 3, n=100, ref_n=100)
    assert len(real.floor) == 12 and len(real.reference) == 18 and len(real.classifier_images) == 18
    sets = [pixel_rows(s) for s in (real.floor, real.reference, real.classifier_images)]
    assert sum(map(len, sets)) == len(set.union(*sets)) == 48
    assert "saw them" in real.notes["classifier"]


@pytest.fixture(scope="module")
def digit_classifier():
    images, labels = load_dataset("mnist", 8, split="holdout", conditional=True).dataset.tensors
    return train_classifier(to_uint8(images), labels, 10, steps=300, seed=0)


def test_class_accuracy_is_high_for_real_labels_and_chance_for_shuffled_ones(digit_classifier):
    images, labels = load_dataset("mnist", 8, conditional=True).dataset.tensors  # the classifier never saw these
    images, labels = to_uint8(images[::4]), labels[::4]
    logits, features = predict(digit_classifier, images)
    assert features.shape == (1000, 128)
    assert class_accuracy(logits, labels) > 0.75
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert 0.05 < class_accuracy(logits, shuffled) < 0.16


def test_the_classifier_is_trained_once_then_loaded(tmp_path, monkeypatch):
    images, labels = load_dataset("mnist", 8, split="holdout", conditional=True).dataset.tensors
    images = to_uint8(images[:64])
    model, record, stem = classifier_for(images, labels[:64], 10, tmp_path, "64 digits", steps=5)
    assert stem.with_suffix(".safetensors").is_file() and record["trained_on"] == "64 digits"
    monkeypatch.setattr("ddpm.classifier.train_classifier", lambda *a, **k: pytest.fail("retrained instead of loading"))
    loaded, again, same_stem = classifier_for(images, labels[:64], 10, tmp_path, "64 digits", steps=5)
    assert same_stem == stem and again["train_accuracy"] == record["train_accuracy"]
    assert np.array_equal(predict(model, images)[0], predict(loaded, images)[0])


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


def test_validation_loss_of_a_zero_predictor_is_the_noise_power():
    class Zero(torch.nn.Module):
        null_class = None

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            return torch.zeros_like(x) * self.weight

    images = torch.rand(256, 1, 8, 8) * 2 - 1
    loss = validation_loss(Zero(), NoiseSchedule.from_config(SHORT), images, seed=3)
    assert loss == pytest.approx(1.0, abs=0.05)  # E[eps^2] = 1 over 16,384 draws


EVAL = ["--sampling-steps", "2", "--classifier-steps", "100", "--ref-n", "40", "--quiet"]


def test_the_sweep_gives_one_row_per_w_and_resumes(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=10)
    assert main(["eval", str(run), "--n", "12", "--batch-size", "5", "--guidance", "0", "1", "2.5", "--no-fid", *EVAL]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["guidance"] for r in result["rows"]] == [0.0, 1.0, 2.5]
    assert all(0 <= r["accuracy"] <= 1 and r["classifier_fd"] >= 0 and r["generated_now"] == 12 for r in result["rows"])
    assert result["floor"]["n"] == 12 and result["floor"]["accuracy"] > 0.3  # 12 real digits, a 100-step classifier
    assert "fid" not in result["rows"][0] and result["inception"] is None and result["model_step"] == 7
    lines = out.splitlines()
    assert any(line.split()[:1] == ["real"] and "floor" in line for line in lines)
    assert [line.split()[2] for line in lines if line.split()[:2] == ["ddim", "2"]] == ["0", "1", "2.5"]
    # take away part of w=1 (two files of batch 1, one truncated file of batch 2): only those batches are drawn again
    folder = Path(result["rows"][1]["samples"])
    pngs = sorted(folder.glob("sample_*.png"))
    assert len(pngs) == 12 and pngs[3].name == "sample_00003_class3.png"
    before = {p.name: p.read_bytes() for p in pngs}
    pngs[5].unlink(); pngs[6].unlink()
    pngs[11].write_bytes(before[pngs[11].name][:20])
    assert main(["eval", str(run), "--n", "12", "--batch-size", "5", "--guidance", "0", "1", "2.5", "--no-fid", *EVAL]) == 0
    again = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["generated_now"] for r in again["rows"]] == [0, 5 + 2, 0]  # batch 1 (5 images) and batch 2 (2) redrawn
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("sample_*.png"))} == before  # the same images as before
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in result["rows"]]


def test_eval_with_fid_writes_the_floor_and_caches_the_reference(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=10)
    assert main(["eval", str(run / "model"), "--n", "4", "--guidance", "1", "--data", "mnist",
                 "--sampling-steps", "2", "--classifier-steps", "30", "--ref-n", "6", "--quiet"]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())  # a model/ folder inside a run writes to the run
    row, floor = result["rows"][0], result["floor"]
    assert row["fid"] > 0 and floor["fid"] > 0 and np.isfinite([row["fid"], floor["fid"]]).all()
    assert result["inception"]["sha1"] and "299x299" in result["inception"]["features"]
    cache = run / "eval" / "cache"
    assert len(list(cache.glob("inception-reference-*.npz"))) == len(list(cache.glob("inception-floor-*.npz"))) == 1
    assert "FID" in capsys.readouterr().out


def test_unconditional_models_have_one_row_and_refuse_a_guidance_list(tmp_path, tiny_config, capsys):
    run = make_run(tmp_path / "run", tiny_config, num_classes=None, data="photos")
    assert main(["eval", str(run), "--guidance", "0", "1", "--no-fid", *EVAL]) == 2
    err = capsys.readouterr().err
    assert "unconditional" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(run), "--n", "4", "--no-fid", *EVAL]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["guidance"] for r in result["rows"]] == [None] and result["classifier"] is None


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
    rows = [{"sampler": "ddim", "steps": 50, "guidance": 0.0, "fid": 30.0, "accuracy": 0.1},
            {"sampler": "dpmpp2m", "steps": 20, "guidance": 3.0, "fid": 12.5, "accuracy": 0.9}]
    table = format_table(rows, {"fid": 2.0, "accuracy": 0.95})
    lines = table.splitlines()
    assert "FID" in lines[0] and "class acc" in lines[0] and "classifier FD" not in lines[0]
    assert lines[2].split()[:3] == ["real", "2.00", "0.950"] and lines[4].split() == ["dpmpp2m", "20", "3", "12.50", "0.900"]
