"""Speed and memory of ddpm against its peers, printed as tables (results go in benchmarks/RESULTS.md).

    python benchmarks/bench.py train   [--rounds 5] [--batch 8] [--threads 2] [--compile]
    python benchmarks/bench.py sample  [--rounds 5] [--batch 16]
    python benchmarks/bench.py memory
    python benchmarks/bench.py ceiling [--batch 8]   # the fastest these kernels allow, op by op
    python benchmarks/bench.py data    [--images 10000]  # images/s fed from a folder and from its prepared copy
    python benchmarks/bench.py all

Peers (`pip install -r benchmarks/requirements.txt`, done by `make bench`) are measured in the same process,
interleaved round by round (A, B, C, A, B, C, ...) because this machine is noisy; tables report medians and
ratios. FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the same step that is timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm import (
    DiffusionConfig,
    ModelConfig,
    NoiseSchedule,
    SamplingConfig,
    UNet,
    ddim_sample,
    ddpm_sample,
    make_denoiser,
)
from ddpm.devices import configure_for_speed
from ddpm.diffusion import training_losses
from trainer_step import seed_trainer, trainer_step


def seed_model(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(ModelConfig(**overrides))


# ---------------------------------------------------------------------------------------------------- train

def ours_train_step(batch: int, compile_model: bool = False) -> tuple[Callable[[], None], torch.nn.Module]:
    """One `Trainer.step` of the seed model: exactly the step `ddpm train` runs (clipping, NaN skip, fused AdamW,
    EMA)."""
    trainer = seed_trainer(batch, "cpu", compile_model=compile_model)
    return trainer_step(trainer), trainer.model


def peer_train_step(model: torch.nn.Module, forward: Callable, batch: int) -> Callable[[], None]:
    """The same eps-MSE step for a peer network (plain AdamW, as their training scripts use)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    t = torch.randint(0, 1000, (batch,))

    def step():
        noise = torch.randn_like(x)
        loss = F.mse_loss(forward(x + noise, t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def lucidrains_unet():
    from denoising_diffusion_pytorch import Unet

    torch.manual_seed(0)
    model = Unet(dim=64)
    return model, lambda x, t: model(x, t.float())


def diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    return model, lambda x, t: model(x, t).sample


def count_flops(step: Callable[[], None]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def interleaved(candidates: dict[str, Callable[[], None]], rounds: int, repeats: int,
                warmup: int = 2) -> dict[str, list[float]]:
    for step in candidates.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            seconds[name].append(time_steps(step, repeats))
    return seconds


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def bench_train(args) -> None:
    b = args.batch
    candidates: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    params: dict[str, int] = {}
    builders = [
        ("ddpm (ours: Trainer.step, as `ddpm train` runs)", lambda: ours_train_step(b)),
    ]
    if args.compile:
        builders.append(("ddpm + torch.compile", lambda: ours_train_step(b, compile_model=True)))
    for name, build in builders:
        step, model = build()
        candidates[name], params[name] = step, sum(p.numel() for p in model.parameters())
    for name, build in (("lucidrains Unet(dim=64)", lucidrains_unet),
                        ("diffusers UNet2DModel 64-128-256-256", diffusers_unet)):
        try:
            model, forward = build()
        except ImportError as error:
            print(f"skipping {name}: {error} (pip install -r benchmarks/requirements.txt)")
            continue
        candidates[name], params[name] = peer_train_step(model, forward, b), sum(p.numel() for p in model.parameters())
    if args.compile:
        start = time.perf_counter()
        candidates["ddpm + torch.compile"]()
        print(f"torch.compile: first call {time.perf_counter() - start:.0f} s")
    for name, step in candidates.items():
        flops[name] = count_flops(step)
    seconds = interleaved(candidates, args.rounds, args.repeats)
    ours = statistics.median(seconds[next(iter(candidates))])
    rows = []
    for name, times in seconds.items():
        med = statistics.median(times)
        rows.append([name, f"{params[name] / 1e6:.1f}M", f"{flops[name] / b / 1e9:.1f}", f"{b / med:.2f}",
                     f"{flops[name] / med / 1e9:.0f}", f"{med / ours:.2f}x", f"{min(times):.2f}-{max(times):.2f}"])
    print(f"\nTraining step, 64x64 RGB, batch {b}, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds x {args.repeats} steps")
    print_table(["model", "params", "GFLOP/img", "images/s", "GFLOP/s", "ours faster by", "s/step range"], rows)


# --------------------------------------------------------------------------------------------------- sample

def bench_sample(args) -> None:
    n = args.batch
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    plain = seed_model().eval()
    fast, _ = configure_for_speed(seed_model().eval(), None)
    cond, _ = configure_for_speed(seed_model(num_classes=10).eval(), None)
    x = torch.randn(n, 3, 64, 64)
    t = torch.full((n,), 500)
    labels = torch.arange(n) % 10
    two_pass = make_denoiser(cond, labels, SamplingConfig(guidance=3.0), schedule=schedule, batched=False)
    one_batch = make_denoiser(cond, labels, SamplingConfig(guidance=3.0), schedule=schedule, batched=True)

    def inference(fn):
        def run():
            with torch.inference_mode():
                fn(x, t)
        return run

    candidates = {
        "unguided step, ours": inference(lambda x, t: fast(x, t)),
        "unguided step, plain NCHW": inference(lambda x, t: plain(x, t)),
        "guided step (w=3), two passes of N": inference(two_pass),
        "guided step (w=3), one pass of 2N": inference(one_batch),
    }
    if args.compile:
        compiled = torch.compile(fast)
        start = time.perf_counter()
        inference(lambda x, t: compiled(x, t))()
        print(f"torch.compile (sampling): first call {time.perf_counter() - start:.0f} s")
        candidates["unguided step, torch.compile"] = inference(lambda x, t: compiled(x, t))
    seconds = interleaved(candidates, args.rounds, 1, warmup=1)
    unguided = statistics.median(seconds["unguided step, ours"])
    rows = [[name, f"{statistics.median(s):.3f}", f"{statistics.median(s) / unguided:.2f}x"]
            for name, s in seconds.items()]
    print(f"\nOne denoising step, seed model 64x64 RGB, batch N={n}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print_table(["step", "seconds", "vs unguided"], rows)
    per_round = [one / two for one, two in zip(seconds["guided step (w=3), one pass of 2N"],
                                               seconds["guided step (w=3), two passes of N"])]
    print("one pass of 2N / two passes of N, round by round: " + ", ".join(f"{r:.2f}" for r in per_round))

    # End to end, DDIM 50 vs DDPM 1000 on the same batch; on the quickstart-size model so that DDPM's
    # 1000 steps take seconds, not half an hour (overheads weigh more on a small model: a strict test).
    small = seed_model(image_size=16, in_channels=1, base_channels=32, channel_mults=(1, 2, 2), bottleneck_mult=4)
    small, _ = configure_for_speed(small.eval(), None)
    def den(x, t):
        return small(x, t)
    shape = (n, 1, 16, 16)
    start = time.perf_counter()
    ddpm_sample(den, schedule, shape, generator=torch.Generator().manual_seed(0))
    ddpm_s = time.perf_counter() - start
    start = time.perf_counter()
    ddim_sample(den, schedule, shape, steps=50, generator=torch.Generator().manual_seed(0))
    ddim_s = time.perf_counter() - start
    print(f"\nEnd to end, quickstart-size model (16x16, 1.46M params), batch {n}")
    print_table(["sampler", "seconds", "speed-up"], [["DDPM, 1000 steps", f"{ddpm_s:.2f}", "1.0x"],
                                                     ["DDIM, 50 steps", f"{ddim_s:.2f}", f"{ddpm_s / ddim_s:.1f}x"]])


# --------------------------------------------------------------------------------------------------- memory

def _rss_child(kind: str, batch: int) -> None:
    """Runs in a fresh process: one training step or one sampling step, then prints the peak RSS in MiB."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if kind == "train":
        step, _ = ours_train_step(batch, fast=False)
        step()
    else:
        model, _ = configure_for_speed(seed_model().eval(), None)
        with torch.inference_mode():
            model(torch.randn(batch, 3, 64, 64), torch.full((batch,), 500))
    # VmHWM (this process image's own high-water mark); ru_maxrss would carry the parent's RSS across fork+exec
    status = open("/proc/self/status").read()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def bench_memory(args) -> None:
    rows = []
    for kind, batches in (("train", (4, 8, 16)), ("sample", (16, 32, 64))):
        for batch in batches:
            out = subprocess.run([sys.executable, __file__, "_rss", kind, str(batch)], capture_output=True, text=True,
                                 check=True)
            rows.append([f"{kind} step", str(batch), f"{float(out.stdout.strip().splitlines()[-1]):.0f}"])
    print("\nPeak RSS of one step of the seed model (64x64 RGB, fresh process each; includes ~0.85 GiB of imported "
          "libraries)")
    print_table(["what", "batch", "peak RSS MiB"], rows)


# -------------------------------------------------------------------------------------------------- ceiling

def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recorded_kernels(model: UNet, batch: int) -> tuple[list[tuple], list[tuple]]:
    """Every convolution (input shape, weight shape, padding, input needs grad) and every attention
    (q/k/v shape) that one training step of `model` runs, found with forward hooks."""
    from ddpm.unet import SelfAttention

    convs, attentions = [], []
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, inp, out: convs.append((tuple(inp[0].shape), tuple(m.weight.shape), m.padding,
                                                  inp[0].requires_grad))))
        elif isinstance(module, SelfAttention):
            hooks.append(module.register_forward_hook(
                lambda m, inp, out: attentions.append((inp[0].shape[0], m.num_heads, inp[0].shape[2] * inp[0].shape[3],
                                                       inp[0].shape[1] // m.num_heads))))
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    losses, _ = training_losses(model, schedule, torch.rand(batch, 3, 64, 64) * 2 - 1,
                                generator=torch.Generator().manual_seed(0), null_class=None)
    losses.mean().backward()
    for hook in hooks:
        hook.remove()
    return convs, attentions


def _conv_parts(x: torch.Tensor, w: torch.Tensor, padding, needs_input_grad: bool,
                training: bool) -> dict[str, Callable[[], object]]:
    """The kernels of one convolution on these tensors (their memory format picks oneDNN's kernel)."""
    grad_y = torch.randn_like(F.conv2d(x, w, padding=padding))

    def backward(mask):
        return torch.ops.aten.convolution_backward(grad_y, x, w, None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
                                                   mask)

    parts = {"conv forward": lambda: F.conv2d(x, w, padding=padding)}
    if training:
        parts["conv backward weights"] = lambda: backward([False, True, False])
        if needs_input_grad:
            parts["conv backward input"] = lambda: backward([True, False, False])
    return parts


def conv_kernels(x_shape, w_shape, padding, needs_input_grad: bool, training: bool) -> dict[str, Callable[[], object]]:
    """The kernels of one convolution, each runnable alone: forward, and for training backward-to-weights and
    backward-to-input, each in the faster of NCHW and channels_last (oneDNN picks different kernels for them)."""
    best: dict[str, tuple[float, Callable[[], object]]] = {}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(x_shape).contiguous(memory_format=memory_format)
        w = (torch.randn(w_shape) * 0.05).contiguous(memory_format=memory_format)
        for name, fn in _conv_parts(x, w, padding, needs_input_grad, training).items():
            seconds = _time(fn, 3)
            if seconds < best.get(name, (float("inf"),))[0]:
                best[name] = (seconds, fn)
    return {name: fn for name, (_, fn) in best.items()}


def attention_kernels(shape, training: bool) -> dict[str, Callable[[], object]]:
    q, k, v = (torch.randn(shape, requires_grad=training) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    parts = {"attention forward": lambda: F.scaled_dot_product_attention(q, k, v).detach()}
    if training:  # the backward alone, through a retained graph
        grad = torch.randn(shape)
        parts["attention backward"] = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return parts


def kernel_list(batch: int, training: bool) -> list[tuple[str, Callable[[], object]]]:
    """(part, kernel) for every convolution and attention kernel of one step of the seed model, repeated as often
    as the step runs it."""
    convs, attentions = recorded_kernels(seed_model(), batch)
    cache: dict[tuple, dict[str, Callable[[], object]]] = {}
    kernels = []
    for record in convs:
        if record not in cache:
            cache[record] = conv_kernels(*record, training=training)
        kernels += cache[record].items()
    for shape in attentions:
        if shape not in cache:
            cache[shape] = attention_kernels(shape, training)
        kernels += cache[shape].items()
    return kernels


def bench_ceiling(args) -> None:
    """How much faster an implementation built from these kernels could be at most. Every convolution and
    attention kernel of the step runs by itself (in its faster memory format) and the times are added up, as if
    GroupNorm, GELU, the linear layers, copies and the optimizer were free; rounds alternate with the real
    step, because this machine's speed drifts by 20-30% over minutes, and only the ratio of the two means
    something. If the ratio is below the speed-up a target asks for, the target needs faster kernels."""
    batch, sample_batch = args.batch, 16
    train_kernels = kernel_list(batch, training=True)
    step, _ = ours_train_step(batch, fast=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    kernel_flops = sum(n for op, n in by_op.items() if "convolution" in op or "attention" in op)
    kernel_share = kernel_flops / counter.get_total_flops()
    sample_kernels = kernel_list(sample_batch, training=False)
    sampler, _ = configure_for_speed(seed_model().eval(), None)
    x, t = torch.randn(sample_batch, 3, 64, 64), torch.full((sample_batch,), 500)

    def sample_step():
        with torch.inference_mode():
            sampler(x, t)

    def run_kernels(kernels) -> dict[str, float]:
        parts: dict[str, float] = {}
        for part, fn in kernels:
            start = time.perf_counter()
            fn()
            parts[part] = parts.get(part, 0.0) + time.perf_counter() - start
        return parts

    rounds = {"train step": [], "train kernels": [], "sample step": [], "sample kernels": []}
    parts_per_round = []
    for warm_up in (step, sample_step, lambda: run_kernels(train_kernels), lambda: run_kernels(sample_kernels)):
        warm_up()
    for _ in range(args.rounds):
        rounds["train step"].append(time_steps(step, 1))
        parts_per_round.append(run_kernels(train_kernels))
        rounds["train kernels"].append(sum(parts_per_round[-1].values()))
        rounds["sample step"].append(time_steps(sample_step, 1))
        rounds["sample kernels"].append(sum(run_kernels(sample_kernels).values()))
    med = {name: statistics.median(times) for name, times in rounds.items()}
    rows = [[part, f"{statistics.median(r[part] for r in parts_per_round):.3f}"] for part in parts_per_round[0]]
    rows.append(["all kernels alone", f"{med['train kernels']:.3f}"])
    rows.append(["the real training step", f"{med['train step']:.3f}"])
    print(f"\nKernels of one training step of the seed model (64x64 RGB, batch {batch}), each alone in its faster "
          f"memory format, {torch.get_num_threads()} threads: {len(train_kernels)} kernel calls, {kernel_share:.0%} of "
          f"the step's FLOPs; median of {args.rounds} rounds alternating with the real step")
    print_table(["kernels", "seconds per step"], rows)
    train_room = med["train step"] / med["train kernels"]
    sample_room = med["sample step"] / med["sample kernels"]
    print("\nHow much faster the step could be with these kernels (everything else free), against what the targets ask")
    print_table(["step", "now", "kernels alone", "room left", "target", "needs"], [
        [f"training, batch {batch}", f"{batch / med['train step']:.2f} img/s",
         f"{batch / med['train kernels']:.2f} img/s", f"{train_room:.2f}x", ">= 3.0 img/s",
         f"{3.0 * med['train step'] / batch:.2f}x"],
        [f"sampling step, batch {sample_batch}", f"{med['sample step']:.2f} s", f"{med['sample kernels']:.2f} s",
         f"{sample_room:.2f}x", "<= 1.5 s", f"{med['sample step'] / 1.5:.2f}x"],
    ])


# ----------------------------------------------------------------------------------------------------- data

DATA_CACHE = Path(os.environ.get("DDPM_BENCH_DATA", "/tmp/ddpm-bench-data"))
CPU_STEP_RATE = 2.3  # images/s of the 64x64 seed model's training step at batch 8 on the 2-core CPU (see RESULTS.md)


def generated_folder(count: int) -> Path:
    """`count` photo-like files (smooth colour fields + noise), alternately JPEG (quality 90) and PNG, 256x192,
    192x256, 320x240 or 240x320, in folders of 1,000: generated once into DATA_CACHE and reused."""
    import numpy as np
    from PIL import Image

    folder = DATA_CACHE / f"folder-{count}"
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1024, 0:1024]
    field = np.stack([128 + 90 * np.sin(x / (40 + 13 * c) + c) * np.cos(y / (55 - 9 * c)) for c in range(3)], -1)
    texture = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    sizes = [(192, 256), (256, 192), (240, 320), (320, 240)]
    start = time.perf_counter()
    for i in range(count):
        h, w = sizes[i % 4]
        top, left = rng.integers(0, 1024 - h), rng.integers(0, 1024 - w)
        path = folder / f"{i // 1000:03d}" / f"{i:06d}.{'jpg' if i % 2 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture[top : top + h, left : left + w]).save(path, quality=90)
    (folder / ".complete").touch()
    print(f"generated {count:,} files in {folder} in {time.perf_counter() - start:.0f}s")
    return folder


def pil_pipeline(data: bytes, image_size: int) -> torch.Tensor:
    """The pipeline data.py used before: PIL decode, PIL resize (antialiased bilinear), centre crop."""
    import io

    from PIL import Image
    from torchvision import transforms

    with Image.open(io.BytesIO(data)) as image:
        image = transforms.Resize(image_size, antialias=True)(image.convert("RGB"))
        return transforms.PILToTensor()(transforms.CenterCrop(image_size)(image))


def compare_decoders(folder: Path, image_size: int, per_format: int = 300) -> None:
    from ddpm.data import list_images
    from ddpm.images import decode_image, resize_center_crop

    files = list_images(folder)
    rows = []
    for suffix in (".jpg", ".png"):
        blobs = [p.read_bytes() for p in files if p.suffix == suffix][:per_format]
        ours = lambda data: resize_center_crop(decode_image(data, 3), image_size)  # noqa: E731
        times = {}
        for name, fn in (("PIL", lambda d: pil_pipeline(d, image_size)), ("ours", ours)) * 2:  # the second pass counts
            start = time.perf_counter()
            for data in blobs:
                fn(data)
            times[name] = (time.perf_counter() - start) / len(blobs) * 1e3
        worst = max((ours(d).int() - pil_pipeline(d, image_size).int()).abs().max().item() for d in blobs)
        rows.append([suffix[1:].upper(), f"{times['PIL']:.2f}", f"{times['ours']:.2f}",
                     f"{times['PIL'] / times['ours']:.2f}x", str(worst)])
    rows.append(torchvision_png_row(files, image_size, per_format))
    print(f"\nDecode + resize to {image_size}x{image_size} + centre crop, one thread, {per_format} files per format:")
    print_table(["format", "PIL ms/img", "torchvision+torch ms/img", "speed-up", "max |diff| (grey levels)"], rows)


def torchvision_png_row(files: list[Path], image_size: int, per_format: int) -> list[str]:
    """What torchvision.io's PNG decoder would give (data.py no longer uses it: it crashes on damaged PNGs)."""
    from torchvision.io import decode_image as torchvision_decode

    from ddpm.images import resize_center_crop

    blobs = [p.read_bytes() for p in files if p.suffix == ".png"][:per_format]
    times = {}
    for name, fn in (("PIL", lambda d: pil_pipeline(d, image_size)),
                     ("tv", lambda d: resize_center_crop(torchvision_decode(torch.frombuffer(bytearray(d),
                                                                                             dtype=torch.uint8)),
                                                         image_size))) * 2:
        start = time.perf_counter()
        for data in blobs:
            fn(data)
        times[name] = (time.perf_counter() - start) / len(blobs) * 1e3
    return ["PNG, torchvision.io (not used)", f"{times['PIL']:.2f}", f"{times['tv']:.2f}",
            f"{times['PIL'] / times['tv']:.2f}x", ""]


def loader_rate(dataset, workers: int, batch: int = 64, skip: int = 2) -> float:
    """Images/s of one shuffled epoch through a DataLoader, after its first `skip` batches (worker start-up)."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    count, start = 0, None
    for i, (images, _) in enumerate(loader):
        if i == skip:
            start = time.perf_counter()
        if i >= skip:
            count += len(images)
    return count / (time.perf_counter() - start)


def loader_row(source: str, rate: float, workers: int) -> list[str]:
    """A row of the data table: images/s, per worker (or process), and that against the CPU's training step."""
    per_worker = rate / max(1, workers)
    return [source, f"{rate:,.0f}", f"{per_worker:,.0f}", f"{per_worker / CPU_STEP_RATE:,.0f}x"]


def bench_data(args) -> None:
    from ddpm.data import load_dataset
    from ddpm.prepared import prepare_dataset

    torch.set_num_threads(1)  # a DataLoader worker runs one thread; the 0-worker rows then measure one core too
    size = 64
    folder = generated_folder(args.images)
    start = time.perf_counter()
    info = load_dataset(str(folder), size)
    listed = time.perf_counter() - start
    print(f"\nload_dataset listed {len(info.dataset):,} files in {listed:.2f}s (nothing opened)")
    compare_decoders(folder, size)
    rows = []
    for workers in (0, 1, 2):
        rate = loader_rate(info.dataset, workers)
        rows.append(loader_row(f"folder, {workers} worker(s)", rate, workers))
    start = time.perf_counter()
    prepared = prepare_dataset(str(folder), size, DATA_CACHE / f"prepared-{args.images}-{size}", progress=False,
                               num_workers=2)
    prepare_rate = len(info.dataset) / (time.perf_counter() - start)
    copy = load_dataset(str(prepared), size)
    for workers in (0, 2):
        rate = loader_rate(copy.dataset, workers)
        rows.append(loader_row(f"prepared copy, {workers} worker(s)", rate, workers))
    print(f"\nImages/s fed at {size}x{size}, batch 64, shuffled, persistent workers, one thread each "
          f"(`ddpm prepare` with 2 workers: {prepare_rate:,.0f} images/s):")
    print_table(["source", "images/s", "per worker (or process)", f"per worker / CPU step ({CPU_STEP_RATE} img/s)"],
                rows)
    per_worker = float(rows[1][1].replace(",", ""))
    print(f"\nA 16-core GPU host (auto_workers = 8 per process): ~{8 * per_worker:,.0f} images/s from the folder "
          f"at this per-worker rate; at 0 workers on this CPU, loading costs "
          f"{1000 * 8 / float(rows[0][1].replace(',', '')):.0f} ms "
          f"of a {1000 * 8 / CPU_STEP_RATE:.0f} ms batch-8 step.")


def _decode_in_child(decode, data: bytes) -> tuple[str, float]:
    """Decode `data` in a forked child: (outcome, child's peak resident MB). A signal cannot take this process."""
    from ddpm.images import UNREADABLE

    pid = os.fork()
    if pid == 0:  # the child: report by exit code only, print nothing (libpng writes to stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            decode(data)
            os._exit(0)
        except UNREADABLE:
            os._exit(3)
        except BaseException:  # noqa: BLE001 - counted as "other": a crash the loader would not survive either
            os._exit(5)
    _, status, usage = os.wait4(pid, 0)
    outcome = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else {
        0: "loaded", 3: "unreadable"}.get(os.WEXITSTATUS(status), "other error")
    return outcome, usage.ru_maxrss / 1024


def bench_fuzz(args) -> None:
    """Every file of the fuzz corpus (tests/image_fuzz.py) through a decoder, each in its own forked child."""
    import collections

    from torchvision.io import decode_image as torchvision_decode

    from ddpm.images import decode_image, resize_center_crop

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from image_fuzz import malformed_files

    torch.set_num_threads(1)
    decoders = {"ours (data.decode_image)": lambda d: resize_center_crop(decode_image(d, 3), 64)}
    if args.old_decoder:  # torchvision.io first for JPEG/PNG, what data.py did before (slow: it allocates GBs)
        decoders["torchvision.io.decode_image"] = lambda d: torchvision_decode(
            torch.frombuffer(bytearray(d), dtype=torch.uint8))
    files = malformed_files(args.images)
    for name, decode in decoders.items():
        start, outcomes, peak = time.perf_counter(), collections.Counter(), 0.0
        for _, data in files:
            outcome, rss = _decode_in_child(decode, data)
            outcomes[outcome] += 1
            peak = max(peak, rss)
        print(f"{name}: {len(files)} malformed files (seed 0) in {time.perf_counter() - start:.0f}s: "
              f"{dict(outcomes)}; largest child peak RSS {peak:,.0f} MB")


def bench_decoders(args) -> None:
    """Ours (PIL decode) against torchvision.io's decoders, each + the same torch resize to 64 and centre crop:
    300 files per format of the loader benchmark's folder, one thread, interleaved rounds, best of 3."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode

    from ddpm.data import list_images
    from ddpm.images import decode_image, resize_center_crop

    torch.set_num_threads(1)
    files = list_images(generated_folder(args.images))
    candidates = {
        "ours (PIL)": lambda d: resize_center_crop(decode_image(d, 3), 64),
        "torchvision.io": lambda d: resize_center_crop(
            torchvision_decode(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB), 64),
    }
    for suffix in (".jpg", ".png"):
        blobs = [p.read_bytes() for p in files if p.suffix == suffix][:300]
        best = {name: float("inf") for name in candidates}
        for _ in range(3):
            for name, decode in candidates.items():
                start = time.perf_counter()
                for data in blobs:
                    decode(data)
                best[name] = min(best[name], (time.perf_counter() - start) / len(blobs) * 1e3)
        print(f"{suffix[1:].upper()}: " + ", ".join(f"{k} {v:.3f} ms/img" for k, v in best.items())
              + f"; ours / torchvision {best['ours (PIL)'] / best['torchvision.io']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "sample", "memory", "ceiling", "data", "decoders", "fuzz", "all",
                                         "_rss"))
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="training steps timed per round")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (first call takes about a minute)")
    parser.add_argument("--images", type=int, default=10_000,
                        help="data: how many files to generate (once, under /tmp); fuzz: how many malformed files")
    parser.add_argument("--old-decoder", action="store_true", help="fuzz: also run torchvision.io's decoder on them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "_rss":
        return _rss_child(args.rest[0], int(args.rest[1]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, {args.threads} threads")
    if args.what in ("train", "all"):
        bench_train(argparse.Namespace(**{**vars(args), "batch": args.batch or 8}))
    if args.what in ("sample", "all"):
        bench_sample(argparse.Namespace(**{**vars(args), "batch": args.batch or 16}))
    if args.what in ("memory", "all"):
        bench_memory(args)
    if args.what in ("ceiling", "all"):
        bench_ceiling(argparse.Namespace(**{**vars(args), "batch": args.batch or 8}))
    if args.what == "data":  # not part of `all`: it writes ~10,000 files under /tmp the first time
        bench_data(args)
    if args.what == "decoders":
        bench_decoders(args)
    if args.what == "fuzz":
        bench_fuzz(args)


if __name__ == "__main__":
    main()
