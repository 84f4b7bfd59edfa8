"""Reading official SAM-Med3D checkpoints and state-dict files, safely and with explained errors.

Checkpoints (``.pth``/``.pt``/``.ckpt``) are read with ``torch.load(weights_only=True)``, which
refuses pickles that would construct arbitrary objects or call functions; nothing in a refused
file is run. The only extra types allowed are harmless containers found in official training
checkpoints next to the weights (``argparse.Namespace`` arguments, numpy numbers). ``.safetensors``
files hold tensors only. Every state dict is loaded with strict key and shape checks, and a
mismatch is explained (another architecture, a decoder alone, a 2D SAM, a training wrapper).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import SAMMed3DError
from .files import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX, TORCH_SUFFIXES, unreadable
from .model import SamMed3D, build_sam_med3d

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "load_state_dict_file",
    "load_checkpoint",
    "load_strict",
]

PathLike = Union[str, "os.PathLike[str]"]


BOX_KEY = "prompt_encoder.point_embeddings.2.weight"
OFFICIAL_ARCHITECTURE = "SAM-Med3D ViT-B 'ori' (sam_med3d_turbo.pth and checkpoints fine-tuned from it)"
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
_LIST_SHOWN = 5


# --------------------------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: PathLike) -> Dict[str, Tensor]:
    """The state dict in a ``.pth``/``.pt``/``.ckpt`` or ``.safetensors`` file, on the CPU.

    Torch files may hold a raw state dict or a training checkpoint with the weights under
    ``model_state_dict`` (the official SAM-Med3D files), ``state_dict`` or ``model``; everything
    else in a training checkpoint (optimizer state, epoch, arguments) is ignored. A leading
    ``module.`` (DataParallel) is stripped from the names.
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise SAMMed3DError(f"Checkpoint file not found: {path}. Check the path, or download the checkpoint again.")
    if path.is_dir():
        raise SAMMed3DError(
            f"{path} is a folder, not a checkpoint file. A bundle folder is loaded with load_model or "
            "load_bundle; otherwise give the .pth or .safetensors file inside it."
        )
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        obj: Any = read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _read_torch_file(path)
    else:
        raise SAMMed3DError(
            f"{path.name}: unknown checkpoint type '{suffix or '(no extension)'}'. Give a PyTorch checkpoint "
            f"({', '.join(TORCH_SUFFIXES)}) or a .safetensors file."
        )
    return _extract_state_dict(obj, path)


def read_safetensors(path: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except OSError as exc:
        raise unreadable(path, exc) from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers/data
        raise SAMMed3DError(
            f"{path.name} is damaged: it is not a readable .safetensors file ({_first_line(exc)}). "
            "Download or export it again."
        ) from None


def _read_torch_file(path: Path) -> Any:
    try:
        with _extra_safe_globals():
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        refused = re.search(r"Unsupported (?:global|class):?\s*(?:GLOBAL\s+)?([\w.]+)", message)
        if refused or "unrecognized function" in message or "Can only build" in message:
            what = f" (it asks for {refused.group(1)})" if refused else ""
            raise SAMMed3DError(
                f"{path.name} contains executable Python objects{what}, so it was refused and nothing in "
                "it was run. Only plain weight files are loaded: use a checkpoint that holds tensors only "
                "(an official SAM-Med3D .pth or a .safetensors file), or, if you trust its source, load it "
                "yourself and save model.state_dict() with torch.save."
            ) from None
        raise SAMMed3DError(
            f"{path.name} could not be read: it is damaged or not a PyTorch checkpoint "
            f"({_pickle_detail(message)}); nothing in it was run. Download it again."
        ) from None
    except OSError as exc:
        raise unreadable(path, exc) from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError) as exc:
        empty = path.stat().st_size == 0
        raise SAMMed3DError(
            f"{path.name} is damaged ({'the file is empty' if empty else _first_line(exc)}): it is probably "
            "truncated or corrupt. Download it again."
        ) from None


def _pickle_detail(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return match.group(1).strip() if match else _first_line(message)


def _first_line(exc: Union[BaseException, str]) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class _extra_safe_globals:
    """Allow, for one ``torch.load``, the data-only types that official training checkpoints
    keep next to the weights. None of them can run code: a Namespace only stores attributes,
    numpy scalars and arrays only copy bytes into numbers."""

    def __init__(self) -> None:
        self._context = None
        factory = getattr(torch.serialization, "safe_globals", None)
        if factory is not None:
            self._context = factory(_safe_globals_list())

    def __enter__(self) -> None:
        if self._context is not None:
            self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


def _safe_globals_list() -> list:
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np

        try:
            from numpy._core import multiarray  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray  # type: ignore[no-redef]
        allowed += [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
        allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=str)
        if _torch_version() >= (2, 6):  # (object, name) pairs: the other numpy major's module path
            for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
                allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return allowed


def _torch_version() -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _extract_state_dict(obj: Any, path: Path) -> Dict[str, Tensor]:
    if isinstance(obj, Mapping) and obj and not all_tensors(obj):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all_tensors(inner):
                obj = inner
                break
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise SAMMed3DError(
                f"{path.name} is not a model state dict: it holds a dictionary with keys {keys}"
                f"{', ...' if len(obj) > 8 else ''} and none of {', '.join(_STATE_DICT_KEYS)} holds the model's "
                "tensors. Give a file saved from model.state_dict() or an official SAM-Med3D checkpoint."
            )
    if not isinstance(obj, Mapping):
        raise SAMMed3DError(
            f"{path.name} is not a model state dict: it holds a {type(obj).__name__}. Give a file saved from "
            "model.state_dict() or an official SAM-Med3D checkpoint."
        )
    if not obj:
        raise SAMMed3DError(f"{path.name} holds no weights (an empty dictionary). Export the model again.")
    state: Dict[str, Tensor] = {}
    for key, value in obj.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in state:
            raise SAMMed3DError(
                f"{path.name} holds '{name}' twice (with and without the 'module.' prefix); export the model again."
            )
        state[name] = value
    return state


def all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())


