"""The graph-ready training step (step_graph.py, Trainer.step/update). A CUDA graph cannot be captured on a CPU, so
these tests replay the step through `TracedCapture` (tests/helpers.py), which freezes Python values and tensor
bindings exactly as a capture does, overwrites the same output tensors at every replay and counts the replays, and
demand the same bits as the eager step."""
import dataclasses
import json
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm import RunConfig, RuntimeConfig, TrainConfig
from ddpm.cli import main
from ddpm.data import DataInfo
from ddpm.step_graph import WARMUP_STEPS, StepRunner, graphs_decision
from ddpm.training import Trainer
from helpers import TracedCapture, logged, run_child, tiny_model_config

STEPS = WARMUP_STEPS + 5  # the warm-up, the capture, then replays
REPLAYS = STEPS - WARMUP_STEPS - 1


def make_trainer(compile: bool = False, grad_accum: int = 1) -> Trainer:
    # the learning-rate warm-up and the EMA warm-up both end inside the replayed steps, so that a rate or an EMA
    # weight frozen at the capture shows; flips on, gradient clipping on, labels dropped
    model = tiny_model_config(num_classes=3, in_channels=3)
    train = TrainConfig(batch_size=6, conditional=True, warmup_steps=WARMUP_STEPS + 3, ema_warmup=WARMUP_STEPS + 2,
                        ema_decay=0.9, hflip=True, grad_clip=0.05, lr=1e-2, p_uncond=0.3,
                        grad_accum=grad_accum)
    config = RunConfig(model=model, train=train, runtime=RuntimeConfig(device="cpu", amp="none", compile=compile))
    data = TensorDataset(torch.zeros(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    trainer = Trainer(config, DataInfo(data, 3, 3, None, "random"), torch.device("cpu"))
    trainer.model.train()
    return trainer


def batches():
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        x0 = torch.rand(6, 3, 8, 8, generator=generator) * 2 - 1
        if step in (WARMUP_STEPS + 2, WARMUP_STEPS + 3):
            x0[0, 0, 0, 0] = float("nan")  # two replayed steps in a row that must be skipped on the device
        yield x0, torch.randint(0, 3, (6,), generator=generator)


def kept(stats):
    """A copy of a step's statistics that outlives the next step (a replay overwrites the graph's outputs)."""
    return dataclasses.replace(stats, **{field: getattr(stats, field).clone()
                                         for field in ("per_sample", "timesteps", "grad_norm", "skipped")})


def train_both(capture, grad_accum: int = 1) -> tuple[Trainer, Trainer, list, list]:
    eager, graphed = make_trainer(grad_accum=grad_accum), make_trainer(grad_accum=grad_accum)
    graphed.runner = StepRunner(True, capture=capture)
    eager_stats, graphed_stats = [], []
    for x0, labels in batches():
        eager_stats.append(eager.step(x0, labels))
        graphed_stats.append(kept(graphed.step(x0, labels)))
        assert int(graphed.bad_run) == int(eager.bad_run)  # the count of skips in a row, step by step
    return eager, graphed, eager_stats, graphed_stats


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for name, x in a.model.state_dict().items():
        assert torch.equal(x, b.model.state_dict()[name]), f"weights differ: {name}"
    for name, x in a.ema.model.state_dict().items():
        assert torch.equal(x, b.ema.model.state_dict()[name]), f"EMA differs: {name}"
    for key, state in a.optimizer.state_dict()["state"].items():
        for field, value in state.items():
            assert torch.equal(value, b.optimizer.state_dict()["state"][key][field]), f"optimizer {field} differs"
    assert torch.equal(a.bad_run, b.bad_run) and torch.equal(a.worst_bad_run, b.worst_bad_run)
    assert torch.equal(a.noise_gen.get_state(), b.noise_gen.get_state())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_replayed_step_gives_the_eager_weights_ema_optimizer_state_and_statistics(grad_accum):
    # Bugs it catches: a learning rate or EMA weight passed as a number (frozen at the capture), a batch or a draw
    # read from the step's arguments instead of the static buffers, the skip counter rebound instead of updated in
    # place, a step replayed twice or not at all, a runner that captures and then runs every step eagerly. With
    # --grad-accum the graph holds both micro-batches.
    capture = TracedCapture()
    eager, graphed, eager_stats, graphed_stats = train_both(capture, grad_accum)
    assert graphed.runner.graphed and graphed.runner.capture_seconds is not None
    assert capture.replays == [REPLAYS]
    assert_same_state(eager, graphed)
    for a, b in zip(eager_stats, graphed_stats):
        for field in ("per_sample", "timesteps", "grad_norm", "skipped"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0, equal_nan=True,
                                       msg=field)
        assert a.lr == b.lr
    assert [bool(s.skipped) for s in graphed_stats].count(True) == 2 and int(graphed.worst_bad_run) == 2
    assert eager.ema_weights[0].item() == pytest.approx(0.1) and eager_stats[-1].lr == pytest.approx(1e-2)


def test_a_failed_capture_warns_and_the_run_continues_eagerly_with_the_same_bits():
    def broken_capture(step, stream):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    with pytest.warns(UserWarning, match=r"capture of the training step failed \(RuntimeError: operation not "
                                         r"permitted when stream is capturing\); training continues without"):
        eager, graphed, _, _ = train_both(broken_capture)
    assert not graphed.runner.enabled and not graphed.runner.graphed
    assert_same_state(eager, graphed)


def test_when_graphs_are_used_and_what_a_user_is_told_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = dict(distributed=False, grad_scaler=False, capturable_optimizer=True)
    assert graphs_decision("off", cuda, **plain) == (False, None)
    assert graphs_decision("auto", cpu, **plain) == (False, None)
    assert graphs_decision("on", cuda, **plain) == (True, None)
    used, notice = graphs_decision("on", cpu, **plain)
    assert not used and "need a CUDA device" in notice
    for blocker, words in (("distributed", "torchrun"), ("grad_scaler", "--amp bf16"),
                           ("capturable_optimizer", "fused AdamW")):
        used, notice = graphs_decision("on", cuda, **{**plain, blocker: not plain[blocker]})
        assert not used and words in notice
        assert graphs_decision("auto", cuda, **{**plain, blocker: not plain[blocker]}) == (False, None)


def test_cuda_graphs_flag(tmp_path, capsys):
    import sys

    from helpers import TINY_TRAIN_ARGS

    done = run_child([sys.executable, "-m", "ddpm", "train", "mnist", "--out", str(tmp_path / "run"), "--steps",
                      "1", "--device", "cpu", "--cuda-graphs", "on", *TINY_TRAIN_ARGS], tmp_path, "train")
    assert done.returncode == 0, done.tail()
    # ddpm's one line, what a user sees (other libraries' own warnings may come and go with their versions)
    ours = [line for line in done.stderr().splitlines() if line.startswith("ddpm train:")]
    assert ours == ["ddpm train: warning: CUDA graphs need a CUDA device; training on cpu runs eagerly"]
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "2", "--cuda-graphs", "off", "--quiet"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "mnist", "--out", str(tmp_path / "bad"), "--cuda-graphs", "sometimes", *TINY_TRAIN_ARGS])
    assert "--cuda-graphs: invalid choice" in capsys.readouterr().err


