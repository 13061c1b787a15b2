"""Autoguidance (Karras et al. 2024): the guided denoiser against float64 recomputations, the guide snapshot of a
training run, and load_guide's three path kinds and its refusals."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from ddpm import (
    DiffusionConfig,
    Guide,
    GuidedDenoiser,
    NoiseSchedule,
    RunConfig,
    RuntimeConfig,
    SamplingConfig,
    UNet,
    find_run_guide,
    load_guide,
    make_denoiser,
    sample,
    save_pretrained,
)
from ddpm.checkpoint import CheckpointError, ema_states, latest_checkpoint, load_training_state, save_guide_snapshot
from ddpm.config import ConfigError
from ddpm.monitor import RankZeroMonitor
from ddpm.run_files import guide_step
from ddpm.run_setup import prepare
from ddpm.training import Trainer, fit, train
from helpers import TINY_MODEL

T = 100
BETAS = np.linspace(1e-3, 0.2, T)  # DiffusionConfig(timesteps=100): linear betas 1e-4..0.02 scaled by 1000/T
ABAR = np.cumprod(1 - BETAS)
X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
STEPS = torch.tensor([5, 40, 90])
LABELS = torch.tensor([0, 2, 1])


def unet(tiny_config, seed, **overrides):
    torch.manual_seed(seed)
    model = UNet(tiny_config(**overrides)).eval()
    with torch.no_grad():  # a freshly built UNet is nearly the identity (input_skip); make the networks differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def schedule(prediction="eps"):
    return NoiseSchedule.from_config(DiffusionConfig(timesteps=T, prediction=prediction))


class Calls:
    """Records the batch size of every forward call of a module."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_pre_hook(lambda _, args: self.sizes.append(args[0].shape[0]))


def eps64(model, prediction, x, t, y):
    """The network's output as eps, recomputed in float64 from a float64 copy and numpy's own abar table."""
    out = copy.deepcopy(model).double()(x.double(), t, y).detach().numpy()
    if prediction == "eps":
        return out
    abar = ABAR[t.numpy()].reshape(-1, 1, 1, 1)
    return np.sqrt(abar) * out + np.sqrt(1 - abar) * x.double().numpy()  # eps = sqrt(abar) v + sqrt(1-abar) x_t


@torch.no_grad()
@pytest.mark.parametrize("g", [0.0, 0.3, 2.7, 7.0])
def test_a_guide_identical_to_the_model_gives_exactly_the_model(tiny_config, g):
    """eps + (g - 1) (eps - eps) must be eps bit for bit. Catches the guide called with the null labels, the
    guide's prediction read with the wrong type, and the weights mixed as g eps + (1 - g) eps_guide (inexact)."""
    main = unet(tiny_config, 0, num_classes=3)
    twin = copy.deepcopy(main)
    sampling = SamplingConfig(guidance=1.0, guide_weight=g, guidance_interval=None)
    den = make_denoiser(main, LABELS, sampling, schedule=schedule(), guide=Guide(twin, DiffusionConfig(timesteps=T)))
    assert torch.equal(den(X, STEPS), main(X, STEPS, LABELS))


@torch.no_grad()
def test_guide_weight_one_is_the_model_alone_and_never_calls_the_guide(tiny_config):
    main, guide = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3)
    calls = Calls(guide)
    den = make_denoiser(main, LABELS, SamplingConfig(guidance=1.0, guide_weight=1.0), schedule=schedule(), guide=guide)
    assert torch.equal(den(X, STEPS), main(X, STEPS, LABELS)) and calls.sizes == []


@torch.no_grad()
@pytest.mark.parametrize("guide_prediction", ["eps", "v"])
@pytest.mark.parametrize("g", [0.5, 2.0, 3.5])
def test_autoguidance_is_karras_formula_in_float64(tiny_config, guide_prediction, g):
    """D_0 + g (D_1 - D_0) (Karras et al. 2024, sec. 3) on eps, recomputed in float64, with the guide a different
    network, possibly predicting v while the main model predicts eps. Catches main and guide swapped, the
    weight off by one (g instead of g - 1), the guide's v read as eps (or through the main model's type)."""
    main, guide = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3, base_channels=4)
    sampling = SamplingConfig(guidance=1.0, guide_weight=g, guidance_interval=None)
    den = make_denoiser(main, LABELS, sampling, schedule=schedule(),
                        guide=Guide(guide, DiffusionConfig(timesteps=T, prediction=guide_prediction)))
    calls = Calls(main), Calls(guide)
    out = den(X, STEPS).double().numpy()
    assert [c.sizes for c in calls] == [[3], [3]]  # g != 1, w == 1: two calls of N
    d1, d0 = eps64(main, "eps", X, STEPS, LABELS), eps64(guide, guide_prediction, X, STEPS, LABELS)
    np.testing.assert_allclose(out, d0 + g * (d1 - d0), rtol=1e-4, atol=1e-5)
    assert np.abs(d1 - d0).max() > 1e-2  # the two networks really differ: the test can see the guide


