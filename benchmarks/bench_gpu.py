"""GPU measurements for benchmarks/gpu_check.sh, one part per call, each row appended to a JSON-lines file as soon
as it is measured (a part stopped by its time cap keeps the rows it finished):

    python benchmarks/bench_gpu.py train   --net ours --modes eager graphs --batches 64 128 [--classes 10]
    python benchmarks/bench_gpu.py equal   [--steps 8]        # graphed and eager steps give the same weights?
    python benchmarks/bench_gpu.py kernels                     # GroupNorm layouts, SDPA backends at 32x32
    python benchmarks/bench_gpu.py sample  --batches 16 256    # the whole sampler loop as one CUDA graph
    python benchmarks/bench_gpu.py report  --out DIR           # DIR/gpu_check.md and DIR/gpu_check.json

`train` times `Trainer.step` (the step `ddpm train` runs: loss, backward, clipping, the NaN skip, fused AdamW,
the EMA) in bf16 autocast and channels_last. Modes: eager, graphs (`--cuda-graphs on`), compile (`--compile`),
compile+graphs, reduce-overhead (torch.compile's own CUDA graphs of the network, the optimizer left eager).
`--net lucidrains|diffusers` trains the peers' UNets through the same step (benchmarks/trainer_step.py PeerNet).
`--device cpu` runs any part on a CPU with `--tiny` sizes, to check the script itself (no numbers to keep).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from trainer_step import PeerNet, seed_trainer, trainer_step

# bf16 dense tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0}
MODES = ("eager", "graphs", "compile", "compile+graphs", "reduce-overhead")
# issue 18's targets, checked by `report`
TARGETS = {"seed batch 14 img/s": 1500, "batch 128 img/s": 4500, "x best peer at 128, both compiled": 2.0,
           "first step s (compile and capture)": 90}


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def timed(fn, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------------------- train
def build_net(name: str, tiny: bool):
    """None for ours (the Trainer builds the UNet), else a PeerNet around the peer's UNet."""
    if name == "ours":
        return None
    from bench import diffusers_unet, lucidrains_unet

    net, forward = {"lucidrains": lucidrains_unet, "diffusers": diffusers_unet}[name]()
    return PeerNet(net, forward)


def model_config(args, classes: int | None):
    from ddpm import ModelConfig

    if args.tiny:
        return ModelConfig(image_size=16, base_channels=8, channel_mults=(1, 2), num_classes=classes)
    return ModelConfig(num_classes=classes)


def make_trainer(args, mode: str, batch: int, net_name: str):
    classes = args.classes if net_name == "ours" else None
    trainer = seed_trainer(batch, args.device, num_classes=classes, amp="bf16" if args.device == "cuda" else "none",
                           compile_model=mode in ("compile", "compile+graphs"), model=model_config(args, classes),
                           net=build_net(net_name, args.tiny), cuda_graphs="on" if "graphs" in mode else "off")
    if mode == "reduce-overhead":
        trainer.net = torch.compile(trainer.model, mode="reduce-overhead", dynamic=False)
    return trainer


