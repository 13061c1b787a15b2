"""Named starting points for `ddpm train --preset NAME`; any flag given on the command line overrides them."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The quickstart: class-conditional digits on a laptop CPU in under four minutes of training (see README).
    # v-prediction with min-SNR-5 weighting won the measurement in benchmarks/RESULTS.md ("Objectives"): at equal
    # steps it is closest to the real digits, and 1,000 steps of it beat 1,500 of the plain eps loss.
    "quickstart": {
        "model": {"image_size": 16, "base_channels": 32, "channel_mults": (1, 2, 2), "bottleneck_mult": 4},
        "diffusion": {"prediction": "v"},
        "train": {"data": "mnist", "conditional": True, "batch_size": 64, "lr": 2e-3,
                  "warmup_steps": 100, "ema_decay": 0.995, "ema_warmup": 100, "snr_gamma": 5.0},
        # quality in the log (--eval-every): 200 images at 10 steps every 250 steps, about 10% of the training time
        # (benchmarks/RESULTS.md, "Quality in the training log")
        "runtime": {"steps": 1000, "sample_every": 500, "sample_steps": 25, "checkpoint_every": 250,
                    "eval_every": 250, "eval_n": 200, "eval_steps": 10},
    },
    # The quickstart's colour counterpart (issue 36): the bundled photos (RGB, one class per source photo) at 32x32,
    # about 2,000 steps in 15 minutes on 2 CPU cores, with the quickstart's objective and schedule of EMA and guide.
    "photos32": {
        "model": {"image_size": 32, "base_channels": 32, "channel_mults": (1, 2, 2), "bottleneck_mult": 4},
        "diffusion": {"prediction": "v"},
        "train": {"data": "photos", "conditional": True, "batch_size": 32, "lr": 1e-3, "warmup_steps": 100,
                  "ema_decay": 0.995, "ema_warmup": 100, "snr_gamma": 5.0},
        "runtime": {"steps": 2000, "sample_every": 1000, "sample_steps": 25, "checkpoint_every": 500},
    },
    # The seed's runs take v-prediction with min-SNR-5 instead of the seed's plain eps loss: it won on the 16x16
    # digits, tied on the 32x32 colour photos at 2,000 steps and won there at 8,000 (FID 153.6 against 163.2, two
    # seeds; benchmarks/RESULTS.md, "Colour"), and these runs are long.
    # The seed's unconditional run: 64x64 RGB on a folder of landscape photos (give the folder as DATA).
    "landscape64": {
        "model": {"image_size": 64},
        "diffusion": {"prediction": "v"},
        "train": {"conditional": False, "batch_size": 12, "lr": 3e-4, "snr_gamma": 5.0},
        "runtime": {"epochs": 500},
    },
    # The seed's conditional run: CIFAR-10 upscaled to 64x64, classifier-free guidance w=3.
    "cifar10-64": {
        "model": {"image_size": 64},
        "diffusion": {"prediction": "v"},
        "train": {"conditional": True, "batch_size": 14, "lr": 3e-4, "snr_gamma": 5.0},
        "runtime": {"epochs": 300, "guidance": 3.0},
    },
}
