"""Where the model runs: CUDA when available, then Apple's MPS, then the CPU; an explicit
choice always wins. The CPU thread count is settable (Slicer users often want to keep cores
free for the GUI)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import SAMMed3DError


def select_device(preferred: Union[str, torch.device, None] = None) -> torch.device:
    """``preferred`` ("cuda", "cuda:1", "mps", "cpu", or None/"auto" for the best available)."""
    if preferred is None or str(preferred) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except (RuntimeError, TypeError) as exc:
        raise SAMMed3DError(f"unknown device {preferred!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SAMMed3DError(
                f"device {preferred!r} was asked for but this PyTorch has no usable CUDA GPU; "
                "use --device cpu (or auto), or install a CUDA build of PyTorch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SAMMed3DError(
                f"device {preferred!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found"
            )
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise SAMMed3DError(f"device {preferred!r} was asked for but MPS is not available; use cpu or auto")
    elif device.type != "cpu":
        raise SAMMed3DError(f"unsupported device {preferred!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def set_cpu_threads(count: Optional[int]) -> int:
    """Set PyTorch's intra-op CPU thread count (None leaves it); returns the count in force."""
    if count is not None:
        if count < 1:
            raise SAMMed3DError(f"CPU thread count must be at least 1, got {count}")
        torch.set_num_threads(count)
    return torch.get_num_threads()


def describe_device(device: torch.device) -> str:
    """A short human description, for logs and benchmark tables."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
