import torch

from ddpm import UNet
from ddpm.batches import StepBatches, random_hflip
from ddpm.devices import configure_for_speed
from ddpm.training import make_optimizer


def test_fused_adamw_matches_the_reference_adamw(tiny_config):
    torch.manual_seed(0)
    a = UNet(tiny_config())
    b = UNet(tiny_config())
    b.load_state_dict(a.state_dict())
    fast = make_optimizer(a, 1e-2, 0.01)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(3):
        for model in (a, b):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).view_as(p) + step + i)
        fast.step()
        plain.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_step_batches_are_deterministic_split_across_ranks_and_resume_anywhere():
    per_epoch = 5  # 40 items / batch 8
    full = list(StepBatches(40, 8, seed=3, start=0, stop=3 * per_epoch))
    assert len(full) == 15 and full == list(StepBatches(40, 8, seed=3, start=0, stop=15))
    for epoch in range(3):  # each epoch is a permutation of the data, and epochs differ
        items = [i for b in full[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b]
        assert sorted(items) == list(range(40))
    assert full[:per_epoch] != full[per_epoch : 2 * per_epoch]
    ranks = [list(StepBatches(40, 8, seed=3, start=0, stop=15, rank=r, world_size=2)) for r in range(2)]
    assert all(r0 + r1 == f for r0, r1, f in zip(ranks[0], ranks[1], full))  # rank shares tile each global batch
    assert list(StepBatches(40, 8, seed=3, start=7, stop=15)) == full[7:]  # resume mid-epoch, across the next boundary
    assert full != list(StepBatches(40, 8, seed=4, start=0, stop=15))


def test_random_hflip_mirrors_exactly_the_flagged_images():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = random_hflip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_training_step_in_channels_last_matches_the_plain_layout(tiny_config):
    torch.manual_seed(1)
    plain = UNet(tiny_config(image_size=16, channel_mults=(1, 2, 2)))
    fast = UNet(tiny_config(image_size=16, channel_mults=(1, 2, 2)))
    fast.load_state_dict(plain.state_dict())
    fast, _ = configure_for_speed(fast)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 400, 999])
    for model in (plain, fast):
        model(x.contiguous(memory_format=torch.channels_last) if model is fast else x, t).square().mean().backward()
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)


def test_the_rate_as_a_tensor_moves_the_weights_exactly_as_the_rate_as_a_number(tiny_config):
    # The bug it catches: the graph-ready optimizer (fused, capturable, its rate a device tensor) changing the
    # bits of CPU training. A float32 rate did: at 8e-5 (step 4 of the quickstart's warm-up) it moved weights by
    # an ulp, and 1,000 steps later the quickstart grid had changed.
    from ddpm.training import set_learning_rate

    torch.manual_seed(0)
    a, b = UNet(tiny_config()), UNet(tiny_config())
    b.load_state_dict(a.state_dict())
    graph_ready = make_optimizer(a, 1e-3, 0.01)
    by_number = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    assert graph_ready.defaults["capturable"] and isinstance(graph_ready.param_groups[0]["lr"], torch.Tensor)
    for step in range(8):
        rate = 2e-3 * (step + 1) / 100  # the quickstart's warm-up rates
        set_learning_rate(graph_ready, rate)
        set_learning_rate(by_number, rate)
        for model in (a, b):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).view_as(p) * (step + 1) + i)
        graph_ready.step()
        by_number.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_an_emulated_bf16_or_fp16_on_the_cpu_is_one_warning_naming_the_fp32_flag(monkeypatch, tiny_config):
    # bug caught: an explicit --amp bf16 on a CPU without native bf16 (an AVX2-only EPYC: a training step 12x as long
    # as in fp32, benchmarks/RESULTS.md "Distillation" stop 48) trains without a word; and the opposite, a notice
    # where bf16 is native, for --amp auto's fp32 or on a CPU whose flags are unknown
    import warnings

    import pytest
    from torch.utils.data import TensorDataset

    from ddpm import devices
    from ddpm.config import RunConfig, RuntimeConfig, TrainConfig
    from ddpm.data import DataInfo
    from ddpm.errors import DdpmWarning
    from ddpm.training import Trainer

    cpu = torch.device("cpu")
    avx2 = "flags : fpu sse2 avx2 fma"
    monkeypatch.setattr(devices, "cpu_flags", lambda: avx2)
    assert devices.emulated_precision(torch.bfloat16, cpu, "--amp none") == (
        "bf16 is emulated on this CPU (its flags list neither avx512_bf16 nor amx_bf16): expect each step to take "
        "several times as long as in fp32; --amp none keeps fp32")
    assert devices.emulated_precision(torch.float16, cpu, "--amp none").startswith("fp16 is emulated")
    assert devices.emulated_precision(None, cpu, "--amp none") is None
    assert devices.emulated_precision(torch.bfloat16, torch.device("cuda"), "--amp none") is None
    for flags in ("flags : fpu sse2 avx2 avx512_bf16", "flags : sse2 amx_bf16", "", "Features : fp asimd bf16"):
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: flags)
        assert devices.emulated_precision(torch.bfloat16, cpu, "--amp none") is None, flags
    monkeypatch.setattr(devices, "cpu_flags", lambda: avx2)

    def trainer(amp):
        config = RunConfig(model=tiny_config(), train=TrainConfig(batch_size=2, channels=3),
                           runtime=RuntimeConfig(device="cpu", amp=amp))
        data = TensorDataset(torch.zeros(2, 3, 8, 8))
        return Trainer(config, DataInfo(data, 3, 3, None, "random"), cpu)

    with pytest.warns(DdpmWarning, match=r"^bf16 is emulated on this CPU .* --amp none keeps fp32$"):
        trainer("bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DdpmWarning)
        assert trainer("auto").amp_dtype is None and trainer("none").amp_dtype is None


def test_the_warm_up_reaches_the_rate_at_its_last_step_and_starts_above_zero():
    # bug caught: the warm-up off by one (step 0 at rate 0: a wasted step that still moves AdamW's moments, the
    # whole ramp one step late); the schedule written out by hand: base * min(1, (step + 1) / W)
    from ddpm.training import learning_rate

    assert [learning_rate(step, 1.0, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(0, 0.1, 0) == 0.1  # no warm-up: the rate from the first step