def step_flops(args, batch: int, net_name: str) -> float:
    """FLOPs of one eager step (forward and backward), counted once per network and batch."""
    trainer = make_trainer(args, "eager", batch, net_name)
    step = trainer_step(trainer)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def bench_train(args) -> None:
    device = torch.device(args.device)
    try:
        build_net(args.net, args.tiny)
    except ImportError as error:  # a peer whose wheel is missing (`make gpu-wheels`)
        append_row(args.jsonl, {"part": "train", "net": args.net, "mode": ",".join(args.modes), "batch": 0,
                                "error": f"not installed ({error}); make gpu-wheels carries it"})
        return
    for batch in args.batches:
        flops = step_flops(args, batch, args.net) if not args.no_flops else None
        for mode in args.modes:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = {"part": "cold" if args.cold else "train", "net": args.net, "mode": mode, "batch": batch,
                   "classes": args.classes
                   if args.net == "ours" else None, "device": device_name(device), "torch": torch.__version__}
            counters.clear()
            try:
                start = time.perf_counter()
                trainer = make_trainer(args, mode, batch, args.net)
                step = trainer_step(trainer)
                for _ in range(4):  # compile, the graph warm-up and the capture all happen here
                    step()
                synchronize(device)
                row["first_steps_s"] = time.perf_counter() - start
                compiled_frames = counters["frames"]["ok"]
                seconds = timed(step, args.steps, device)
                # compiled modes: frames compiled (1 = no graph break) and any recompiled during the timed steps
                row.update(frames=compiled_frames, recompiled=counters["frames"]["ok"] - compiled_frames,
                           graph_breaks=sum(counters["graph_break"].values()))
            except Exception as error:  # noqa: BLE001 - one failing configuration must not lose the others
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                append_row(args.jsonl, row)
                continue
            row.update(images_per_s=batch / seconds, step_ms=1000 * seconds, graphed=trainer.runner.graphed,
                       capture_s=trainer.runner.capture_seconds, flops=flops,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
            if flops:
                row["tflops"] = flops / seconds / 1e12
            append_row(args.jsonl, row)
            del trainer, step


def bench_equal(args) -> None:
    """Weights, EMA and losses after `--steps` steps, graphed against eager (and compiled+graphed against
    compiled), from the same initial weights and batches: max |difference|."""
    device = torch.device(args.device)
    for plain_mode, graph_mode in (("eager", "graphs"), ("compile", "compile+graphs")):
        if plain_mode not in args.modes:
            continue
        torch._dynamo.reset()
        trainers = [make_trainer(args, mode, args.batches[0], "ours") for mode in (plain_mode, graph_mode)]
        steps = [trainer_step(trainer, seed=s) for trainer in trainers for s in range(args.steps)]
        losses = [[], []]
        for i in range(args.steps):
            for k, trainer in enumerate(trainers):
                stats = steps[k * args.steps + i]()
                losses[k].append(stats.per_sample.float().mean().item())
        synchronize(device)
        a, b = trainers

        def max_diff(x, y):
            return max((p - q).abs().max().item() for p, q in zip(x.parameters(), y.parameters()))

        append_row(args.jsonl, {"part": "equal", "modes": f"{plain_mode} vs {graph_mode}", "steps": args.steps,
                                "graphed": b.runner.graphed, "max_weight_diff": max_diff(a.model, b.model),
                                "max_ema_diff": max_diff(a.ema.model, b.ema.model),
                                "max_loss_diff": max(abs(x - y) for x, y in zip(*losses))})


# ---------------------------------------------------------------------------------------------------- kernels
def attention_shapes(args) -> list[tuple[int, int, int, int]]:
    """(channels, height, width, heads) of each self-attention layer of the seed UNet, the most tokens first."""
    from ddpm import UNet
    from ddpm.unet import SelfAttention

    model = UNet(model_config(args, None))
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((*i[0].shape[1:], m.num_heads)))
             for m in model.modules() if isinstance(m, SelfAttention)]
    size = model.config.image_size
    with torch.no_grad():
        model(torch.zeros(1, model.config.in_channels, size, size), torch.zeros(1, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return sorted(set(shapes), key=lambda shape: shape[1] * shape[2], reverse=True)  # the most tokens first


def bench_kernels(args) -> None:
    """The attention with the most tokens under each SDPA backend; GroupNorm(1, C) forward+backward in NCHW and
    channels_last, eager and compiled with the GELU after it. At the training batch, in bf16 autocast."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, batch = torch.device(args.device), args.batches[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def fwd_bwd(fn, x):
        def run():
            x.grad = None
            fn(x).float().sum().backward()
        return run

    # the attention with the most tokens (32x32 in the seed UNet) under each SDPA backend
    c, h, w, heads = attention_shapes(args)[0]
    q, k, v = (torch.randn(batch, heads, h * w, c // heads, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v).float().sum().backward()
        row = {"part": "kernels", "op": f"SDPA {backend.name}", "shape": [batch, heads, h * w, c // heads]}
        try:
            row["ms"] = 1000 * timed(run, args.steps, device)
        except Exception as error:  # noqa: BLE001 - a backend that does not run here is a result too
            row["error"] = str(error).strip().splitlines()[0][:200]
        append_row(args.jsonl, row)
    # GroupNorm eagerly at each level of the UNet, then compiled with the GELU after it at the largest (the
    # compiles come last: a few seconds each, and the part has a time cap)
    shapes = [(64, 64, 64), (128, 32, 32), (256, 16, 16)] if not args.tiny else [(8, 16, 16)]
    for compiled, shapes_here in ((False, shapes), (True, shapes[:1])):
        for c, h, w in shapes_here:
            norm = torch.nn.GroupNorm(1, c).to(device)
            for layout in ("nchw", "channels_last"):
                x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                name = "compiled GroupNorm+GELU" if compiled else "GroupNorm"
                fn = torch.compile(lambda x, norm=norm: F.gelu(norm(x)), dynamic=False) if compiled else norm
                row = {"part": "kernels", "op": name, "layout": layout, "shape": [batch, c, h, w]}
                try:
                    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                        row["ms"] = 1000 * timed(fwd_bwd(fn, x), args.steps, device)
                except Exception as error:  # noqa: BLE001
                    row["error"] = str(error).strip().splitlines()[0][:200]
                append_row(args.jsonl, row)


# ---------------------------------------------------------------------------------------------------- sampling
def bench_sample(args) -> None:
    """One batch of `ddpm sample`'s default (autoguided DPM-Solver++, 20 steps) and of DDIM 20 steps with CFG w=3,
    eager and as one CUDA graph of the whole sampler loop (fp32, as `ddpm sample` runs)."""
    from ddpm import NoiseSchedule, SamplingConfig, UNet
    from ddpm.config import AUTOGUIDED, DiffusionConfig
    from ddpm.devices import configure_for_speed
    from ddpm.guidance import make_denoiser
    from ddpm.samplers import run_sampler

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, guide = (configure_for_speed(UNet(model_config(args, 10)).to(device).eval())[0] for _ in range(2))
    schedule = NoiseSchedule.from_config(DiffusionConfig()).to(device)
    settings = {"autoguided dpmpp2m 20": (SamplingConfig(**AUTOGUIDED), guide),
                "cfg ddim 20": (SamplingConfig(sampler="ddim", steps=20, guidance=3.0), None)}
    for batch in args.batches:
        labels = torch.arange(batch, device=device) % 10
        shape = (batch, model.config.in_channels, model.config.image_size, model.config.image_size)
        for name, (sampling, guide_net) in settings.items():
            # the denoiser is built once, outside the graph (its checks read the device); the loop reads nothing
            # (tests/test_samplers.py runs it on the meta device)
            denoiser = make_denoiser(model, labels, sampling, schedule=schedule, guide=guide_net)

            def draw(sampling=sampling, denoiser=denoiser):
                with torch.no_grad():
                    return run_sampler(denoiser, schedule, shape, sampling, device=device)

            row = {"part": "sample", "setting": name, "batch": batch}
            row["eager_images_per_s"] = batch / timed(draw, 2, device, warmup=1)
            if device.type == "cuda":
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        draw()
                    row["graph_images_per_s"] = batch / timed(graph.replay, 2, device, warmup=1)
                except Exception as error:  # noqa: BLE001
                    row["graph_error"] = str(error).strip().splitlines()[0][:200]
            append_row(args.jsonl, row)


# ---------------------------------------------------------------------------------------------------- report
def _number(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_table(rows: list[dict]) -> list[str]:
    lines = ["| network | mode | batch | train img/s | step ms | TFLOP/s | % of bf16 peak | peak GiB | first 4 steps s "
             "| graphed | compiled frames / recompiles in the timed steps / graph breaks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['net']} | {r['mode']} | {r['batch']} | failed: {r['error']} ||||||||")
            continue
        peak = peak_tflops(r["device"])
        share = f"{100 * r['tflops'] / peak:.1f}%" if r.get("tflops") and peak else "-"
        lines.append(f"| {r['net']}{' (10 classes)' if r.get('classes') else ''} | {r['mode']} | {r['batch']} "
                     f"| {_number(r['images_per_s'])} | {_number(r['step_ms'], 1)} | {_number(r.get('tflops'))} "
                     f"| {share} | {_number(r.get('peak_gib'), 1)} | {_number(r['first_steps_s'], 1)} "
                     f"| {'yes' if r['graphed'] else 'no'} "
                     f"| {r.get('frames', '-')} / {r.get('recompiled', '-')} / {r.get('graph_breaks', '-')} |")
    return lines


def targets(train: list[dict], cold: list[dict] = ()) -> dict:
    """Issue 18's targets from the training rows: value, target and met (None when not measured). The first step's
    time comes from the cold-cache rows when there are any (later rows find the cache those filled)."""
    ok = [r for r in train if "error" not in r]
    ours = [r for r in ok if r["net"] == "ours"]
    compiled = ("compile", "compile+graphs", "reduce-overhead")

    def best(rows):
        return max(rows, key=lambda r: r["images_per_s"], default=None)

    seed = best([r for r in ours if r["batch"] == 14 and r.get("classes") == 10])
    at_128 = best([r for r in ours if r["batch"] == 128])
    ours_compiled = best([r for r in ours if r["batch"] == 128 and r["mode"] in compiled])
    peer = best([r for r in ok if r["net"] != "ours" and r["batch"] == 128 and r["mode"] in compiled])
    ratio = ours_compiled["images_per_s"] / peer["images_per_s"] if ours_compiled and peer else None
    values = {"seed batch 14 img/s": seed and seed["images_per_s"],
              "batch 128 img/s": at_128 and at_128["images_per_s"],
              "x best peer at 128, both compiled": ratio,
              "first step s (compile and capture)": first_step_seconds(cold, at_128)}
    result = {}
    for name, target in TARGETS.items():
        value = values[name]
        met = None if value is None else (value < target if name.startswith("first") else value >= target)
        result[name] = {"value": value, "target": target, "met": met}
    return result


def first_step_seconds(cold: list[dict], at_128: dict | None) -> float | None:
    """The first 4 steps of the compiled and graphed step at batch 128 with an empty compile cache, else (no cold
    row) those of the fastest batch-128 row."""
    times = [r["first_steps_s"] for r in cold if "error" not in r and r["net"] == "ours" and r["batch"] == 128]
    return min(times) if times else (at_128 and at_128["first_steps_s"])


def speedups(train: list[dict], sample: list[dict]) -> list[str]:
    """The ratios that decide the defaults: graphs over eager and compile+graphs over graphs, per network and
    batch, and the sampler graph over the eager loop."""
    speed = {(r["net"], r["batch"], r["mode"]): r["images_per_s"] for r in train if "error" not in r}
    lines = ["| what | network | batch | speed-up |", "|---|---|---|---|"]
    for (net, batch, mode), value in sorted(speed.items()):
        base = {"graphs": "eager", "compile+graphs": "graphs", "compile": "eager"}.get(mode)
        if base and (net, batch, base) in speed:
            lines.append(f"| {mode} / {base} | {net} | {batch} | {value / speed[(net, batch, base)]:.2f}x |")
    for r in sample:
        if r.get("graph_images_per_s"):
            lines.append(f"| sampler graph / eager loop ({r['setting']}) | ours | {r['batch']} "
                         f"| {r['graph_images_per_s'] / r['eager_images_per_s']:.2f}x |")
    return lines


def bench_report(args) -> None:
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()] \
        if args.jsonl.exists() else []
    train = [r for r in rows if r["part"] == "train"]
    cold = [r for r in rows if r["part"] == "cold"]
    goals = targets(train, cold)
    lines = ["## Training step (Trainer.step: bf16 autocast, channels_last, fused AdamW, EMA)", "",
             *training_table(train), "", "## Targets (issue 18)", "", "| target | measured | goal | met |",
             "|---|---|---|---|"]
    for name, goal in goals.items():
        met = {None: "not measured", True: "MET", False: "NOT MET"}[goal["met"]]
        lines.append(f"| {name} | {_number(goal['value'], 1)} | {goal['target']} | {met} |")
    lines += ["", "## Speed-ups that decide the defaults", "",
              "`--cuda-graphs auto` may turn on (step_graph.GRAPHS_MEASURED_FASTER_ON_CUDA) once graphs / eager is",
              "above 1 at every batch and the equality rows show no drift.", "",
              *speedups(train, [r for r in rows if r["part"] == "sample"])]
    if cold:
        lines += ["", "## Compiling with an empty cache (beside the 90 s training run; only the time to the first fast "
                  "step counts)", "", "| network | mode | batch | first 4 steps s | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['net']} | {r['mode']} | {r['batch']} | {_number(r.get('first_steps_s'), 1)} "
                  f"| {r.get('error', '')} |" for r in cold]
    for part, title in (("equal", "Graphed against eager, same weights and batches"),
                        ("kernels", "Kernels (forward + backward)"), ("sample", "Sampling one batch")):
        part_rows = [{k: v for k, v in r.items() if k != "part"} for r in rows if r["part"] == part]
        if part_rows:
            keys = list(dict.fromkeys(k for r in part_rows for k in r))
            lines += ["", f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k, "-")) for k in keys) + " |" for r in part_rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"rows": rows, "targets": goals}, indent=1))
    (args.out / "gpu_check_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("train", "equal", "kernels", "sample", "report"))
    parser.add_argument("--net", choices=("ours", "lucidrains", "diffusers"), default="ours")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager", "graphs"])
    parser.add_argument("--batches", type=int, nargs="+", default=[128])
    parser.add_argument("--classes", type=int, default=None, help="our UNet class-conditional with N classes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (an extra eager step)")
    parser.add_argument("--cold", action="store_true",
                        help="rows of a compile with an empty cache, run beside other GPU work: only their first "
                             "steps' time counts (the first-step target); they also fill the cache for later rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (a CPU check of this script)")
    parser.add_argument("--jsonl", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")) / "gpu.jsonl")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    if args.part != "report" and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible here; `--device cpu --tiny` checks the script itself")
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    {"train": bench_train, "equal": bench_equal, "kernels": bench_kernels, "sample": bench_sample,
     "report": bench_report}[args.part](args)


if __name__ == "__main__":
    main()
