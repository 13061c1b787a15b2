"""v-prediction and min-SNR weighting: the weight against its formula in float64, the equivalence it rests on, the
v target, and every sampler recovering a single-point dataset from an exact denoiser of either kind."""
import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, NoiseSchedule, sample
from ddpm.diffusion import eps_from_output, min_snr_weight, prediction_target, q_sample, training_losses
from helpers import tiny_model_config


def betas_float64(T=1000):
    return np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=np.float64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_is_the_formula_in_float64(prediction):
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    abar = np.cumprod(1 - betas_float64())
    t = torch.tensor([0, 5, 50, 200, 500, 999])
    for gamma in (1.0, 5.0):
        got = min_snr_weight(schedule, t, gamma, prediction).double().numpy()
        snr = abar[t.numpy()] / (1 - abar[t.numpy()])
        expected = np.minimum(snr, gamma) / (snr if prediction == "eps" else snr + 1)
        np.testing.assert_allclose(got, expected, rtol=2e-4)  # float32 tables: SNR at t=0 is ~1e4


def test_the_weights_put_eps_and_v_errors_on_the_x0_scale():
    """At fixed x_t, ||eps - eps'||^2 = SNR ||x0 - x0'||^2 and ||v - v'||^2 = (SNR + 1) ||x0 - x0'||^2, which is why
    min(SNR, g)/SNR and min(SNR, g)/(SNR + 1) both mean 'min(SNR, g) times the x0 error' (Hang et al. 2023)."""
    schedule = NoiseSchedule.from_config(DiffusionConfig()).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0, other = (torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 100, 400, 900])
    x_t = q_sample(schedule, x0, t, noise)
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    def eps_of(x):
        return (x_t - abar.sqrt() * x) / (1 - abar).sqrt()  # the eps that x0 = x implies at this x_t
    def v_of(x):
        return abar.sqrt() * eps_of(x) - (1 - abar).sqrt() * x
    snr = (abar / (1 - abar)).flatten()
    x0_error = (x0 - other).square().flatten(1).sum(1)
    torch.testing.assert_close((eps_of(x0) - eps_of(other)).square().flatten(1).sum(1), snr * x0_error)
    torch.testing.assert_close((v_of(x0) - v_of(other)).square().flatten(1).sum(1), (snr + 1) * x0_error)
    # the library's own tables (float32 values of the float64 derivation) against abar's: equal to float32 precision
    torch.testing.assert_close(prediction_target(schedule, x0, t, noise, "v"), v_of(x0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_from_output(schedule, x_t, t, v_of(x0), "v"), noise, rtol=1e-4, atol=1e-4)


class ExactDenoiser(torch.nn.Module):
    """The Bayes-optimal network for data that is one point p: outputs the exact eps or v at every (x_t, t)."""

    null_class = None

    def __init__(self, point, schedule, prediction):
        super().__init__()
        self.config = tiny_model_config(image_size=point.shape[-1], in_channels=point.shape[0], base_channels=4,
                                        bottleneck_mult=1, time_embed_dim=4, num_heads=1)
        self.register_buffer("point", point)
        self.schedule, self.prediction = schedule, prediction
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the pipeline reads the device from a parameter

    def forward(self, x_t, t, y=None):
        abar = self.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * self.point) / (1 - abar).sqrt()
        return eps if self.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * self.point


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 20), ("dpmpp2m", 10)])
def test_every_sampler_recovers_a_single_point_dataset_for_each_target(prediction, sampler, steps):
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=100, prediction=prediction))
    point = torch.linspace(-0.9, 0.9, 16).reshape(1, 4, 4)
    model = ExactDenoiser(point, schedule, prediction)
    images = sample(model, schedule, n=3, sampler=sampler, steps=steps, guidance_interval=None,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, point.expand(3, 1, 4, 4), atol=2e-3, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_zero_for_the_exact_output_and_weighting_applies_per_sample(prediction):
    schedule = NoiseSchedule.from_config(DiffusionConfig(prediction=prediction))
    point = torch.full((1, 2, 2), 0.5)
    x0 = point.expand(64, 1, 2, 2)
    model = ExactDenoiser(point, schedule, prediction)
    loss, _ = training_losses(model, schedule, x0, generator=torch.Generator().manual_seed(1), prediction=prediction)
    assert loss.max().item() < 1e-6

    class Zero(torch.nn.Module):
        null_class = None

        def forward(self, x_t, t, y=None):
            return torch.zeros_like(x_t)

    def gen():
        return torch.Generator().manual_seed(2)
    plain, t = training_losses(Zero(), schedule, x0, generator=gen(), prediction=prediction)
    weighted, t2 = training_losses(Zero(), schedule, x0, generator=gen(), prediction=prediction, snr_gamma=5.0)
    assert torch.equal(t, t2)
    torch.testing.assert_close(weighted, plain * min_snr_weight(schedule, t, 5.0, prediction))
