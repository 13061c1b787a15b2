import numpy as np
import pytest
import torch

from ddpm import ClassifierFreeGuidance, NoiseSchedule, SamplingConfig, make_denoiser
from ddpm.guidance import default_batched
from ddpm.samplers import run_sampler

BETAS = np.linspace(1e-3, 0.2, 10)  # T = 10, written out
ABAR = np.cumprod(1 - BETAS)


def schedule():
    return NoiseSchedule(torch.from_numpy(BETAS))


class CountingModel(torch.nn.Module):
    """A conditional 'model' whose output depends on x, t and y in a known way; counts its calls."""

    null_class = 5

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return self.reference(x, t, y)

    @staticmethod
    def reference(x, t, y):
        return torch.sin(x * (1 + y.view(-1, 1, 1, 1))) + 0.01 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("w", [3.0, 0.5, 7.5])
def test_guidance_is_the_formula_in_both_modes(batched, w):
    model = CountingModel()
    x = torch.randn(4, 1, 2, 2)
    t = torch.tensor([3, 2, 1, 0])
    y = torch.tensor([0, 1, 2, 4])
    out = ClassifierFreeGuidance(model, y, w, batched=batched)(x, t)
    null = torch.full_like(y, 5)
    eps_null = CountingModel.reference(x, t, null)
    expected = eps_null + w * (CountingModel.reference(x, t, y) - eps_null)
    torch.testing.assert_close(out, expected)
    if batched:
        assert [n for n, _ in model.calls] == [8]
    else:
        assert [n for n, _ in model.calls] == [4, 4]


def test_w1_runs_only_conditional_and_w0_only_null():
    x, t, y = torch.randn(3, 1, 2, 2), torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2])
    model = CountingModel()
    ClassifierFreeGuidance(model, y, 1.0, batched=True)(x, t)
    assert len(model.calls) == 1 and torch.equal(model.calls[0][1], y)
    model = CountingModel()
    ClassifierFreeGuidance(model, y, 0.0, batched=False)(x, t)
    assert len(model.calls) == 1 and bool((model.calls[0][1] == 5).all())


def test_mode_chosen_per_device_and_errors():
    assert default_batched("cpu") is False and default_batched("cuda") is True
    assert ClassifierFreeGuidance(CountingModel(), torch.tensor([0]), 3.0).batched is False

    class Uncond(torch.nn.Module):
        null_class = None

        def forward(self, x, t, y=None):
            return x

    config, sched = SamplingConfig(guidance=3.0), schedule()
    with pytest.raises(ValueError, match="unconditional"):
        make_denoiser(Uncond(), torch.tensor([1]), config, schedule=sched)
    with pytest.raises(ValueError, match="class-conditional"):
        make_denoiser(CountingModel(), None, config, schedule=sched)
    with pytest.raises(ValueError, match="schedule"):
        ClassifierFreeGuidance(CountingModel(), torch.tensor([1]), 3.0, rescale=0.5)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(CountingModel(), torch.tensor([1]), 3.0, interval=(0.6, 0.2), schedule=sched)
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(Uncond(), torch.tensor([1]))


