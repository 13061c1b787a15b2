"""Editing (image-to-image, inpainting, DDIM inversion, interpolation) against plain sampling, closed forms and
Monte-Carlo estimates: the samplers' start state and state hook, strength 0 and 1, q(x_t | x_0) on the known
pixels, the Gaussian data's exact flow for the inversion, and the end frames of interpolation."""
import math

import numpy as np
import pytest
import torch

from ddpm import (
    DiffusionConfig,
    NoiseSchedule,
    SamplingConfig,
    UNet,
    ddim_invert,
    ddim_sample,
    img2img,
    inpaint,
    interpolate_images,
    interpolate_seeds,
    reconstruct,
    sample,
    slerp,
)
from ddpm.errors import DdpmError
from ddpm.samplers import sampler_timesteps

T = 40  # small: the ancestral sampler runs all T steps in several tests
LABELS = torch.tensor([0, 2, 1])
SETTINGS = {
    "ddpm": SamplingConfig(sampler="ddpm", guidance=3.0),
    "ddim eta 1": SamplingConfig(sampler="ddim", steps=8, eta=1.0, guidance=3.0),
    "ddim": SamplingConfig(sampler="ddim", steps=8, guidance=3.0),
    "dpmpp2m": SamplingConfig(sampler="dpmpp2m", steps=8, guidance=3.0),
}


def unet(tiny_config, seed, **overrides):
    torch.manual_seed(seed)
    model = UNet(tiny_config(**overrides)).eval()
    with torch.no_grad():  # a fresh UNet is nearly the identity (input_skip): make it predict something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def schedule(timesteps=T):
    return NoiseSchedule.from_config(DiffusionConfig(timesteps=timesteps))


def images(n=3, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_sampler_started_at_its_first_index_from_the_same_noise_draws_the_same_images(tiny_config, name):
    # The bug it catches: start_index or x_T changing the run (a skipped or repeated first step, another draw).
    model, sch, sampling = unet(tiny_config, 0, num_classes=3), schedule(), SETTINGS[name]
    plain = sample(model, sch, labels=LABELS, sampling=sampling, generator=generator())
    g = generator()
    noise = torch.randn(3, 1, 8, 8, generator=g)
    started = sample(model, sch, labels=LABELS, sampling=sampling, generator=g, x_T=noise,
                     start_index=sampler_timesteps(sampling, sch)[0])
    assert torch.equal(plain, started)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp2m"])
def test_start_index_runs_exactly_the_steps_at_or_below_it(tiny_config, name):
    model, sch, sampling = unet(tiny_config, 0), schedule(), SETTINGS[name]
    seq = sampler_timesteps(sampling, sch)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(int(args[1][0])))
    start = seq[len(seq) // 2]
    sample(model, sch, 2, sampling=sampling, generator=generator(), x_T=torch.zeros(2, 1, 8, 8), start_index=start)
    assert seen == [index for index in seq if index <= start]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_sampler_stopped_at_an_index_returns_the_full_runs_state_there(tiny_config, name):
    # The bug it catches: stop_index running a step too many or too few, or finishing with the final step's x0.
    model, sch, sampling = unet(tiny_config, 0, num_classes=3), schedule(), SETTINGS[name]
    seq = sampler_timesteps(sampling, sch)
    states = []
    sample(model, sch, labels=LABELS, sampling=sampling, generator=generator(),
           callback=lambda i, index, x, x0: states.append(x.clone()))
    stopped = sample(model, sch, labels=LABELS, sampling=sampling, generator=generator(), stop_index=seq[3])
    assert torch.equal(stopped, states[2])


@pytest.mark.parametrize("name", list(SETTINGS))
def test_img2img_keeps_the_image_at_strength_0_and_is_plain_sampling_at_strength_1(tiny_config, name):
    # The bugs it catches: strength 1 noising the image (sqrt(abar_T) x0 is not 0) or drawing its noise in another
    # order than sample() does; strength 0 running a step. Labels, CFG w = 3 and autoguidance g = 2 all on.
    model, guide, sch, sampling = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3), \
        schedule(), SETTINGS[name]
    sampling = SamplingConfig(**{**sampling.__dict__, "guide_weight": 2.0})
    x0 = images()
    assert torch.equal(img2img(model, sch, x0, 0.0, labels=LABELS, sampling=sampling, generator=generator(),
                               guide=guide), x0)
    plain = sample(model, sch, labels=LABELS, sampling=sampling, generator=generator(), guide=guide)
    full = img2img(model, sch, x0, 1.0, labels=LABELS, sampling=sampling, generator=generator(), guide=guide)
    assert torch.equal(full, plain)
    half = img2img(model, sch, x0, 0.5, labels=LABELS, sampling=sampling, generator=generator(), guide=guide)
    assert not torch.equal(half, plain) and not torch.equal(half, x0)


