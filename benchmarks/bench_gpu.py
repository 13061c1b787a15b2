"""GPU training throughput of `Trainer.step` (the step `ddpm train` runs) for our seed UNet and the peers' UNets,
in bf16 autocast and channels_last, eager and torch.compile, at batch 64 and 128: images/s, achieved TFLOP/s,
percent of the card's bf16 dense peak, and peak memory. One sampling step (and its CUDA graph) for ours.

    python benchmarks/bench_gpu.py [--batches 64 128] [--steps 20] [--compile no yes] [--peers]

Run by benchmarks/gpu_check.sh on a machine with a CUDA GPU; prints Markdown tables for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer_step import PeerNet, seed_trainer, trainer_step

# bf16 dense tensor-core peaks (no sparsity), TFLOP/s, from the vendor's data sheets
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def step_flops(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def networks(peers: bool):
    """(name, builder of a network or None for ours)."""
    yield "ddpm (ours) seed UNet", None
    if not peers:
        return
    from bench import diffusers_unet, lucidrains_unet

    for name, build in (("lucidrains Unet(dim=64)", lucidrains_unet),
                        ("diffusers UNet2DModel 64-128-256-256", diffusers_unet)):
        try:
            net, forward = build()
        except ImportError as error:
            print(f"skipping {name}: {error}")
            continue
        yield name, (lambda net=net, forward=forward: PeerNet(net, forward))


def bench_training(args) -> list[tuple]:
    rows = []
    peak = peak_tflops(torch.cuda.get_device_name())
    for name, build in networks(args.peers):
        for compile_model in [c == "yes" for c in args.compile]:
            for batch in args.batches:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    trainer = seed_trainer(batch, "cuda", amp="bf16", compile_model=compile_model,
                                           net=build() if build else None)
                    step = trainer_step(trainer)
                    start = time.perf_counter()
                    step()  # compiles when asked
                    first = time.perf_counter() - start
                    flops = step_flops(step) if not compile_model else None
                    seconds = timed(step, args.steps)
                except Exception as error:  # noqa: BLE001 - one failing configuration must not lose the others
                    print(f"{name} batch {batch} compile={compile_model}: failed: {type(error).__name__}: {error}")
                    continue
                memory = torch.cuda.max_memory_allocated() / 2**30
                rows.append((name, compile_model, batch, batch / seconds, flops, seconds, memory, first, peak))
                print(f"{name} compile={compile_model} batch {batch}: {batch / seconds:.0f} img/s", flush=True)
                del trainer, step
    return rows


def print_training(rows: list[tuple]) -> None:
    flops_of = {(r[0], r[2]): r[4] for r in rows if r[4] is not None}  # the eager count serves the compiled row too
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; Trainer.step, bf16 autocast, channels_last, "
          "fused AdamW, EMA")
    print("| network | compile | batch | train images/s | TFLOP/s | % of bf16 dense peak | peak GiB | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, compiled, batch, ips, _, seconds, memory, first, peak in rows:
        flops = flops_of.get((name, batch))
        tflops = flops / seconds / 1e12 if flops else None
        share = f"{100 * tflops / peak:.1f}%" if tflops and peak else "-"
        tflops_text = f"{tflops:.0f}" if tflops else "-"
        print(f"| {name} | {'yes' if compiled else 'no'} | {batch} | {ips:.0f} | {tflops_text} | {share} "
              f"| {memory:.1f} | {first:.1f} |")


def bench_sampling(args) -> None:
    from ddpm import ModelConfig, UNet
    from ddpm.devices import configure_for_speed

    print("\n| batch | sampling images/s (one guided-free step, bf16) | with a CUDA graph |")
    print("|---|---|---|")
    torch.manual_seed(0)
    model, _ = configure_for_speed(UNet(ModelConfig()).cuda().eval())
    for batch in args.batches:
        x = torch.randn(batch, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
        t = torch.full((batch,), 500, device="cuda")
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

        def one_step():
            with torch.inference_mode(), autocast():
                return model(x, t)

        plain = timed(one_step, args.steps)
        graph_s = float("nan")
        try:  # a CUDA graph of one step removes the launch overhead of a few hundred small kernels
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad(), autocast():
                for _ in range(3):
                    model(x, t)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad(), autocast():
                model(x, t)
            graph_s = timed(graph.replay, args.steps)
        except Exception as error:  # noqa: BLE001
            print(f"CUDA graph capture failed: {error}")
        print(f"| {batch} | {batch / plain:.0f} | {batch / graph_s:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="+", choices=("no", "yes"), default=["no", "yes"])
    parser.add_argument("--peers", action="store_true",
                        help="also lucidrains' and diffusers' UNets (their packages must import)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible here; on a CPU run `python benchmarks/bench.py all` instead")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print_training(bench_training(args))
    bench_sampling(args)


if __name__ == "__main__":
    main()
