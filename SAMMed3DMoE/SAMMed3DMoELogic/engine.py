"""The one place that knows the engine's (``SAMMed3DMoELib``) API: volumes, sessions, errors,
devices. The engine needs PyTorch, so it is imported inside the functions, never at import time."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .prompts import BoxPrompt, Prompts

AUTO, GENERAL = "auto", "general"
DEVICES = ("auto", "cuda", "mps", "cpu")

CPU_WARNING = (
    "Running on the CPU: the first click in a new region takes about 1 s (image encoding), later "
    "clicks in the same region about 30-110 ms (measured on 2 CPU threads, see BENCHMARKS.md). "
    "A CUDA or Apple GPU is much faster."
)

# Working memory a session needs on the GPU beside the weights: the 128^3 window's activations
# in the ViT-B encoder, the prepared volume and the embedding cache (the engine's budget is
# 512 MiB). An estimate used to warn before loading, not a limit.
GPU_WORKING_BYTES = 2 * 2 ** 30


def user_error(message: str) -> Exception:
    """The engine's SAMMed3DError (a message that says what to do) when the engine can be
    imported, else a RuntimeError."""
    try:
        from SAMMed3DMoELib.errors import SAMMed3DError
    except ImportError:  # dependencies not installed yet
        return RuntimeError(message)
    return SAMMed3DError(message)


def cancelled_error(message: str) -> Exception:
    """The engine's CancelledError (the Logic reports such a result as dropped)."""
    from SAMMed3DMoELib.errors import CancelledError

    return CancelledError(message)


def new_worker():
    """The engine's SessionWorker: one persistent thread for model work."""
    from SAMMed3DMoELib.worker import SessionWorker

    return SessionWorker()


def load_model(spec: str, device: str = AUTO, progress=None, cancel=None):
    """Resolve ``spec`` (catalog name, local file or bundle folder, Hub repo id; downloads if
    needed, with ``progress(done, total)`` and ``cancel``), check the device's memory and load
    the model onto that device (sessions then share it without copying)."""
    from SAMMed3DMoELib.bundle import load_model as load_engine_model
    from SAMMed3DMoELib.device import select_device
    from SAMMed3DMoELib.hub import resolve_model

    path = resolve_model(spec, progress=progress, cancel=cancel)
    check_device_memory(device, path)
    return load_engine_model(path, device=select_device(None if device == AUTO else device))


def make_volume(array_kji_: np.ndarray, affine: np.ndarray):
    """The engine's Volume from a ``[k, j, i]`` array and an IJK-to-RAS matrix (no copy)."""
    from SAMMed3DMoELib.geometry import Volume

    if hasattr(Volume, "from_kji"):
        return Volume.from_kji(array_kji_, affine)
    return Volume(array_kji_.transpose(2, 1, 0), affine)


@dataclass
class Outcome:
    """What one prediction produced: the mask on the volume grid over a box, and what to show."""

    region: Optional[np.ndarray]
    """bool [i, j, k] over ``offset`` .. ``offset + region.shape``; None for "no mask"."""
    offset: Tuple[int, int, int] = (0, 0, 0)
    expert: str = ""
    confidence: Optional[float] = None
    milliseconds: float = 0.0
    notes: Tuple[str, ...] = ()

    @property
    def info(self) -> str:
        """The info line: expert used, its confidence, time taken."""
        if self.region is None:
            return "No prompts: nothing segmented."
        parts = [f"Expert: {self.expert}" if self.expert else "Model"]
        if self.confidence is not None:
            parts.append(f"confidence {self.confidence:.2f}")
        parts.append(f"{self.milliseconds:.0f} ms")
        return " · ".join(parts)