@torch.no_grad()
@pytest.mark.parametrize("batched", [True, False])
def test_cfg_and_autoguidance_together_are_the_sum_of_both_extrapolations(tiny_config, batched):
    """eps + (g - 1)(eps - eps_guide) + (w - 1)(eps - eps_null), by hand in float64, with a v-predicting main model.
    Catches the guide given the null labels, the CFG term dropped when a guide is present, and a wrong call
    pattern (CFG branches as one call of 2N when batched, three calls of N otherwise)."""
    w, g = 2.5, 1.8
    main, guide = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3)
    sampling = SamplingConfig(guidance=w, guide_weight=g, guidance_interval=None)
    den = make_denoiser(main, LABELS, sampling, schedule=schedule("v"), batched=batched,
                        guide=Guide(guide, DiffusionConfig(timesteps=T, prediction="eps")))
    calls = Calls(main), Calls(guide)
    out = den(X, STEPS).double().numpy()
    assert [c.sizes for c in calls] == ([[6], [3]] if batched else [[3, 3], [3]])
    cond, null = eps64(main, "v", X, STEPS, LABELS), eps64(main, "v", X, STEPS, torch.full_like(LABELS, 3))
    guided = eps64(guide, "eps", X, STEPS, LABELS)
    expected = cond + (g - 1) * (cond - guided) + (w - 1) * (cond - null)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_interval_and_rescale_apply_to_the_whole_guidance(tiny_config):
    """Outside the interval one main call and the plain conditional output; inside, the formula rescaled
    (Lin et al. 2024 eq. 15-16 on x0, against the main conditional prediction); mixed timesteps blend per
    sample, the path accelerators always take. Catches the interval applied to CFG only, the rescale's
    reference taken from the guide, and the guide called on a mixed batch's samples outside."""
    w, g, phi = 2.0, 2.5, 0.6
    main, guide = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3)
    sampling = SamplingConfig(guidance=w, guide_weight=g, guidance_rescale=phi, guidance_interval=(0.5, 1.0))
    den = make_denoiser(main, LABELS, sampling, schedule=schedule(), batched=False, guide=guide)
    calls = Calls(main), Calls(guide)
    low = torch.full((3,), 20)
    assert torch.equal(den(X, low), main(X, low, LABELS)) and [c.sizes for c in calls] == [[3, 3], []]

    def expected(t):
        cond, null = eps64(main, "eps", X, t, LABELS), eps64(main, "eps", X, t, torch.full_like(LABELS, 3))
        eps = cond + (g - 1) * (cond - eps64(guide, "eps", X, t, LABELS)) + (w - 1) * (cond - null)
        abar = ABAR[t.numpy()].reshape(-1, 1, 1, 1)
        x, std = X.double().numpy(), lambda v: v.reshape(len(v), -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)
        x0, x0_cond = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar), (x - np.sqrt(1 - abar) * cond) / np.sqrt(abar)
        x0 = phi * x0 * std(x0_cond) / std(x0) + (1 - phi) * x0
        return (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)

    high = torch.full((3,), 80)
    np.testing.assert_allclose(den(X, high).double().numpy(), expected(high), rtol=1e-4, atol=1e-5)
    mixed = torch.tensor([80, 20, 90])
    inside = expected(mixed)
    plain = main(X, mixed, LABELS).double().numpy()
    calls[1].sizes.clear()
    np.testing.assert_allclose(den(X, mixed).double().numpy(), np.stack([inside[0], plain[1], inside[2]]),
                               rtol=1e-4, atol=1e-5)
    # on the CPU the guide sees only the samples inside (bug caught: all three; distillation's round 1 mixes levels)
    assert calls[1].sizes == [2]


