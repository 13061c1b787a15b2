import pytest
import torch

from ddpm import EMA


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model[1].running_mean.add_(torch.randn(4, generator=g))


def test_warmup_copies_then_averages_with_the_decay():
    model = make_model()
    ema = EMA(model, decay=0.9, warmup_steps=2)
    for step in range(2):
        perturb(model, step)
        ema.update(model)
        for e, p in zip(ema.model.parameters(), model.parameters()):
            assert torch.equal(e, p)
    expected = [p.detach().double().clone() for p in model.parameters()]
    for step in range(2, 6):
        perturb(model, step)
        ema.update(model)
        expected = [0.9 * e + 0.1 * p.detach().double() for e, p in zip(expected, model.parameters())]
    for e, want in zip(ema.model.parameters(), expected):
        torch.testing.assert_close(e.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers copied, not averaged
    assert ema.num_updates == 6


def test_ema_copy_is_frozen_and_in_eval_mode():
    ema = EMA(make_model(), decay=0.99)
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_state_dict_round_trip_continues_the_same_average():
    model = make_model()
    a = EMA(model, decay=0.8, warmup_steps=1)
    for s in range(3):
        perturb(model, s)
        a.update(model)
    b = EMA(make_model(), decay=0.8, warmup_steps=1)
    b.load_state_dict(a.state_dict())
    perturb(model, 10)
    a.update(model)
    b.update(model)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(make_model(), decay=1.0)