def test_img2img_starts_from_q_of_the_image_at_the_steps_left(tiny_config):
    # Float64 recomputation of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z at the first of the last half of DDIM's
    # steps, z the generator's first draw. Catches: the wrong timestep (a step too early or late), sqrt's missing.
    model, sch, sampling = unet(tiny_config, 0), schedule(), SamplingConfig(sampler="ddim", steps=10)
    seq = sampler_timesteps(sampling, sch)
    calls = []
    model.register_forward_pre_hook(lambda _, args: calls.append((args[0].double().clone(), int(args[1][0]))))
    x0 = images()
    img2img(model, sch, x0, 0.5, sampling=sampling, generator=generator())
    z = torch.randn(x0.shape, generator=generator()).double()
    abar = np.cumprod(1 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
    start = seq[5]
    expected = math.sqrt(abar[start]) * x0.double() + math.sqrt(1 - abar[start]) * z
    assert calls[0][1] == start and len(calls) == 5
    torch.testing.assert_close(calls[0][0], expected, rtol=0, atol=1e-5)


def test_inpainting_keeps_the_known_pixels_exactly_and_draws_them_from_q_on_the_way(tiny_config):
    # The bugs it catches: known pixels not put back at the end (the result only close to the image), or put back at
    # the wrong noise level on the way (the step's own timestep instead of the new state's; checked by a
    # Monte-Carlo estimate of the standardised known pixels' mean and spread at every intermediate state).
    model, sch = unet(tiny_config, 0, num_classes=3), schedule()
    sampling = SamplingConfig(sampler="ddim", steps=4, guidance=3.0)
    seq = sampler_timesteps(sampling, sch)
    x0 = torch.full((32, 1, 8, 8), 0.8)
    masks = torch.zeros(32, 1, 8, 8, dtype=torch.bool)
    masks[..., :, 4:] = True  # regenerate the right half
    states = []
    out = inpaint(model, sch, x0, masks, labels=torch.arange(32) % 3, sampling=sampling, generator=generator(),
                  callback=lambda i, index, x, _: states.append((i, x.clone())))
    assert torch.equal(out[~masks.expand_as(out)], x0[~masks.expand_as(x0)])
    assert not torch.allclose(out[masks.expand_as(out)], x0[masks.expand_as(x0)], atol=0.05)
    abar = sch.alphas_cumprod.double()
    for i, x in states[:-1]:
        new_index = seq[i + 1]
        z = (x.double() - abar[new_index].sqrt() * 0.8) / (1 - abar[new_index]).sqrt()
        known = z[~masks.expand_as(z)]  # 1,024 pixels: the mean's standard error is 0.03
        assert abs(float(known.mean())) < 0.15 and abs(float(known.std()) - 1) < 0.1, (i, new_index)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp2m"])
def test_resampled_inpainting_keeps_the_known_pixels_and_runs_each_segment_r_times(tiny_config, name):
    # The bugs it catches: a resampled run that loses the known pixels, skips or repeats segments (the model calls
    # must be R times the sampler's steps), or stops short of the final image.
    model, sch = unet(tiny_config, 0), schedule()
    sampling = SamplingConfig(**{**SETTINGS[name].__dict__, "guidance": 1.0})
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    x0, masks = images(), torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    masks[..., 4:] = True
    out = inpaint(model, sch, x0, masks, sampling=sampling, generator=generator(), resample=3)
    assert torch.equal(out[~masks.expand_as(out)], x0[~masks.expand_as(x0)])
    steps = len(sampler_timesteps(sampling, sch))
    segments = steps - 1  # every step but the last one, to the image, is inside a resampled segment
    assert len(calls) == 3 * segments + 1


def test_a_jump_back_in_time_draws_q_of_the_earlier_state():
    # Monte-Carlo against the closed form: x_b ~ q(x_b | x_0 = c) jumped back to a > b must be q(x_a | x_0 = c):
    # mean sqrt(abar_a) c, variance 1 - abar_a. Catches a jump with the wrong ratio or a missing square root.
    from ddpm.editing import renoise

    sch = schedule(1000)
    abar = sch.alphas_cumprod.double()
    a, b, c = 600, 300, 0.7
    x_b = abar[b].sqrt() * c + (1 - abar[b]).sqrt() * torch.randn(200_000, generator=generator(1), dtype=torch.float64)
    x_a = renoise(x_b, sch, a, b, generator(2))
    assert abs(float(x_a.mean()) - float(abar[a].sqrt() * c)) < 0.01
    assert abs(float(x_a.var()) - float(1 - abar[a])) < 0.01


def test_inpainting_hears_labels_and_guidance(tiny_config):
    # The bug it catches: an edit that drops the labels, CFG or the guide (every sampler call goes through sample()).
    model, guide, sch = unet(tiny_config, 0, num_classes=3), unet(tiny_config, 1, num_classes=3), schedule()
    x0, masks = images(), torch.ones(3, 1, 8, 8, dtype=torch.bool)
    masks[..., :4, :] = False
    guide_calls = []
    guide.register_forward_pre_hook(lambda *_: guide_calls.append(1))

    def run(labels=LABELS, **options):
        sampling = SamplingConfig(sampler="dpmpp2m", steps=4, guidance_interval=None, **options)
        return inpaint(model, sch, x0, masks, labels=labels, sampling=sampling, generator=generator(), guide=guide)

    base = run(guidance=1.0)
    assert not guide_calls
    assert not torch.equal(base, run(labels=torch.tensor([1, 0, 2]), guidance=1.0))
    assert not torch.equal(base, run(guidance=3.0))
    assert not torch.equal(base, run(guidance=1.0, guide_weight=2.0)) and len(guide_calls) == 4


def gaussian_denoiser(sch, mu, s):
    """The exact eps of data N(mu, s^2 I): E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)
    (Tweedie's formula for a Gaussian)."""
    abar = sch.alphas_cumprod

    def eps(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
    return eps


def test_ddim_inversion_follows_the_exact_flow_of_gaussian_data_and_round_trips():
    # Independent oracle: for N(mu, s^2) data the probability-flow ODE scales each pixel's distance from sqrt(abar)
    # mu by sqrt(abar s^2 + 1 - abar) (closed form; DDIM is its discretisation in the schedule's steps). Catches
    # the inversion stepping with the wrong eps, abar or direction; the bound is the 50-step discretisation's.
    sch, mu, s = schedule(1000), 0.3, 0.5
    abar = sch.alphas_cumprod.double()
    x0 = mu + s * torch.randn(64, 1, 8, 8, generator=generator(3))
    denoiser = gaussian_denoiser(sch, mu, s)

    def exact(x, a_from, a_to):
        return a_to.sqrt() * mu + (x.double() - a_from.sqrt() * mu) * ((a_to * s**2 + 1 - a_to) /
                                                                          (a_from * s**2 + 1 - a_from)).sqrt()

    errors, round_trips = {}, {}
    for steps in (50, 200):
        x_T = ddim_invert(denoiser, sch, x0, steps=steps)
        flow = exact(x0, abar[0], abar[-1])
        errors[steps] = float((x_T.double() - flow).abs().max() / flow.std())
        back = ddim_sample(denoiser, sch, x0.shape, steps=steps, x_T=x_T)
        round_trips[steps] = float((back.double() - x0.double()).pow(2).mean().sqrt())
    # DDIM is the ODE's first-order (Euler) step in its own variables: 4x the steps, a quarter of the error
    # (measured 0.213 -> 0.054 of x_T's spread, round trip RMS 0.055 -> 0.014)
    assert errors[50] < 0.25 and 3.5 < errors[50] / errors[200] < 4.5, errors
    assert round_trips[50] < 0.06 and 3.5 < round_trips[50] / round_trips[200] < 4.5, round_trips


def test_slerp_is_the_great_circle():
    a = torch.randn(2, 1, 8, 8, generator=generator(5))
    b = torch.randn(2, 1, 8, 8, generator=generator(6))
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # equal norms: a great circle
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    theta = torch.arccos((fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)))
    mid = slerp(a, b, 0.3).flatten(1).double()
    angle = torch.arccos((mid * fa).sum(1) / (mid.norm(dim=1) * fa.norm(dim=1)))
    torch.testing.assert_close(angle, 0.3 * theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mid.norm(dim=1), fa.norm(dim=1), rtol=1e-6, atol=0)  # on the sphere, not inside
    same = slerp(a, a * 2, 0.5)  # parallel: the straight line
    torch.testing.assert_close(same, 1.5 * a)


def test_interpolation_ends_are_the_reconstructions_and_the_seeds_images(tiny_config):
    # The bugs it catches: end frames that are not the two inputs' DDIM reconstructions (the frames' alphas off, or
    # another decoder than reconstruct's), seed interpolation that does not start at `ddpm sample --seed A`'s image.
    model, sch = unet(tiny_config, 0, num_classes=3), schedule()
    sampling = SamplingConfig(sampler="ddim", steps=10, guidance=1.0)
    a, b = images(1, 7), images(1, 8)
    frames = interpolate_images(model, sch, a, b, 5, labels=[0, 2], sampling=sampling)
    # (1e-4: the frames are decoded in a batch of 5, the reconstructions alone; convolutions round by batch)
    assert frames.shape == (5, 1, 8, 8)
    torch.testing.assert_close(frames[:1], reconstruct(model, sch, a, labels=[0], sampling=sampling), rtol=0, atol=1e-4)
    torch.testing.assert_close(frames[4:], reconstruct(model, sch, b, labels=[2], sampling=sampling), rtol=0, atol=1e-4)
    assert (frames[1:] - frames[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0
    from ddpm import sample_all

    dpm = SamplingConfig(steps=6, guidance=1.0)
    seeds = interpolate_seeds(model, sch, 11, 12, 4, labels=[1], sampling=dpm)
    for seed, frame in ((11, seeds[:1]), (12, seeds[3:])):
        drawn = sample_all(model, sch, labels=torch.tensor([1]), sampling=dpm, seed=seed)
        torch.testing.assert_close(frame, drawn, rtol=0, atol=1e-4)


def test_edits_refuse_bad_settings_in_one_line(tiny_config):
    model, sch = unet(tiny_config, 0, num_classes=3), schedule()
    x0 = images()
    for call, words in (
        (lambda: img2img(model, sch, x0, 1.5, labels=LABELS), "strength must be in [0, 1]"),
        (lambda: img2img(model, sch, x0, -0.1, labels=LABELS), "strength must be in [0, 1]"),
        (lambda: img2img(model, sch, x0, 0.5, labels=[0, 1]), "2 labels for 3 images"),
        (lambda: inpaint(model, sch, x0, torch.ones(3, 1, 4, 4, dtype=torch.bool), labels=LABELS), "do not fit"),
        (lambda: interpolate_images(model, sch, x0[:1], x0[1:2], 1, labels=[0]), "at least 2 frames"),
        (lambda: interpolate_seeds(model, sch, 0, 1, 3, labels=[0, 1, 2]), "one label for all frames or two"),
    ):
        with pytest.raises(DdpmError, match=None) as raised:
            call()
        assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("strength, steps, expected", [(0.29, 100, 29), (0.3, 25, 8), (0.7, 10, 7), (0.04, 25, 1)])
def test_image_to_image_runs_the_rounded_share_of_the_samplers_steps(strength, steps, expected):
    # bug caught: the share truncated (0.29 x 100 is 28.999... in floats: one step fewer than asked, a weaker edit;
    # 0.3 x 25 = 7.5 -> 7); the counts are worked out by hand
    from ddpm.editing import steps_left

    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=1000))
    assert len(steps_left(SamplingConfig(sampler="ddim", steps=steps), schedule, strength)) == expected


def test_an_interpolations_two_labels_split_the_frames_at_the_middle_frame_going_to_b():
    # bug caught: the middle frame of an odd count (alpha exactly 0.5) given A's class, against the docstring
    from ddpm.editing import _frame_labels

    assert _frame_labels([3, 7], 5, "cpu").tolist() == [3, 3, 7, 7, 7]
    assert _frame_labels([3, 7], 4, "cpu").tolist() == [3, 3, 7, 7]
    assert _frame_labels([3], 3, "cpu").tolist() == [3, 3, 3]


def test_a_mask_pixel_at_the_threshold_grey_is_regenerated(tmp_path):
    # bug caught: the threshold exclusive (a mask painted in 50% grey, or an antialiased edge at 128, kept instead
    # of redrawn, against "at least MASK_THRESHOLD"); a mask at the image's size, so no resize blurs the columns
    from PIL import Image

    from ddpm.images import MASK_THRESHOLD, read_mask

    assert MASK_THRESHOLD == 128
    columns = np.array([0, 127, 128, 129, 255, 128, 127, 255], dtype=np.uint8)
    Image.fromarray(np.tile(columns, (8, 1))).save(tmp_path / "mask.png")
    mask, grey = read_mask(tmp_path / "mask.png", 8, (8, 8))
    assert grey and mask.shape == (1, 8, 8)
    assert mask[0, 0].tolist() == [False, False, True, True, True, True, False, True]
