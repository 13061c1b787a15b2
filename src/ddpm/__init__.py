"""ddpm: Denoising Diffusion Probabilistic Models in PyTorch.

    import ddpm, torch
    model = ddpm.UNet(ddpm.ModelConfig(image_size=32, in_channels=1, num_classes=10))
    schedule = ddpm.NoiseSchedule.from_config(ddpm.DiffusionConfig())
    loss = ddpm.training_loss(model, schedule, x0, labels)          # x0 in [-1, 1], labels int64
    images = ddpm.sample(model, schedule, labels=[0, 1, 2], guidance=3.0, sampler="dpmpp2m", steps=20)
    guide = ddpm.load_guide("runs/x", model, schedule=schedule)   # autoguidance: the run's guide/ snapshot
    images = ddpm.sample(model, schedule, labels=[0, 1, 2], guide=guide, guide_weight=2.0, guidance=1.0)
    edited = ddpm.inpaint(model, schedule, images, masks, labels=[0, 1, 2])  # also img2img, interpolate_images
    ddpm.distill("runs/x", steps=2)     # writes runs/x/distilled/steps_2, a student that draws in 2 calls:
    student = ddpm.open_model("runs/x/distilled/steps_2")
    images = ddpm.sample(student.model, student.schedule, labels=[0, 1, 2],
                         sampling=student.student.sampling(ddpm.SamplingConfig(), {"guide_weight": 2.6}))
"""
from .checkpoint import find_run_guide, from_pretrained, save_pretrained
from .config import DiffusionConfig, ModelConfig, RunConfig, RuntimeConfig, SamplingConfig, TrainConfig
from .diffusion import (
    draw_training_inputs,
    posterior_mean,
    predict_eps,
    predict_x0,
    q_sample,
    training_loss,
    training_losses,
)
from .distill import distill
from .editing import img2img, inpaint, interpolate_images, interpolate_seeds, invert, reconstruct, slerp
from .ema import EMA
from .errors import DdpmError
from .files import save_grid, save_images
from .guidance import ClassifierFreeGuidance, Guide, GuidedDenoiser, make_denoiser
from .pipeline import sample, sample_all, sample_batches
from .samplers import ddim_invert, ddim_sample, ddpm_sample, dpmpp_2m_sample
from .schedule import NoiseSchedule, cosine_betas, linear_betas
from .sources import Opened, Sources, default_sources, load_guide, open_model, resolve_sources
from .unet import UNet

__all__ = [
    "ClassifierFreeGuidance", "DdpmError", "DiffusionConfig", "EMA", "Guide", "GuidedDenoiser", "ModelConfig",
    "NoiseSchedule", "Opened", "RunConfig", "RuntimeConfig", "SamplingConfig", "Sources", "TrainConfig", "UNet",
    "cosine_betas", "ddim_invert", "ddim_sample", "ddpm_sample", "default_sources", "distill", "dpmpp_2m_sample",
    "draw_training_inputs",
    "find_run_guide", "from_pretrained", "img2img", "inpaint", "interpolate_images", "interpolate_seeds", "invert",
    "linear_betas", "load_guide", "make_denoiser", "open_model", "posterior_mean", "predict_eps", "predict_x0",
    "q_sample", "reconstruct", "resolve_sources", "sample", "sample_all", "sample_batches", "save_grid", "save_images",
    "save_pretrained", "slerp", "training_loss", "training_losses",
]
__version__ = "0.1.0"
