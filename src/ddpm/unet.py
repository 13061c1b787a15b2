"""The one UNet: the seed's design, unconditional or class-conditional.

Layout for the default 64x64 config (widths 64-128-256-256, bottleneck 512):

    64x64  DoubleConv 3->64 ...................................................... Up 128->64   (no attention)
    32x32    Down 64->128   + attention ..................................... Up 256->64  + attention
    16x16      Down 128->256 + attention ........................... Up 512->128 + attention
     8x8         Down 256->256 + attention -> bottleneck 256->512->512->256

Attention sits at every resolution below the input's (32, 16 and 8 for 64x64), never at full resolution,
so memory grows linearly with the batch. Nothing depends on a fixed image size: any multiple of 8 works
(of 2**(levels-1) in general).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the timestep index: [sin(t w_k), cos(t w_k)], w_k = 10000^(-2k/dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DoubleConv(nn.Module):
    """Conv3x3 -> GroupNorm -> GELU -> Conv3x3 -> GroupNorm, optionally residual: GELU(x + f(x))."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, residual: bool = False):
        super().__init__()
        if residual and in_ch != out_ch:
            raise ValueError("a residual DoubleConv needs in_ch == out_ch")
        mid_ch = mid_ch or out_ch
        self.residual = residual
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.GroupNorm(1, mid_ch),
            nn.GELU(),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return F.gelu(x + self.block(x))
        return self.block(x)


class Down(nn.Module):
    """MaxPool 2x2 -> DoubleConv (residual) -> DoubleConv -> + projected time embedding (broadcast over H, W)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.convs = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_ch, in_ch, residual=True), DoubleConv(in_ch, out_ch))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.convs(x) + self.emb(emb)[:, :, None, None]


class Up(nn.Module):
    """Upsample x2 -> concat skip -> DoubleConv (residual) -> DoubleConv -> + projected time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.convs = nn.Sequential(DoubleConv(in_ch, in_ch, residual=True), DoubleConv(in_ch, out_ch, in_ch // 2))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip, self.up(x)], dim=1)
        return self.convs(x) + self.emb(emb)[:, :, None, None]


class SelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention over the H*W positions, then a pre-LayerNorm feed-forward."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ff = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # [N, HW, C]; sizes read from the input, never hard-coded
        q, k, v = self.qkv(self.norm(seq)).view(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, C/heads]
        seq = seq + self.proj(attn.transpose(1, 2).reshape(n, h * w, c))
        seq = seq + self.ff(seq)
        return seq.transpose(1, 2).reshape(n, c, h, w)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]). `config.num_classes=None` is unconditional; otherwise labels 0..K-1 and the
    learned null class K (`self.null_class`) used by classifier-free guidance."""

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            raise TypeError("give either a ModelConfig or keyword overrides, not both")
        self.config = config
        emb = config.time_embed_dim
        widths = [config.base_channels * m for m in config.channel_mults]
        bottleneck = config.base_channels * config.bottleneck_mult
        out_channels = config.out_channels or config.in_channels

        def attention(ch: int) -> nn.Module:
            return SelfAttention(ch, config.num_heads) if config.attention else nn.Identity()

        self.inc = DoubleConv(config.in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i - 1], widths[i], emb) for i in range(1, len(widths)))
        self.down_attns = nn.ModuleList(attention(widths[i]) for i in range(1, len(widths)))
        self.bottleneck = nn.Sequential(
            DoubleConv(widths[-1], bottleneck), DoubleConv(bottleneck, bottleneck), DoubleConv(bottleneck, widths[-1])
        )
        # Up at skip level i (i = L-2 .. 0) takes current + skip channels and returns the next skip's width.
        ups, up_attns, ch = [], [], widths[-1]
        for i in range(len(widths) - 2, -1, -1):
            out = widths[max(i - 1, 0)]
            ups.append(Up(ch + widths[i], out, emb))
            up_attns.append(attention(out) if i > 0 else nn.Identity())  # i == 0 is full resolution
            ch = out
        self.ups = nn.ModuleList(ups)
        self.up_attns = nn.ModuleList(up_attns)
        self.outc = nn.Conv2d(ch, out_channels, kernel_size=1)
        self.input_skip = None
        if config.input_skip:  # see ModelConfig.input_skip: lets eps follow the scale of x_t
            self.input_skip = nn.Conv2d(config.in_channels, out_channels, kernel_size=1)
            with torch.no_grad():
                self.input_skip.bias.zero_()
                self.input_skip.weight.zero_()
                if config.in_channels == out_channels:
                    self.input_skip.weight[:, :, 0, 0] = torch.eye(out_channels)
        self.label_emb = nn.Embedding(config.num_classes + 1, emb) if config.num_classes else None
        self.weight_emb = None
        if config.weight_input:  # a distilled student: the guidance weight, embedded like t and added to it
            self.weight_emb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
            with torch.no_grad():  # zero at the start: the untrained student computes exactly what its teacher does
                self.weight_emb[-1].weight.zero_()
                self.weight_emb[-1].bias.zero_()

    @property
    def null_class(self) -> int | None:
        """The label index that means "no label" (classifier-free guidance), or None for unconditional models."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """eps (or v) for x_t at timestep indices t [N], labels y [N] of a conditional model, and for a distilled
        student (`config.weight_input`) the guidance weight [N] it draws at; None: the weight embedding is left out,
        which is the teacher's network."""
        if (y is None) != (self.label_emb is None):
            raise ValueError(
                "labels are required for a class-conditional model and not allowed for an unconditional one "
                f"(this model: num_classes={self.config.num_classes}, labels {'missing' if y is None else 'given'})"
            )
        emb = sinusoidal_embedding(t, self.config.time_embed_dim).to(x.dtype)
        if y is not None:
            emb = emb + self.label_emb(y)
        if weight is not None:
            if self.weight_emb is None:
                raise ValueError("a guidance weight was given to a model without a weight input (not a student)")
            # x100: the slider's weights (0..10) span the same range of frequencies as the timestep indices
            weight_features = sinusoidal_embedding(weight * 100, self.config.time_embed_dim).to(x.dtype)
            emb = emb + self.weight_emb(weight_features)
        h = self.inc(x)
        skips = [h]
        for down, attn in zip(self.downs, self.down_attns):
            h = attn(down(h, emb))
            skips.append(h)
        h = self.bottleneck(skips.pop())
        for up, attn in zip(self.ups, self.up_attns):
            h = attn(up(h, skips.pop(), emb))
        out = self.outc(h)
        return out if self.input_skip is None else out + self.input_skip(x)


def attention_resolutions(model: UNet, image_size: int) -> list[int]:
    """The spatial sizes at which the model's SelfAttention blocks run for a given input size (by a forward hook)."""
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for m in model.modules() if isinstance(m, SelfAttention)
    ]
    try:
        c = model.config
        x = torch.zeros(1, c.in_channels, image_size, image_size, device=next(model.parameters()).device)
        y = torch.zeros(1, dtype=torch.long, device=x.device) if c.num_classes else None
        with torch.no_grad():
            model(x, torch.zeros(1, dtype=torch.long, device=x.device), y)
    finally:
        for h in hooks:
            h.remove()
    return sizes
