"""Device, precision and memory-format choices, made once from what the hardware runs fast."""
from __future__ import annotations

import contextlib
import functools
import random

import numpy as np
import torch

from .errors import MedclfError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MedclfError(f"unknown device {requested!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedclfError("--device cuda requested but no CUDA GPU is available")
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls/convolutions run several times faster than fp32 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise MedclfError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def use_channels_last(requested: bool | None, device: torch.device, precision: str) -> bool:
    if requested is not None:
        return requested
    # convolutions run NHWC-native in oneDNN and cuDNN: faster on CPU (fp32 too) and on CUDA
    return device.type in ("cuda", "cpu")


def tune_backend(device: torch.device) -> None:
    """cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest: the input
    shape is fixed for a whole run (one size, one batch size), so that first-batch cost buys every later step."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Sums of per-step losses kept on the device: float64 (as a Python float would), except where a backend has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state() -> dict:
    """Every global random stream training draws from (TrivialAugment uses torch's), for an exact resume.
    Plain types and tensors only, so the checkpoint loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe(device: torch.device, precision: str, channels_last: bool) -> str:
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {threads} threads"
    return f"{where}, {precision}{', channels_last' if channels_last else ''}"
