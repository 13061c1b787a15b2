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


def test_a_device_tensor_weight_gives_the_bits_of_the_float_weight():
    # The bug it catches: the CUDA-graph step averages with the weight as a 0-dim tensor (read from memory at each
    # replay); if that path rounded differently, or copied instead of averaging, graphed and eager runs would part.
    model = make_model()
    by_float, by_tensor = EMA(model, decay=0.9, warmup_steps=2), EMA(model, decay=0.9, warmup_steps=2)
    weight = torch.zeros(())
    for step in range(5):
        perturb(model, step)
        by_float.update(model)
        weight.fill_(by_tensor.next_weight())
        by_tensor.average(model, weight)
        for a, b in zip(by_float.model.parameters(), by_tensor.model.parameters()):
            assert torch.equal(a, b)
    assert by_tensor.num_updates == 5 and weight.item() == pytest.approx(0.1)
    assert not torch.equal(next(by_float.model.parameters()), next(model.parameters()))  # it did average