# --------------------------------------------------------------------------------------------
# Loading into models with strict, explained checks
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: PathLike, *, box_prompts: Optional[bool] = None, **size: Any) -> SamMed3D:
    """An official SAM-Med3D checkpoint as a :class:`SamMed3D` (CPU, float32, eval mode).

    The architecture is the official ViT-B "ori" one; ``box_prompts`` is read from the file
    (box corner embeddings present or not) unless given. ``size`` keywords build another size
    (see ``VIT_B_ORI``; for tests and custom training). Every tensor must fit: missing,
    unexpected and mis-shaped entries are reported by name.
    """
    state = load_state_dict_file(path)
    return base_from_state_dict(state, box_prompts=box_prompts, size=size, source=Path(os.fspath(path)).name)


def base_from_state_dict(state: Mapping[str, Tensor], *, box_prompts: Optional[bool], size: Mapping[str, Any],
                          source: str) -> SamMed3D:
    if box_prompts is None:
        box_prompts = BOX_KEY in state
    try:
        model = build_sam_med3d(box_prompts=bool(box_prompts), **size)
    except (TypeError, ValueError) as exc:
        raise SAMMed3DError(f"cannot build the model for {source}: {exc}") from None
    expected = OFFICIAL_ARCHITECTURE if not size else f"SAM-Med3D of size {dict(size)}"
    if box_prompts:
        expected += " with box prompts"
    load_strict(model, state, source=source, expected=expected, guess=_guess_architecture)
    return model


def load_strict(module: nn.Module, state: Mapping[str, Tensor], *, source: str, expected: str,
                 guess: Optional[Callable[[Mapping[str, Tensor], nn.Module], str]] = None) -> None:
    """``module.load_state_dict(state, strict=True)`` with a message that explains a mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_shortlist(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_shortlist(unexpected)})")
        if shapes:
            shown = [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in shapes[:_LIST_SHOWN]]
            more = f", and {len(shapes) - _LIST_SHOWN} more" if len(shapes) > _LIST_SHOWN else ""
            parts.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shown)}{more})")
        hint = guess(state, module) if guess is not None else ""
        raise SAMMed3DError(
            f"{source} does not fit the expected architecture, {expected}: {', '.join(parts)}. "
            f"{hint + ' ' if hint else ''}Supported: {OFFICIAL_ARCHITECTURE}; bundles made by this program."
        )
    bad = [k for k, v in state.items() if not (v.is_floating_point() or own[k].dtype == v.dtype)]
    if bad:
        raise SAMMed3DError(
            f"{source}: {len(bad)} tensor(s) have a non-floating type where the model stores "
            f"{own[bad[0]].dtype} ({_shortlist(bad)}); the file is not a SAM-Med3D weight file. Export it again."
        )
    module.load_state_dict(dict(state), strict=True)


def _shortlist(names: List[str]) -> str:
    shown = ", ".join(names[:_LIST_SHOWN])
    return shown + (f", ... ({len(names) - _LIST_SHOWN} more)" if len(names) > _LIST_SHOWN else "")


def _guess_architecture(state: Mapping[str, Tensor], model: nn.Module) -> str:
    """A sentence about what a state dict that does not fit SAM-Med3D looks like."""
    keys = list(state)
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    if not any(k.startswith(parts) for k in keys):
        if "iou_token.weight" in state and any(k.startswith("transformer.layers.") for k in keys):
            return ("This looks like a mask decoder alone (an expert file), not a whole model: add it to a "
                    "bundle with add_expert_to_bundle.")
        if "fc2.weight" in state and any(k.startswith("cross_attn_prompt_to_image.") for k in keys):
            return "This looks like a gating network alone, not a whole model."
        for prefix in ("model.", "sam.", "net.", "_orig_mod."):
            if keys and all(k.startswith(prefix) for k in keys):
                return (f"Every key starts with '{prefix}': this is a training wrapper's checkpoint; save the "
                        "inner SAM-Med3D model's state_dict() instead.")
        return "This does not look like a SAM-Med3D checkpoint at all (another architecture)."
    patch = state.get("image_encoder.patch_embed.proj.weight")
    pos = state.get("image_encoder.pos_embed")
    if (patch is not None and patch.dim() == 4) or (pos is not None and pos.dim() == 4):
        return "This looks like a 2D SAM checkpoint (SAM, MedSAM or SAM-Med2D), not the 3D SAM-Med3D."
    own = model.state_dict()
    if pos is not None and "image_encoder.pos_embed" in own and pos.shape != own["image_encoder.pos_embed"].shape:
        return (f"This looks like SAM-Med3D of another size or variant (position embedding {list(pos.shape)}, "
                f"expected {list(own['image_encoder.pos_embed'].shape)}).")
    return ""