def test_make_denoiser_builds_guidance_from_the_sampling_config():
    model, y = CountingModel(), torch.tensor([0, 1])
    config = SamplingConfig(guidance=2.5, guidance_rescale=0.3, guidance_interval=(0.2, 0.7))
    den = make_denoiser(model, y, config, schedule=schedule(), batched=True)
    assert (den.guidance, den.rescale, den.interval, den.batched) == (2.5, 0.3, (0.2, 0.7), True)
    unconditional = make_denoiser(lambda x, t, y=None: x + t.view(-1, 1, 1, 1), None, config, schedule=schedule())
    torch.testing.assert_close(unconditional(torch.zeros(2, 1, 1, 1), torch.tensor([3, 4])),
                               torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_is_lin_et_al_eq_15_16_on_x0(batched, phi):
    """Lin et al. 2024 eq. 15-16 written out in float64 on the x0 predictions, then back to eps.
    Catches: the rescale done on eps, a std over the whole batch, the phi mix reversed, the eps conversion wrong."""
    w = 4.0
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([8, 8, 8])
    y = torch.tensor([0, 1, 2])
    out = ClassifierFreeGuidance(CountingModel(), y, w, batched=batched, rescale=phi, schedule=schedule())(x, t)

    xd = x.double().numpy()
    alpha, sigma = np.sqrt(ABAR[8]), np.sqrt(1 - ABAR[8])
    eps_pos = CountingModel.reference(x, t, y).double().numpy()
    eps_neg = CountingModel.reference(x, t, torch.full_like(y, 5)).double().numpy()
    x0_pos, x0_neg = (xd - sigma * eps_pos) / alpha, (xd - sigma * eps_neg) / alpha
    x0_cfg = x0_neg + w * (x0_pos - x0_neg)
    def std(v):
        return v.reshape(len(v), -1).std(axis=1).reshape(-1, 1, 1, 1)
    x0_rescaled = x0_cfg * std(x0_pos) / std(x0_cfg)  # eq. 15
    x0_final = phi * x0_rescaled + (1 - phi) * x0_cfg  # eq. 16
    expected = (xd - alpha * x0_final) / sigma
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    if phi == 1.0:  # fully rescaled: the guided image has the conditional one's spread
        x0_out = (xd - sigma * out.double().numpy()) / alpha
        np.testing.assert_allclose(std(x0_out), std(x0_pos), rtol=1e-4)


@pytest.mark.parametrize("batched", [True, False])
def test_interval_guides_only_inside_and_calls_the_model_once_outside(batched):
    """t/(T-1) in [3/9, 5/9] with T = 10: indices 3, 4, 5 are guided (w = 3), the others get w = 1 from ONE
    conditional call. Catches: guidance outside the interval, an unguided step still paying for the null branch,
    an end excluded, the fraction taken over T instead of T-1 (index 5 would then be the only one inside)."""
    model, w = CountingModel(), 3.0
    y = torch.tensor([0, 2])
    den = ClassifierFreeGuidance(model, y, w, batched=batched, interval=(3 / 9, 5 / 9), schedule=schedule())
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    null = torch.full_like(y, 5)
    for index in range(10):
        t = torch.full((2,), index)
        model.calls.clear()
        out = den(x, t)
        cond = CountingModel.reference(x, t, y)
        if index in (3, 4, 5):
            uncond = CountingModel.reference(x, t, null)
            torch.testing.assert_close(out, uncond + w * (cond - uncond))
            assert [n for n, _ in model.calls] == ([4] if batched else [2, 2])
        else:
            torch.testing.assert_close(out, cond)
            assert len(model.calls) == 1 and torch.equal(model.calls[0][1], y)


def test_interval_with_mixed_timesteps_guides_per_sample():
    model, y = CountingModel(), torch.tensor([0, 1])
    den = ClassifierFreeGuidance(model, y, 2.0, batched=False, interval=(0.5, 1.0), schedule=schedule())
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([9, 1])
    cond, uncond = CountingModel.reference(x, t, y), CountingModel.reference(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(den(x, t), torch.stack([(uncond + 2.0 * (cond - uncond))[0], cond[1]]))


@pytest.mark.parametrize("sampler, steps, indices, calls", [
    ("ddim", 10, list(range(9, -1, -1)), 10 + 3),
    ("ddpm", None, list(range(9, -1, -1)), 10 + 3),
    ("dpmpp2m", 5, [9, 7, 5, 3, 1], 5 + 2),
])
def test_model_calls_per_sampling_run(sampler, steps, indices, calls):
    """Through make_denoiser and run_sampler: with interval (0.5, 0.8) on T = 10 the guided indices are 5, 6, 7
    (fractions 5/9..7/9); each costs 2 calls (two passes of N), every other step 1. Catches the interval lost on
    the way from SamplingConfig to the denoiser."""
    model = CountingModel()
    config = SamplingConfig(sampler=sampler, steps=steps, guidance=3.0, guidance_interval=(0.5, 0.8))
    den = make_denoiser(model, torch.tensor([0, 1]), config, schedule=schedule(), batched=False)
    seen = []
    run_sampler(den, schedule(), (2, 1, 2, 2), config, generator=torch.Generator().manual_seed(0),
                callback=lambda i, index, x, x0: seen.append(index))
    assert seen == indices
    assert len(model.calls) == calls
