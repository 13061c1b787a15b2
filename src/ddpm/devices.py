"""Device choice and mixed precision, without hard-coding any device."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import DdpmError


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given (e.g. "cpu", "cuda:1", "mps"), else cuda, then mps, then cpu. An empty name is refused, not
    read as "not given" (`--device ""` in a script is a mistake, e.g. an unset variable)."""
    if name is not None and not name.strip():
        raise DdpmError("--device is empty; give cpu, cuda, cuda:N or mps (or leave the flag out)")
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DdpmError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DdpmError(f"--device {name}: CUDA is not available here; use --device cpu or leave it out")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DdpmError(f"--device {name}: MPS is not available here; use --device cpu or leave it out")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 on CUDA GPUs that support it, else off (low precision is slow on CPUs); 'bf16'|'fp16'|'none'."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """An autocast context for `dtype`, or a no-op when None. `cache=False` recasts the weights at each use (what a
    CUDA graph needs; the values are the same)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def configure_for_speed(model: torch.nn.Module, x: torch.Tensor | None = None):
    """channels_last weights (and input): faster sampling steps on the CPU, training no faster there (so `ddpm
    train` uses it on CUDA only, where cuDNN's bf16 kernels want it); benchmarks/RESULTS.md has the numbers.
    Results are unchanged (tested)."""
    model = model.to(memory_format=torch.channels_last)
    return model, (x.contiguous(memory_format=torch.channels_last) if x is not None else None)


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its compiled artefacts between runs: $TORCHINDUCTOR_CACHE_DIR when set, else
    ~/.cache/ddpm/torchinductor ($XDG_CACHE_HOME honoured). Inductor's own default is under /tmp, which a reboot
    empties; a run that finds its kernels there skips most of the compile time."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ddpm" / "torchinductor"


def compile_for_training(net: torch.nn.Module) -> torch.nn.Module:
    """torch.compile for the training step: static shapes (a run's batch never changes, and a dynamic-shape
    recompile makes slower kernels), with the compile cache kept between runs (`compile_cache_dir`)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    return torch.compile(net, dynamic=False)


# The x86 flags of native low-precision arithmetic, by autocast dtype (Linux's /proc/cpuinfo names)
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: CUDA with bf16, or a CPU whose flags (Linux's /proc/cpuinfo) list
    AVX512-BF16 or AMX; elsewhere it is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags().split()
    return any(flag in flags for flag in _NATIVE_FLAGS[torch.bfloat16])


def emulated_precision(dtype: torch.dtype | None, device: torch.device, fix: str) -> str | None:
    """A one-line notice when autocast `dtype` is only emulated on `device`: an x86 CPU whose flags list none of
    its native instructions. There a bf16 training step of the quickstart's UNet took 12x as long as in fp32 and a
    no-grad call 7x (an AVX2-only EPYC; benchmarks/RESULTS.md, "Distillation", stop 48). None elsewhere (CUDA, a
    CPU with the flags, or one whose flags are unknown or not x86's). `fix`: the flag that keeps fp32."""
    if dtype is None or device.type != "cpu" or dtype not in _NATIVE_FLAGS:
        return None
    flags = cpu_flags().split()
    native = _NATIVE_FLAGS[dtype]
    if "sse2" not in flags or any(flag in flags for flag in native):
        return None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return (f"{name} is emulated on this CPU (its flags list neither {' nor '.join(native)}): expect each step to "
            f"take several times as long as in fp32; {fix} keeps fp32")


def cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them; empty elsewhere."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