@torch.no_grad()
def test_unconditional_models_are_autoguided(tiny_config):
    """No labels anywhere: the guide is called without them and the CFG weight is ignored. Catches autoguidance
    switched off (or refused) for unconditional models."""
    main, guide = unet(tiny_config, 0), unet(tiny_config, 1)
    g = 2.0
    den = make_denoiser(main, None, SamplingConfig(guidance=3.0, guide_weight=g, guidance_interval=None),
                        schedule=schedule(), guide=guide)
    d1, d0 = eps64(main, "eps", X, STEPS, None), eps64(guide, "eps", X, STEPS, None)
    np.testing.assert_allclose(den(X, STEPS).double().numpy(), d0 + g * (d1 - d0), rtol=1e-4, atol=1e-5)

    def draw(**options):
        generator = torch.Generator().manual_seed(1)
        return sample(main, schedule(), n=2, sampler="ddim", steps=3, generator=generator, **options)

    plain = draw()
    assert torch.equal(draw(guide=guide), plain)  # guide_weight 1 (the default): the guide changes nothing
    assert not torch.allclose(draw(guide=guide, guide_weight=g), plain)


def test_guided_denoiser_and_config_refuse_bad_settings(tiny_config):
    main, guide = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=4)
    with pytest.raises(ValueError, match="num_classes 4 but the model has num_classes 3"):
        make_denoiser(main, LABELS, SamplingConfig(guide_weight=2.0), schedule=schedule(), guide=guide)
    cosine = Guide(unet(tiny_config, 1, num_classes=3), DiffusionConfig(timesteps=T, beta_schedule="cosine"))
    with pytest.raises(ValueError, match="noise schedule"):
        make_denoiser(main, LABELS, SamplingConfig(guide_weight=2.0), schedule=schedule(), guide=cosine)
    with pytest.raises(ValueError, match="needs a guide"):
        GuidedDenoiser(main, LABELS, 1.0, guide_weight=2.0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="guide_weight"):
            SamplingConfig(guide_weight=bad)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="guide_fraction"):
            RuntimeConfig(guide_fraction=bad)
    assert RuntimeConfig(guide_fraction=0).guide_fraction == 0 and SamplingConfig().guide_weight == 1.0


# -- the guide snapshot of a training run ---------------------------------------------------------------------------
def run_config(out_dir, steps, **runtime):
    """The tiny UNet on the bundled photos (prepare() sets its channels), a checkpoint every step, only the newest
    one kept, the guide at half the planned steps."""
    model = dict(TINY_MODEL)
    options = dict(out_dir=str(out_dir), steps=steps, device="cpu", amp="none", num_workers=0, checkpoint_every=1,
                   keep_checkpoints=1, sample_every=0, val_every=0, log_every=1, guide_fraction=0.5)
    return RunConfig.from_dict({"model": model, "train": dict(data="photos", batch_size=4, ema_warmup=1, ema_decay=0.8),
                                "runtime": options | runtime})