def test_the_compiled_step_compiles_once_through_both_warm_ups_and_a_skipped_step(monkeypatch):
    # The bug it catches: something that changes from step to step reaching the compiled network (a rate, a step
    # count, a batch shape), which recompiles it; a recompile after the first marks shapes dynamic and gives
    # slower kernels. error_on_recompile turns any recompile into a failure.
    import torch._dynamo

    real_compile, options = torch.compile, []

    def compile_cheaply(model, **kwargs):  # the step's guards, not inductor's code generation (minutes on a CPU)
        options.append(kwargs)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_cheaply)
    torch._dynamo.reset()
    trainer = make_trainer(compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x0, labels in batches():
            trainer.step(x0, labels)
    assert options == [{"dynamic": False}] and trainer.step_count == STEPS


def test_compiled_kernels_are_kept_outside_tmp_unless_the_user_says_where(monkeypatch, tmp_path):
    # The bug it catches: inductor's default cache under /tmp (emptied by a reboot, so every run pays the whole
    # compile again), or a cache folder chosen over the user's own TORCHINDUCTOR_CACHE_DIR.
    from ddpm.devices import compile_cache_dir, compile_for_training

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "ddpm" / "torchinductor"
    monkeypatch.setattr(torch, "compile", lambda net, **options: net)
    compile_for_training(torch.nn.Linear(1, 1))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "ddpm" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_for_training(torch.nn.Linear(1, 1))
    assert compile_cache_dir() == tmp_path / "mine" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_run_of_replayed_steps_resumed_midway_ends_with_the_eager_runs_bits(tmp_path, monkeypatch, capsys):
    # The bug it catches: the loop around the step breaking under a graph: the monitor keeping the graph's output
    # tensors (overwritten by the next replay) or logging nothing from them, previews or validation between
    # replays, a checkpoint or the guide snapshot taken from the graph's memory, or a resumed run that does not
    # capture anew or never replays. Both runs stop at step 5 and resume to 11, so the loss windows and the guide
    # step (5, a replayed step: guide_fraction 0.95 of the first 5 steps) are the same in both.
    import functools

    import ddpm.training as training
    from ddpm.checkpoint import latest_checkpoint, load_training_state
    from ddpm.step_graph import StepRunner as RealRunner

    def run(out, steps, resume=False):
        recipe = TrainConfig(data="mnist", conditional=True, batch_size=8, lr=1e-3, ema_warmup=2, warmup_steps=5)
        runtime = RuntimeConfig(out_dir=str(out), steps=steps, device="cpu", checkpoint_every=5, sample_every=4,
                                sample_steps=2, val_every=5, val_size=8, log_every=2, num_workers=0,
                                guide_fraction=0.95)
        training.train(RunConfig(model=tiny_model_config(), train=recipe, runtime=runtime), resume=resume)
        return load_training_state(latest_checkpoint(out))

    run(tmp_path / "eager", 5)
    eager = run(tmp_path / "eager", 11, resume=True)
    capture = TracedCapture()
    monkeypatch.setattr(training, "graphs_decision", lambda *args, **kwargs: (True, None))
    monkeypatch.setattr(training, "StepRunner", functools.partial(RealRunner, capture=capture))
    run(tmp_path / "graphed", 5)  # 3 warm-up steps, the capture at step 4, 1 replay
    assert "CUDA graphs: step 4 captured the training step" in capsys.readouterr().out
    graphed = run(tmp_path / "graphed", 11, resume=True)  # the capture again at step 9, then 2 replays
    assert "CUDA graphs: step 9 captured" in capsys.readouterr().out
    assert capture.replays == [1, 2]
    assert graphed["step"] == eager["step"] == 11
    emas = enumerate(zip(eager["emas"], graphed["emas"], strict=True))
    pairs = [("model", eager["model"], graphed["model"])] + [(f"ema {i}", a["model"], b["model"]) for i, (a, b) in emas]
    for part, want, got in pairs:
        assert all(torch.equal(got[name], value) for name, value in want.items()), part
    for key, state in eager["optimizer"]["state"].items():
        assert all(torch.equal(value, graphed["optimizer"]["state"][key][field]) for field, value in state.items())
    losses = logged(tmp_path / "graphed", "train/loss")
    assert sorted(losses) == [2, 4, 5, 6, 8, 10, 11] and losses == logged(tmp_path / "eager", "train/loss")
    from safetensors.torch import load_file

    guides = [load_file(str(tmp_path / name / "guide" / "model.safetensors")) for name in ("eager", "graphed")]
    assert all(torch.equal(guides[1][name], value) for name, value in guides[0].items())
    assert json.loads((tmp_path / "graphed" / "guide" / "config.json").read_text())["step"] == 5


def test_a_checkpoint_from_before_graphs_keeps_the_capturable_optimizer_and_its_rate_tensor():
    # The bug it catches: Optimizer.load_state_dict restores the saved group settings, so a checkpoint written
    # before the graph-ready step (a float rate, capturable off) would silently turn the optimizer back into one
    # that a CUDA graph cannot capture, and the rate written by each step would go to a tensor nobody reads.
    trainer = make_trainer()
    for x0, labels in list(batches())[:2]:
        trainer.step(x0, labels)
    state = trainer.state_dict()
    for group in state["optimizer"]["param_groups"]:  # what the optimizer of the previous version saved
        group.update(lr=1e-2, capturable=False)
    resumed = make_trainer()
    rate = resumed.optimizer.param_groups[0]["lr"]
    resumed.load_state_dict(state)
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] is rate and group["capturable"] and group["fused"]
    resumed.step(*next(iter(batches())))
    assert rate.item() == pytest.approx(resumed.lr_value)


