"""Where and how tensors compute: the device, CPU threads, seeds, bf16 autocast, the Adam kernel,
and glibc's malloc settings. Shared by agents and tasks; nothing here knows about either."""

from __future__ import annotations

import copy
import ctypes
import random

import numpy as np
import torch
import torch.nn as nn

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """Maps ``auto|cpu|cuda`` to a torch device: ``auto`` picks CUDA when present, else the CPU.

    Raises:
        ValueError: ``cuda`` without a CUDA device, or an unknown name (one line, for the user).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    if name.split(":")[0] not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose from: {', '.join(DEVICES)}")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> np.random.Generator:
    """Seeds Python, numpy and torch (CPU and every CUDA device); returns a numpy Generator for the
    caller's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    return np.random.default_rng(seed)


TORCH_DEFAULT_THREADS = torch.get_num_threads()  # one per core, before anyone changes it


def set_learner_threads(threads: int) -> int:
    """Sets torch's intra-op CPU threads of this process; returns the number set.

    Args:
        threads: the count; 0 means torch's default (one per core).

    Why agents default to one: the env workers need the other cores, and OpenMP threads spin-wait
    for a core that an env worker holds, which makes a gradient step several times slower than one
    thread (benchmarks/RESULTS.md, "CPU threads").
    """
    count = threads if threads > 0 else TORCH_DEFAULT_THREADS
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def glibc() -> ctypes.CDLL | None:
    """The C library this interpreter runs on if it is glibc, else None (musl's mallopt is a no-op)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (AttributeError, OSError):
        return None
    return libc


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep the memory torch frees for reuse instead of giving it back to the
    kernel at once; process-wide. Returns whether it applied (False off glibc: macOS, musl).

    Why: a DQN gradient step on the CPU allocates and frees the same few-MB tensors every time (the
    uint8 batch and its float copy, activations, bf16 gradients cast back to fp32). glibc serves
    allocations above its mmap threshold (128 KiB at first, moved up and down by what was freed last)
    with fresh mappings that it unmaps on free, and returns the top of its heap to the kernel; every
    reuse then page-faults and zero-fills those pages again (benchmarks/RESULTS.md, "Page faults").
    Fixed thresholds stop it: allocations up to 32 MiB (the most mallopt takes) come from the heap,
    and up to 256 MiB of free heap stays mapped.
    It is what preloading jemalloc or tcmalloc buys (PyTorch's CPU performance guide advises that),
    without a library to install.
    """
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    )


def adam_kernel(device: torch.device) -> dict[str, bool]:
    """The fastest Adam implementation torch has for ``device``, as keyword arguments of the optimizer.

    Fused (one kernel over all parameters) on the CPU and CUDA. Why on the CPU too: torch's default
    there is a Python loop over the parameters, several times slower for the Nature CNN
    (``python -m benchmarks.learner_parts``). Other devices keep torch's default.
    """
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX."""
    return device.type == "cuda" or (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def bf16_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast where the hardware computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX.

    Why on the CPU too: oneDNN's native bf16 convolutions run the Nature CNN's forward and backward
    about twice as fast as fp32 (benchmarks/RESULTS.md). Elsewhere (a CPU without native bf16, where
    bf16 is emulated and slower) the returned context does nothing. Weights, optimizer
    state, losses and the logits' softmax stay fp32; only matmuls and convolutions run in bf16.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device))


#: The layers whose inputs, weights and biases bf16 autocast rounds to bf16 (on the CPU and CUDA alike).
AUTOCAST_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def forward_copy(module: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """A copy of ``module`` for forward passes only (acting, target values), refreshed by
    ``copy.load_state_dict(module.state_dict())``.

    Under ``bf16_autocast(device, bf16)``, where that is active, the copy stores the weights and biases
    of the layers that autocast runs in bf16 (``AUTOCAST_BF16_LAYERS``) in bf16: its forward computes
    exactly what ``module`` computes under autocast, which rounds those fp32 weights to bf16 again at
    every call (``load_state_dict`` rounds them the same way, once per refresh). Why: for a Mario net
    that cast is 1.7M weights per forward, and acting beside the learner thread reads half the bytes
    (``python -m benchmarks.learner_parts``). Elsewhere it is a plain fp32 copy.

    Args:
        module: the network to copy (not changed).
        device: the device the copy computes on (its weights are already there).
        bf16: whether its forward passes will run under ``bf16_autocast(device, True)``.

    Returns:
        The copy, in eval mode, without gradients.
    """
    duplicate = copy.deepcopy(module).eval().requires_grad_(False)
    if bf16 and native_bf16(device):
        for layer in duplicate.modules():
            if isinstance(layer, AUTOCAST_BF16_LAYERS):
                layer.to(torch.bfloat16)
    return duplicate
