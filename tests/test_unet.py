import math

import pytest
import torch

from ddpm import ModelConfig, UNet
from ddpm.config import ConfigError
from ddpm.unet import SelfAttention, attention_resolutions, sinusoidal_embedding


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 4])
def test_output_shape(size, channels, num_classes, tiny_config):
    model = UNet(tiny_config(image_size=size, in_channels=channels, channel_mults=(1, 2, 2, 2),
                             num_classes=num_classes))
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 3]) if num_classes else None
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999]), y).shape == x.shape


def test_attention_at_the_three_lower_resolutions_only(tiny_config):
    # the default four levels (1, 2, 4, 4) at 64x64 RGB, only narrow
    model = UNet(tiny_config(image_size=64, in_channels=3, channel_mults=(1, 2, 4, 4)))
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 5
    assert sorted(set(attention_resolutions(model, 64))) == [8, 16, 32]  # never 64x64
    # the same model runs at another size: nothing is tied to 64
    assert sorted(set(attention_resolutions(model, 32))) == [4, 8, 16]


def test_default_model_is_the_seed_channel_plan():
    model = UNet()
    assert model.inc.block[0].out_channels == 64
    assert [d.emb[1].out_features for d in model.downs] == [128, 256, 256]
    assert model.bottleneck[0].block[0].out_channels == 512
    assert [u.emb[1].out_features for u in model.ups] == [128, 64, 64]
    assert model.label_emb is None and model.null_class is None


def test_labels_required_iff_conditional(tiny_config):
    cond, uncond = UNet(tiny_config(num_classes=3)), UNet(tiny_config())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="labels"):
        cond(x, t)
    with pytest.raises(ValueError, match="labels"):
        uncond(x, t, torch.tensor([0, 1]))
    assert cond.null_class == 3 and cond.label_emb.num_embeddings == 4  # K classes + the learned null class


def test_output_depends_on_time_and_label(tiny_config):
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=3)).eval()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor([5]), torch.tensor([0]))
        b = model(x, torch.tensor([500]), torch.tensor([0]))
        c = model(x, torch.tensor([5]), torch.tensor([1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_image_size_must_divide():
    with pytest.raises(ConfigError, match="multiple of 8"):
        ModelConfig(image_size=60)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ModelConfig(image_size=10, channel_mults=(1, 2, 2))


def test_sdpa_attention_equals_the_textbook_formula():
    torch.manual_seed(1)
    block = SelfAttention(16, num_heads=4).eval()
    x = torch.randn(2, 16, 3, 5)  # non-square: no size is assumed
    seq = x.flatten(2).transpose(1, 2)
    q, k, v = block.qkv(block.norm(seq)).chunk(3, dim=-1)
    def heads(z):
        return z.view(2, 15, 4, 4).transpose(1, 2)
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    attn = (weights @ heads(v)).transpose(1, 2).reshape(2, 15, 16)
    seq = seq + block.proj(attn)
    seq = seq + block.ff(seq)
    expected = seq.transpose(1, 2).reshape(2, 16, 3, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_output(tiny_config):
    torch.manual_seed(2)
    model = UNet(tiny_config(image_size=16, channel_mults=(1, 2, 2))).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        plain = model(x, t)
        fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8)
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expected = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_the_network_sees_the_scale_of_its_input(tiny_config):
    """Every path of the seed's UNet starts with a GroupNorm, so it cannot tell x from 2x; ours can."""
    torch.manual_seed(3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999, 500])
    with torch.no_grad():
        seed_like = UNet(tiny_config(input_skip=False)).eval()
        torch.testing.assert_close(seed_like(2 * x, t), seed_like(x, t), atol=1e-4, rtol=1e-4)
        ours = UNet(tiny_config()).eval()
        assert (ours(2 * x, t) - ours(x, t)).abs().max() > 0.5
