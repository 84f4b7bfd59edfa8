"""Training checkpoints: everything a run needs to continue exactly, loadable with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples and dicts only).

A checkpoint holds the trainable state of the task, the optimizer, the LR scheduler, the AMP
grad scaler, the random states of Python, NumPy and torch (CPU and CUDA), the data position
(epoch and batches used in it), the step, the best validation score, and the run's options.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.files import temp_name

FORMAT = "sammed3d-moe-training"
VERSION = 1


def rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` (plus format tags) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SAMMed3DError(f"training checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise SAMMed3DError(f"{path} could not be read as a training checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SAMMed3DError(f"{path} is not a SAM-Med3D-MoE training checkpoint (no '{FORMAT}' format tag)")
    if int(data.get("version", 0)) > VERSION:
        raise SAMMed3DError(f"{path} was written by a newer version of the training scripts; upgrade them")
    return data