def losses_by_hand(model: torch.nn.Module, inputs: dict, null_class: int) -> torch.Tensor:
    """Each sample's eps-MSE of one step (Ho et al. 2020, eq. 14) from the step's own draws and the weights before
    it, written out here in float64 from the linear schedule's definition (not through diffusion.py)."""
    import numpy as np

    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[inputs["t"]].view(-1, 1, 1, 1)
    noise = inputs["noise"].double()
    x_t = abar.sqrt() * inputs["x0"].double() + (1 - abar).sqrt() * noise
    labels = torch.where(inputs["drop"], null_class, inputs["labels"])
    with torch.no_grad():
        eps = model(x_t.float(), inputs["t"], labels).double()
    return ((eps - noise) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("graphed", [False, True])
def test_the_logged_loss_is_the_mean_of_each_windows_losses_computed_by_hand(tmp_path, monkeypatch, graphed):
    # The bug it catches (issue 33, a planted bug two runs through the same logger agreed on): train/loss logged as
    # 0, or as anything but the mean of the window's per-sample losses, on eager steps and on replayed ones. The
    # losses are recomputed by hand from each step's inputs and the weights before the step.
    import copy
    import functools

    import ddpm.training as training
    from ddpm.step_graph import StepRunner as RealRunner

    by_hand = []
    real_step = training.Trainer.step

    def step(self, x0, labels):
        before = copy.deepcopy(self.model)
        stats = real_step(self, x0, labels)
        assert not self.hflip  # digits are not flipped, so the hand computation needs no flips
        by_hand.append(losses_by_hand(before, self.static.buffers, self.model.null_class))
        return stats

    monkeypatch.setattr(training.Trainer, "step", step)
    capture = TracedCapture()
    if graphed:
        monkeypatch.setattr(training, "graphs_decision", lambda *args, **kwargs: (True, None))
        monkeypatch.setattr(training, "StepRunner", functools.partial(RealRunner, capture=capture))
    recipe = TrainConfig(data="mnist", conditional=True, batch_size=8, lr=1e-3, ema_warmup=2)
    runtime = RuntimeConfig(out_dir=str(tmp_path / "run"), steps=9, device="cpu", sample_every=0, val_every=0,
                            log_every=4, num_workers=0, guide_fraction=0.0, ema_snapshot_every=100)
    training.train(RunConfig(model=tiny_model_config(), train=recipe, runtime=runtime), progress=False)
    assert capture.replays == ([9 - WARMUP_STEPS - 1] if graphed else [])
    losses_logged = logged(tmp_path / "run", "train/loss")
    windows = {4: by_hand[0:4], 8: by_hand[4:8], 9: by_hand[8:9]}
    assert sorted(losses_logged) == sorted(windows)
    for at, losses in windows.items():
        assert losses_logged[at] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5), at
