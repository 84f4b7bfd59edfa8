"""Reading official SAM-Med3D checkpoints and state-dict files, safely and with explained errors.

Checkpoints (``.pth``/``.pt``/``.ckpt``) are read with ``torch.load(weights_only=True)``, which
refuses pickles that would construct arbitrary objects or call functions; nothing in a refused
file is run. The only extra types allowed are harmless containers found in official training
checkpoints next to the weights (``argparse.Namespace`` arguments, numpy numbers). ``.safetensors``
files hold tensors only. Every state dict is loaded with strict key and shape checks, and a
mismatch is explained (another architecture, a decoder alone, a 2D SAM, a training wrapper).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import SAMMed3DError, UnsafeCheckpointError, exception_text
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
            f"{path.name} is damaged: it is not a readable .safetensors file ({exception_text(exc, first_line_only=True)}). "
            "Download or export it again."
        ) from None


def _read_torch_file(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals_list()), warnings.catch_warnings():
            # torch warns (to programmers) about pickle protocols it did not write; the refusal says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise unreadable(path, exc) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            TypeError, AttributeError) as exc:
        raise _refusal(path, exc) from None


def _refusal(path: Path, exc: BaseException) -> SAMMed3DError:
    """Why ``torch.load(weights_only=True)`` did not load ``path``. A file whose pickle asks for
    anything the weights-only loader refuses (``os.system``, ``builtins.eval``, any class or
    function outside PyTorch's allowlist) carries code and is named so, whatever else is wrong
    with it; only a file without such a request is called damaged or of another format."""
    try:
        requests, intact = pickle_imports(path)
    except OSError as err:
        return unreadable(path, err)
    allowed = _loader_allowlist()
    code = sorted({name for name in requests if name not in allowed})
    if code:
        return UnsafeCheckpointError(
            f"{path.name} carries code: loading it would call {', '.join(code[:_LIST_SHOWN])}"
            f"{', ...' if len(code) > _LIST_SHOWN else ''} (no weight file needs that). It was refused and "
            "nothing in it ran. Do not open it with other programs; use a weight file that holds tensors "
            "only (an official SAM-Med3D .pth from the model catalog, or a .safetensors file) from a source "
            "you trust."
        )
    if path.stat().st_size == 0:
        detail = "the file is empty"
    elif isinstance(exc, pickle.UnpicklingError) and intact:
        return SAMMed3DError(
            f"{path.name} is not a PyTorch checkpoint this program can read ({_loader_detail(exc)}); nothing in "
            "it was run. Give a file saved with torch.save(model.state_dict(), ...) or a .safetensors file."
        )
    else:
        detail = _loader_detail(exc)
    return SAMMed3DError(
        f"{path.name} is damaged ({detail}): it is probably truncated or corrupt, and nothing in it was run. "
        "Download or copy it again."
    )


def _loader_detail(exc: BaseException) -> str:
    """The part of a loader error that describes the file, without PyTorch's advice to programmers."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    text = match.group(1).strip() if match else exception_text(exc, first_line_only=True)
    if "weights_only" in text or "safe_globals" in text or not text:
        return type(exc).__name__
    return text


def _loader_allowlist() -> set:
    """The "module.name" globals that ``torch.load(weights_only=True)`` accepts here: PyTorch's
    own allowlist (``torch._weights_only_unpickler``, the loader itself, private but present in
    every torch this package allows; a test checks it) plus :func:`_safe_globals_list`."""
    from torch import _weights_only_unpickler as loader

    with torch.serialization.safe_globals(_safe_globals_list()):
        return set(loader._get_allowed_globals()) | set(loader._get_user_allowed_globals())


def _safe_globals_list() -> list:
    """The data-only types that official training checkpoints keep next to the weights, allowed
    for one ``torch.load``. None of them can run code: a Namespace only stores attributes, numpy
    scalars and arrays only copy bytes into numbers. The ``(object, name)`` pairs accept files
    pickled under the other numpy major version's module path."""
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list = [argparse.Namespace, multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=str)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


# --------------------------------------------------------------------------------------------
# What a refused file asks for, read without running it
# --------------------------------------------------------------------------------------------
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_LEGACY_PICKLES = 5  # legacy torch.save: magic number, protocol, system info, the object, storage keys


def pickle_imports(path: Path) -> Tuple[Set[str], bool]:
    """Every global ("module.name") the pickle(s) in ``path`` would import when loaded, and
    whether they were read to their end. Nothing is unpickled: the opcodes are listed with the
    standard library's ``pickletools``. Reads the three forms ``torch.load`` accepts: a zip
    (``torch.save``'s format since 1.6: ``<name>/data.pkl``), the legacy format (several pickles
    in a row) and a plain pickle. A name computed at load time is reported as such."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(handle) as archive:
                    member = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                    if member is None:
                        return set(), False
                    return _scan_pickles(io.BytesIO(archive.read(member)), count=1)
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError):
                return set(), False
        return _scan_pickles(handle, count=_LEGACY_PICKLES)


def _scan_pickles(stream, count: int) -> Tuple[Set[str], bool]:
    found: Set[str] = set()
    for index in range(count):
        ops, complete = _pickle_ops(stream)
        found |= _imports(ops)
        if not complete:
            return found, False
        legacy = any(op.name == "LONG1" and arg == torch.serialization.MAGIC_NUMBER for op, arg in ops)
        if index == 0 and not legacy:  # a plain pickle: one object
            return found, True
    return found, True


def _pickle_ops(stream) -> Tuple[List[Tuple[Any, Any]], bool]:
    ops: List[Tuple[Any, Any]] = []
    try:
        for op, arg, _ in pickletools.genops(stream):
            ops.append((op, arg))
    except (ValueError, EOFError, UnicodeDecodeError):  # truncated or not a pickle: what was read before
        return ops, False
    return ops, bool(ops)


def _imports(ops: List[Tuple[Any, Any]]) -> Set[str]:
    """Globals named by GLOBAL/INST (inline) and STACK_GLOBAL (the two strings pushed before it,
    possibly through the memo), mapped as Python 2 names are on load."""
    found: Set[str] = set()
    recent: List[Any] = []
    memo: Dict[Any, Any] = {}
    for op, arg in ops:
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add(_python3_name(module, attr))
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            ok = isinstance(module, str) and isinstance(attr, str)
            found.add(_python3_name(module, attr) if ok else "(a function named only when the file is loaded)")
        elif name.startswith("EXT"):
            found.add(f"(copyreg extension {arg})")
        if name in _STRING_OPS:
            recent.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name.endswith("PUT"):
            memo[arg] = recent[-1] if recent else None
        elif name.endswith("GET"):
            recent.append(memo.get(arg))
        elif op.stack_after:
            recent.append(None)
    return found


def _python3_name(module: str, attr: str) -> str:
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


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


