"""`ddpm eval`'s numbers recomputed independently: FID from its cached Inception features, the saturated fraction."""
import json

import numpy as np
import torch

from ddpm import DiffusionConfig, UNet, save_pretrained
from ddpm.cli import main


def fid_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 sum sqrt(eig(S_a S_b)): numpy's general eigenvalues, not the
    symmetric square roots or singular values the library uses; covariances written out as sums of outer products
    / (N - 1). With S_a = C_a^T C_a / (N_a - 1) (C_a: the centred rows), the nonzero eigenvalues of S_a S_b are
    those of the N_a x N_a matrix C_a S_b C_a^T / (N_a - 1) (XY and YX share them): no 2,048 x 2,048 eigenproblem."""
    def moments(x):
        x = x.astype(np.float64)
        mu = x.sum(0) / len(x)
        centred = x - mu
        return mu, centred, centred.T @ centred / (len(x) - 1)

    (mu_a, c_a, s_a), (mu_b, _, s_b) = moments(a), moments(b)
    eigenvalues = np.linalg.eigvals(c_a @ s_b @ c_a.T / (len(a) - 1))
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt)


def test_reported_fid_equals_an_independent_recomputation(tmp_path, tiny_config, capsys):
    # one `ddpm eval` with FID for the whole suite (Inception-v3 on a CPU is the costly part): the reported FID of
    # the samples and of the floor against a recomputation by eigenvalues, the cache, the record and the table
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=10))
    save_pretrained(model, tmp_path / "model", DiffusionConfig(timesteps=50), {"step": 1})
    assert main(["eval", str(tmp_path / "model"), "--data", "mnist", "--n", "6", "--ref-n", "8", "--guidance", "3",
                 "--sampler", "ddim", "--sampling-steps", "2", "--classifier-steps", "20", "--quiet"]) == 0
    result = json.loads((tmp_path / "model" / "eval" / "eval.json").read_text())
    cache = tmp_path / "model" / "eval" / "cache"
    features = {kind: np.load(next(cache.glob(f"inception-{kind}-*.npz")))["features"]
                for kind in ("reference", "floor", "samples")}
    assert features["reference"].shape == (8, 2048) and features["floor"].shape == (6, 2048)
    floor = fid_by_eigenvalues(features["floor"], features["reference"])
    samples = fid_by_eigenvalues(features["samples"], features["reference"])
    assert result["floor"]["fid"] == np.float64(floor) or abs(result["floor"]["fid"] - floor) <= 1e-3 * floor
    assert abs(result["rows"][0]["fid"] - samples) <= 1e-3 * samples
    assert samples > floor  # random weights are far from digits
    assert result["inception"]["sha1"] and "299x299" in result["inception"]["features"]
    assert all(len(list(cache.glob(f"inception-{kind}-*.npz"))) == 1 for kind in ("reference", "floor"))
    assert "FID" in capsys.readouterr().out


def test_saturation_counts_full_white_pixels_not_the_black_background():
    from ddpm.data import load_dataset
    from ddpm.evaluation import saturated_fraction
    from ddpm.files import to_uint8

    images = load_dataset("mnist", 16, split="holdout").dataset.tensors[0][:200]
    real = to_uint8(images)
    expected = sum(int(v == 255) for v in real.flatten().tolist()) / real.numel()  # counted one pixel at a time
    assert saturated_fraction(real) == expected and expected < 0.02  # digits: black background, few pure whites
    brighter = to_uint8(((images + 1) * 1.3 - 1).clamp(-1, 1))  # the over-guided look: strokes 1.3x brighter
    assert saturated_fraction(brighter) > 3 * saturated_fraction(real)


def test_every_eval_flag_runs_on_a_v_model_and_the_sweep_writes_its_files(tmp_path, capsys, tiny_config):
    """A v-prediction model through `ddpm eval` with every sampling flag, two samplers and two step counts: one
    row per combination, written to --out, with eval.csv and the plot."""
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=10))
    save_pretrained(model, tmp_path / "model", DiffusionConfig(timesteps=50, prediction="v"), {"step": 1})
    out = tmp_path / "elsewhere"
    argv = ["eval", str(tmp_path / "model"), "--data", "mnist", "--no-fid", "--n", "4", "--ref-n", "8",
            "--classifier-steps", "20", "--sampler", "ddim", "dpmpp2m", "--sampling-steps", "2", "3", "--guidance", "2",
            "--eta", "0.5", "--clip-x0",
            "--dynamic-threshold", "0.99", "--guidance-rescale", "0.5", "--guidance-interval", "0.1", "0.9",
            "--spacing", "logsnr", "--seed", "7", "--batch-size", "3", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    rows = [(r["sampler"], r["steps"]) for r in result["rows"]]
    assert rows == [("ddim", 2), ("ddim", 3), ("dpmpp2m", 2), ("dpmpp2m", 3)]
    settings = result["rows"][2]["settings"]
    assert settings["spacing"] == "logsnr" and settings["guidance_interval"] == [0.1, 0.9]
    assert settings["dynamic_threshold"] == 0.99
    assert result["seed"] == 7 and (out / "eval" / "eval.csv").is_file()
    assert (out / "eval" / "quality_vs_steps.png").is_file()
    assert not (tmp_path / "model" / "eval").exists()  # --out took it elsewhere
    assert "dt=0.99" in capsys.readouterr().out
