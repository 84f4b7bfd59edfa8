"""Where the model runs, and what counts as running out of memory there.

``select_device("auto")`` picks CUDA when available; then Apple's MPS, but only if a whole
prediction runs there (probed once per process with a tiny model, see
:func:`prediction_runs_on`: an MPS build that lacks an operation the network or the windowing
needs would otherwise fail on the user's first click); then the CPU. An explicit choice always
wins. The CPU thread count is settable (Slicer users often want to keep cores free for the GUI).
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .errors import SAMMed3DError

# Messages of allocation failures that PyTorch raises as a plain RuntimeError (the CUDA caching
# allocator raises torch.OutOfMemoryError; cuBLAS/cuDNN/cuFFT handles, MPS and the CPU allocator
# do not).
_OUT_OF_MEMORY_MESSAGES = (
    "out of memory",                   # "CUDA out of memory", "MPS backend out of memory"
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUFFT_ALLOC_FAILED",
    "can't allocate memory",           # the CPU allocator
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure on any device: ``torch.OutOfMemoryError`` (CUDA),
    cuBLAS/cuDNN/cuFFT allocation errors, MPS and CPU out-of-memory, and ``MemoryError``."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m.lower() in str(exc).lower() for m in _OUT_OF_MEMORY_MESSAGES)


def select_device(preferred: Union[str, torch.device, None] = None) -> torch.device:
    """``preferred`` ("cuda", "cuda:1", "mps", "cpu", or None/"auto" for the best available)."""
    if preferred is None or str(preferred) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available() and prediction_runs_on("mps"):
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
        if not _mps_available():
            raise SAMMed3DError(f"device {preferred!r} was asked for but MPS is not available; use cpu or auto")
    elif device.type != "cpu":
        raise SAMMed3DError(f"unsupported device {preferred!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` with its index filled in ("cuda" -> "cuda:<current>", "mps" -> "mps:0"), so it
    compares equal to the device of the tensors that live there."""
    device = torch.device(device)
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if device.index is None and device.type == "mps":
        return torch.device("mps", 0)
    return device


def module_placement(module: nn.Module):
    """``(device, dtype)`` shared by all floating-point parameters and buffers of ``module``, or
    None when they are spread over several devices or dtypes."""
    found = {(t.device, t.dtype) for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()}
    return next(iter(found)) if len(found) == 1 else None


def copy_module(module: nn.Module, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on ``device`` (floating-point
    ones cast to ``dtype`` when given). Each tensor is copied to ``device`` first and cast there,
    so nothing new is allocated on the module's own device (this works while that device is out
    of memory) and the original is not touched."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device, copy=True)
        if dtype is not None and moved.is_floating_point():
            moved = moved.to(dtype)
        memo[id(tensor)] = nn.Parameter(moved, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(module, memo)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@functools.lru_cache(maxsize=None)
def prediction_runs_on(device: Union[str, torch.device]) -> bool:
    """Whether a whole interactive prediction runs on ``device``: a tiny SAM-Med3D (random
    weights, the same code as the full network: encoder, prompt encoder, decoder) segments a
    small synthetic volume through a real :class:`~SAMMed3DMoELib.session.Session` (window
    extraction, click replay, a neighbouring window, mapping back). Any error means no. The
    answer is cached per device for the process; the global random state is left untouched."""
    from .geometry import Volume
    from .model import build_sam_med3d
    from .moe import SamMed3DMoE
    from .session import Session

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = build_sam_med3d(img_size=32, patch_size=16, encoder_embed_dim=48, encoder_depth=2,
                                   encoder_num_heads=4, encoder_global_attn_indexes=(1,), window_size=1,
                                   prompt_embed_dim=48, decoder_mlp_dim=32, iou_head_hidden_dim=16)
        model = SamMed3DMoE(base, preprocessing={"spacing_mm": 1.5, "window": 32}).to(device)
        i, j, k = np.mgrid[:40, :40, :40]
        volume = Volume(((i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2 < 150).astype(np.float32) * 100 + i,
                        np.diag([1.5, 1.5, 1.5, 1.0]))
        session = Session(volume, model, device=device, modality="MR", max_windows=2, cpu_fallback=False)
        session.add_point(volume.ijk_to_ras(np.array([[20.0, 20.0, 20.0]]))[0])
        session.add_point(volume.ijk_to_ras(np.array([[24.0, 20.0, 20.0]]))[0], positive=False)
        session.predict()
        session.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this device"
        return False


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
