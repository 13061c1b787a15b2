import pytest
import torch

from ddpm import ClassifierFreeGuidance, make_denoiser
from ddpm.guidance import default_batched


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
    expected = CountingModel.reference(x, t, null) + w * (CountingModel.reference(x, t, y) - CountingModel.reference(x, t, null))
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

    with pytest.raises(ValueError, match="unconditional"):
        make_denoiser(Uncond(), torch.tensor([1]))
    with pytest.raises(ValueError, match="class-conditional"):
        make_denoiser(CountingModel(), None)
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(Uncond(), torch.tensor([1]))
