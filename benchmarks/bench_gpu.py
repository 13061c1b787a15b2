"""GPU throughput of the seed model: training images/s and sampling steps/s with bf16 autocast,
channels_last, optional torch.compile and CUDA graphs, at batch 64 and 128, with peak GPU memory.

    python benchmarks/bench_gpu.py [--compile] [--batches 64 128] [--steps 20]

One prepared script for a machine with a CUDA GPU; prints a table to paste into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from ddpm import DiffusionConfig, ModelConfig, NoiseSchedule, UNet
from ddpm.devices import configure_for_speed
from ddpm.diffusion import training_losses
from ddpm.training import make_optimizer


def timed(fn, steps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible here; on a CPU run `python benchmarks/bench.py all` instead")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    schedule = NoiseSchedule.from_config(DiffusionConfig()).to(device)
    rows = []
    for batch in args.batches:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model, _ = configure_for_speed(UNet(ModelConfig()).to(device))
            net = torch.compile(model) if args.compile else model
            optimizer = make_optimizer(model, 3e-4, 0.01, device)
            x0 = (torch.rand(batch, 3, 64, 64, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
            gen = torch.Generator(device).manual_seed(0)

            def train_step():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    loss = training_losses(net, schedule, x0, generator=gen, null_class=None)[0].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            torch.cuda.reset_peak_memory_stats()
            train_s = timed(train_step, args.steps)
            train_mem = torch.cuda.max_memory_allocated() / 2**30

            x = torch.randn(batch, 3, 64, 64, device=device)
            t = torch.full((batch,), 500, device=device)

            def sample_step():
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    return net(x, t)

            torch.cuda.reset_peak_memory_stats()
            sample_s = timed(sample_step, args.steps)
            sample_mem = torch.cuda.max_memory_allocated() / 2**30
            graph_s = float("nan")
            try:  # CUDA graph of one denoising step: removes the launch overhead of ~300 small kernels
                static_x, static_t = x.clone(), t.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                # autocast's cast cache must be off while capturing (its cached copies would not be in the graph's pool)
                graph_autocast = lambda: torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
                with torch.cuda.stream(stream), torch.no_grad(), graph_autocast():
                    for _ in range(3):
                        model(static_x, static_t)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.no_grad(), graph_autocast():
                    model(static_x, static_t)
                graph_s = timed(graph.replay, args.steps)
            except Exception as error:  # noqa: BLE001 - report, keep the other numbers
                print(f"CUDA graph capture failed: {error}")
            rows.append((batch, str(dtype).replace("torch.", ""), batch / train_s, train_mem, batch / sample_s, batch / graph_s, sample_mem))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, compile={args.compile}")
    print("| batch | dtype | train images/s | train peak GiB | sample images/s (1 step) | with CUDA graph | sample peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.1f} |")


if __name__ == "__main__":
    main()