def weights_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run (guide at step 2, checkpoints pruned to one) and a 2-step run without a guide (fraction 0)."""
    root = tmp_path_factory.mktemp("runs")
    train(run_config(root / "run", 4), progress=False)
    train(run_config(root / "two", 2, guide_fraction=0.0), progress=False)
    return root


def test_snapshot_is_the_ema_at_its_step_and_survives_pruning_and_resume(trained, tmp_path):
    """Catches the snapshot taken at the wrong step (or from the raw weights), pruned with the checkpoints,
    overwritten by a resumed run, or written when guide_fraction is 0. It resumes a copy of the shared run, which
    the other tests read as it was trained."""
    run, two = tmp_path / "run", trained / "two"
    shutil.copytree(trained / "run", run)
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt")] == ["step_00000004.pt"]
    assert find_run_guide(run) == run / "guide" and find_run_guide(two) is None
    assert find_run_guide(run / "model") == run / "guide"  # `ddpm sample RUN/model` finds its run's guide too
    assert json.loads((run / "guide" / "config.json").read_text())["step"] == 2
    snapshot, reference = weights_of(run / "guide"), weights_of(two / "model")  # the EMA after step 2, both
    assert all(torch.equal(snapshot[k], reference[k]) for k in reference)
    assert not torch.equal(snapshot["outc.weight"], weights_of(run / "model")["outc.weight"])
    before = (run / "guide" / "model.safetensors").read_bytes()
    # --resume may change guide_fraction: 0.9 of 6 puts the snapshot point at step 5, which steps 5..6 pass
    train(run_config(run, 6, guide_fraction=0.9), resume=True, progress=False)
    assert load_training_state(latest_checkpoint(run))["step"] == 6
    assert (run / "guide" / "model.safetensors").read_bytes() == before
    assert json.loads((run / "guide" / "config.json").read_text())["step"] == 2
    assert not list(run.glob(".guide.*"))  # no staging folder left behind


def test_a_run_stopped_before_its_snapshot_point_has_no_guide(tmp_path):
    """Planned for 10 steps (snapshot at 5), stopped after 3. Catches a snapshot written at any other step."""
    config, info = prepare(run_config(tmp_path / "short", 10))
    trainer = Trainer(config, info, torch.device("cpu"))
    monitor = RankZeroMonitor(trainer, tmp_path / "short", last_step=10, show_progress=False)
    try:
        fit(trainer, 3, monitor)
    finally:
        monitor.close(trainer)
    assert trainer.step_count == 3 and find_run_guide(tmp_path / "short") is None
    assert [guide_step(0.5, 4), guide_step(0.3, 10), guide_step(0.01, 10), guide_step(0.0, 10)] == [2, 3, 1, None]


def test_save_guide_snapshot_never_replaces_a_guide(tmp_path, tiny_config):
    first, second = unet(tiny_config, 0), unet(tiny_config, 1)
    assert save_guide_snapshot(tmp_path, first, DiffusionConfig(), {"step": 1})
    assert not save_guide_snapshot(tmp_path, second, DiffusionConfig(), {"step": 2})
    assert torch.equal(weights_of(tmp_path / "guide")["outc.weight"], first.state_dict()["outc.weight"])


# -- load_guide -------------------------------------------------------------------------------------------------------
def test_load_guide_takes_a_model_folder_a_run_folder_and_a_checkpoint(trained, tmp_path):
    """The run folder gives its guide/ (not model/), the checkpoint its EMA (not the raw weights)."""
    run = trained / "run"
    main = UNet(RunConfig.from_dict(json.loads((run / "config.json").read_text())).model)
    from_run = load_guide(run, main, schedule=schedule_of(run))
    assert from_run.prediction == "eps" and not from_run.model.training
    # in the main model's sampling layout (bug caught: a contiguous guide, ~15% slower a call on the CPU)
    assert from_run.model.inc.block[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(from_run.model.state_dict()["outc.weight"], weights_of(run / "guide")["outc.weight"])
    from_folder = load_guide(run / "model", main)
    assert torch.equal(from_folder.model.state_dict()["outc.weight"], weights_of(run / "model")["outc.weight"])
    state = load_training_state(latest_checkpoint(run))
    from_file = load_guide(latest_checkpoint(run), main, "cpu")
    assert torch.equal(from_file.model.state_dict()["outc.weight"], ema_states(state)[0]["model"]["outc.weight"])
    assert from_file.diffusion == DiffusionConfig()
    with pytest.raises(CheckpointError, match="no guide snapshot"):
        load_guide(trained / "two", main)  # a run without guide/ must not fall back to its model/
    with pytest.raises(CheckpointError, match="does not exist"):
        load_guide(tmp_path / "nothing", main)


def schedule_of(run):
    return NoiseSchedule.from_config(RunConfig.from_dict(json.loads((run / "config.json").read_text())).diffusion)


@pytest.mark.parametrize("field, guide_value, main_value", [
    ("image_size", 16, 8), ("in_channels", 3, 1), ("num_classes", 10, None),
])
def test_a_guide_that_does_not_fit_is_refused_in_one_line(tmp_path, tiny_config, field, guide_value, main_value):
    """Catches a missing check of each field: the guide would fail deep inside sampling, or guide silently."""
    folder = tmp_path / "guide_model"
    save_pretrained(UNet(tiny_config(**{field: guide_value})), folder, DiffusionConfig())
    main = UNet(tiny_config(**{field: main_value}))
    with pytest.raises(CheckpointError) as error:
        load_guide(folder, main)
    message = str(error.value)
    assert "\n" not in message and f"{field} {guide_value} but the model has {main_value}" in message
    assert str(folder) in message


def test_a_guide_on_another_schedule_is_refused(tmp_path, tiny_config):
    folder = tmp_path / "guide_model"
    save_pretrained(UNet(tiny_config()), folder, DiffusionConfig(timesteps=50))
    with pytest.raises(CheckpointError, match="50 timesteps but the model has 100"):
        load_guide(folder, UNet(tiny_config()), schedule=schedule())