class EngineSession:
    """One engine ``Session`` for one volume, driven by whole prompt lists.

    Every method runs on the worker thread (the engine's session is not shared between threads).
    :meth:`sync` turns the current list of Markups prompts into the session's add/remove calls,
    so unchanged prompts keep their memoised steps and cached image embeddings."""

    def __init__(self, volume, model, *, device: str = AUTO, max_windows: int = 8) -> None:
        from SAMMed3DMoELib.session import Session

        self.session = Session(volume, model, device=device, max_windows=max_windows)
        self.shape = volume.shape
        self._live: Dict[tuple, Tuple[int, object]] = {}  # prompt key -> (session prompt id, prompt)
        self.closed = False

    def configure(self, expert: str = AUTO, tau: Optional[float] = None) -> None:
        """The session's expert choice and τ (per session: a shared model is never changed)."""
        self.session.expert = expert
        self.session.tau = None if tau is None else float(tau)

    def sync(self, prompts: Prompts) -> None:
        """Make the session's prompts equal ``prompts`` (removed and moved ones replaced)."""
        wanted = {p.key: p for p in prompts.points}
        if prompts.box is not None:
            wanted[prompts.box.key] = prompts.box
        for key, (prompt_id, prompt) in list(self._live.items()):
            if wanted.get(key) != prompt:
                self.session.remove_prompt(prompt_id)
                del self._live[key]
        for prompt in list(prompts.points) + ([prompts.box] if prompts.box is not None else []):
            if prompt.key in self._live:
                continue
            if isinstance(prompt, BoxPrompt):
                prompt_id = self.session.set_box(prompt.ras_min, prompt.ras_max)
            else:
                prompt_id = self.session.add_point(prompt.ras, positive=prompt.positive)
            self._live[prompt.key] = (prompt_id, prompt)

    def predict(self, cancel: Optional[threading.Event] = None) -> Outcome:
        start = time.perf_counter()
        result = self.session.predict(cancel=cancel)
        milliseconds = (time.perf_counter() - start) * 1e3
        expert, confidence = describe_decoders(result.decoders, result.weights, result.scores)
        return Outcome(
            region=np.asarray(result.region, dtype=bool),
            offset=tuple(int(v) for v in result.offset),
            expert=expert,
            confidence=confidence,
            milliseconds=milliseconds,
            notes=tuple(result.notes),
        )

    def new_segment(self) -> None:
        """Forget the prompts (the next segment starts fresh); image embeddings stay cached."""
        if hasattr(self.session, "start_new_segment"):
            self.session.start_new_segment()
        else:
            for prompt_id, _ in self._live.values():
                self.session.remove_prompt(prompt_id)
        self._live.clear()

    def close(self) -> None:
        """Free what the session holds (GPU memory included)."""
        if hasattr(self.session, "close"):
            self.session.close()
        self.session = None
        self.closed = True


def describe_decoders(decoders: Sequence[str], weights: Dict[str, float], scores: Optional[Dict[str, float]]):
    """("expert name(s) used", confidence) for the info line. The confidence is the gate's score
    of the expert that was chosen (None without a gate)."""
    used = [d for d in decoders if weights.get(d, 0.0) > 0]
    experts = [d for d in used if d != GENERAL]
    if experts:
        name = experts[0]
        text = name if weights.get(name, 0.0) >= 0.999 else f"{name} {weights[name]:.0%} + general"
        return text, (scores or {}).get(name)
    return GENERAL, (scores or {}).get(GENERAL)


def check_device_memory(device: str, model_path) -> None:
    """Before loading onto a GPU: refuse with advice when it has clearly too little free memory
    for the weights plus a session's working memory (:data:`GPU_WORKING_BYTES`)."""
    import torch

    from SAMMed3DMoELib.device import select_device

    target = select_device(None if device == AUTO else device)
    if target.type != "cuda":
        return
    path = str(model_path)
    if os.path.isdir(path):
        weights = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    else:
        weights = os.path.getsize(path)
    free, total = torch.cuda.mem_get_info(target)
    needed = weights + GPU_WORKING_BYTES
    if free < needed:
        raise user_error(
            f"The GPU ({torch.cuda.get_device_name(target)}) has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB; "
            f"this model needs about {needed / 2**30:.1f} GiB. Close other programs that use the GPU, or choose "
            "the CPU as device (slower)."
        )
