"""README's picture of the colour benchmark (issue 36): for each of the 7 photos, 4 images drawn by what `ddpm sample
RUN` draws with no flags (the post-hoc default, autoguided), by the seed's default (RUN/model, the classic EMA, with
classifier-free guidance w = 3 at every step, no guide), and 4 real crops; the same noise for both models.

    python benchmarks/colour_grid.py [RUN] [--out docs/photos32_grid.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ddpm.config import SamplingConfig, sampling_defaults  # noqa: E402
from ddpm.data import photos  # noqa: E402
from ddpm.files import make_grid  # noqa: E402
from ddpm.pipeline import sample  # noqa: E402
from ddpm.sources import open_model  # noqa: E402

PER_CLASS = 4


def real_crops(image_size: int, num_classes: int) -> torch.Tensor:
    """The first PER_CLASS crops of each photo, in [-1, 1], class by class."""
    data = photos(image_size).dataset
    images, labels = data.tensors
    return torch.cat([images[labels == k][:PER_CLASS] for k in range(num_classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/photos32")
    parser.add_argument("--out", default="docs/photos32_grid.png")
    args = parser.parse_args()
    run = Path(args.run)
    default = open_model(run, "cpu")
    seed = open_model(run / "model", "cpu", guide="none")
    c = default.model.config
    labels = torch.arange(c.num_classes).repeat_interleave(PER_CLASS)
    x_T = torch.randn(len(labels), c.in_channels, c.image_size, c.image_size,
                      generator=torch.Generator().manual_seed(0))
    panels = {
        "ddpm sample RUN": sample(default.model, default.schedule, labels=labels, x_T=x_T, guide=default.guide,
                                  sampling=SamplingConfig(**sampling_defaults(default.guide is not None))),
        "seed default: CFG w=3": sample(seed.model, seed.schedule, labels=labels, x_T=x_T,
                                        sampling=SamplingConfig(guidance=3.0, guidance_interval=(0.0, 1.0))),
        "real crops": real_crops(c.image_size, c.num_classes),
    }
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 7 * 1.05), dpi=100)
    for ax, (title, images) in zip(axes, panels.items()):
        ax.imshow(make_grid(images, nrow=PER_CLASS).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=10, loc="left")
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
