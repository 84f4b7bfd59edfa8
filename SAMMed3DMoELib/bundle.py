"""Mixture-of-experts bundles: the format, its validation, loading, writing and editing.

A bundle is a folder::

    config.json                   format, base model, experts, gate, tau, selector, preprocessing
    base.safetensors              the general model (or a Hub pointer to an official .pth)
    experts/<name>.safetensors    one MaskDecoder3D state dict per expert (LoRA merged)
    gate.safetensors              the gating network (absent without a gate)

``config.json`` records the SHA-256 of every file; :func:`load_bundle` checks them all before
loading anything, and every state dict is loaded with strict key and shape checks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .catalog import is_repo_id
from .checkpoint import (
    all_tensors,
    base_from_state_dict,
    load_checkpoint,
    load_state_dict_file,
    load_strict,
    read_safetensors,
)
from .device import select_device
from .errors import DownloadError, SAMMed3DError
from .files import (
    CHECKPOINT_SUFFIXES,
    SAFETENSORS_SUFFIX,
    SHA256_RE,
    atomic_write_bytes,
    file_sha256,
    fsync,
    temp_name,
    unreadable,
)
from .model import (
    VIT_B_ORI,
    MaskDecoder3D,
    SamMed3D,
    build_mask_decoder,
    build_sam_med3d,
)
from .moe import (
    AUTO,
    DEFAULT_PREPROCESSING,
    GENERAL,
    SELECTORS,
    ExpertInfo,
    GatingNetwork,
    SamMed3DMoE,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "CONFIG_NAME",
    "DEFAULT_PREPROCESSING",
    "save_bundle",
    "load_bundle",
    "read_bundle_config",
    "convert_checkpoint",
    "add_expert_to_bundle",
    "remove_expert_from_bundle",
    "load_model",
]

PathLike = Union[str, "os.PathLike[str]"]

BUNDLE_FORMAT = "sammed3d-moe-bundle"
BUNDLE_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
BASE_FILE = "base.safetensors"
GATE_FILE = "gate.safetensors"
EXPERTS_DIR = "experts"

_EXPERT_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_-])?$")
_WINDOWS_DEVICE_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_GATE_CONFIG_KEYS = ("embed_dim", "num_experts", "num_heads", "mlp_dim", "hidden_dim")


# --------------------------------------------------------------------------------------------
# Bundle config: validation
# --------------------------------------------------------------------------------------------
def read_bundle_config(folder: PathLike) -> dict:
    """The validated ``config.json`` of a bundle, with defaults filled in (``gate`` None,
    ``tau`` 0.5, ``selector`` "paper", default preprocessing, expert ``description`` "").
    Every local file it lists must exist."""
    folder = Path(os.fspath(folder)).expanduser()
    config_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise SAMMed3DError(f"Bundle folder not found: {folder}. Check the path.")
    if not config_path.is_file():
        raise SAMMed3DError(
            f"{folder} is not a model bundle: it has no {CONFIG_NAME}. Give a bundle folder made by "
            "save_bundle/convert_checkpoint, or a .pth/.safetensors checkpoint file."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SAMMed3DError(
            f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "fix it or export the bundle again."
        ) from None
    except UnicodeDecodeError:
        raise SAMMed3DError(f"{config_path} is not UTF-8 text; export the bundle again.") from None
    except OSError as exc:
        raise unreadable(config_path, exc) from exc
    return _validate_config(raw, folder)


class _Checker:
    """Raises SAMMed3DError naming where a bad value came from and what to do about it."""

    def __init__(self, where: Union[Path, str], advice: str = "Fix config.json or export the bundle again.") -> None:
        self.where = where
        self.advice = advice

    def fail(self, message: str) -> SAMMed3DError:
        return SAMMed3DError(f"{self.where}: {message}. {self.advice}")

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise self.fail(message)

    def field(self, obj: Mapping, key: str, kind: Any, where: str, *, default: Any = ..., kind_name: str = "") -> Any:
        if key not in obj:
            if default is ...:
                raise self.fail(f"'{where}{key}' is missing")
            return copy.deepcopy(default)
        value = obj[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
        self.require(ok, f"'{where}{key}' must be {kind_name or _kind_name(kind)}, not {_json_type(value)}")
        return value


def _kind_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
             (int, float): "a number", float: "a number"}
    return names.get(kind, str(kind))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _validate_config(raw: Any, folder: Path) -> dict:
    c = _Checker(folder / CONFIG_NAME)
    c.require(isinstance(raw, dict), f"the top level must be a JSON object, not {_json_type(raw)}")
    fmt = raw.get("format")
    c.require(fmt == BUNDLE_FORMAT, f"'format' is {fmt!r}, expected {BUNDLE_FORMAT!r}: this is not a SAM-Med3D-MoE bundle")
    version = c.field(raw, "format_version", int, "")
    if version > BUNDLE_FORMAT_VERSION:
        raise SAMMed3DError(
            f"{c.where}: the bundle was made by a newer version of SAM-Med3D-MoE (format_version {version}; "
            f"this version reads up to {BUNDLE_FORMAT_VERSION}). Upgrade SAM-Med3D-MoE to load it."
        )
    c.require(version >= 1, f"'format_version' must be at least 1, not {version}")

    out: Dict[str, Any] = {"format": BUNDLE_FORMAT, "format_version": version}
    files: Dict[str, str] = {}

    base = c.field(raw, "base", dict, "")
    model_config = _validate_model_config(c.field(base, "model_config", dict, "base."), c)
    has_file, has_hub = "file" in base, "hub" in base
    c.require(has_file != has_hub, "'base' must have either 'file' (a safetensors file in the bundle) or 'hub' "
                                   "(a pointer to a checkpoint on the Hugging Face Hub), not " + ("both" if has_file else "neither"))
    if has_file:
        out["base"] = {**_file_entry(base, "base.", c, files), "model_config": model_config}
    else:
        out["base"] = {"hub": _validate_hub_pointer(c.field(base, "hub", dict, "base."), c, "base.hub."),
                       "model_config": model_config}
    # Whether the box-prompt embeddings were trained (the CVPR25 line's were not): untrained ones
    # are never used; a box then becomes a centre click (see SamMed3DMoE.box_prompts_trained).
    box_trained = c.field(base, "box_prompts_trained", bool, "base.", default=False)
    c.require(not box_trained or model_config["box_prompts"],
              "'base.box_prompts_trained' is true but the base model has no box prompts (model_config.box_prompts)")
    out["base"]["box_prompts_trained"] = box_trained

    experts_raw = c.field(raw, "experts", list, "")
    experts = []
    seen: Dict[str, str] = {}
    for index, entry in enumerate(experts_raw):
        where = f"experts[{index}]."
        c.require(isinstance(entry, dict), f"'experts[{index}]' must be an object, not {_json_type(entry)}")
        name = c.field(entry, "name", str, where)
        problem = _expert_name_problem(name)
        c.require(problem is None, f"'{where}name': {problem}")
        c.require(name.lower() not in seen, f"expert names must be unique (case ignored): {name!r} and "
                                            f"{seen.get(name.lower())!r}")
        seen[name.lower()] = name
        targets = c.field(entry, "targets", list, where)
        c.require(all(isinstance(t, str) for t in targets), f"'{where}targets' must be a list of strings")
        experts.append({
            "name": name,
            "targets": list(targets),
            "modality": c.field(entry, "modality", str, where, default="any"),
            "description": c.field(entry, "description", str, where, default=""),
            **_file_entry(entry, where, c, files),
        })
    out["experts"] = experts

    gate = raw.get("gate")
    if gate is None:
        out["gate"] = None
    else:
        c.require(isinstance(gate, dict), f"'gate' must be an object or null, not {_json_type(gate)}")
        gate_config = c.field(gate, "config", dict, "gate.")
        clean = {}
        for key in _GATE_CONFIG_KEYS:
            value = c.field(gate_config, key, int, "gate.config.")
            c.require(value >= (0 if key == "num_experts" else 1), f"'gate.config.{key}' must be positive, not {value}")
            clean[key] = value
        unknown = sorted(set(gate_config) - set(_GATE_CONFIG_KEYS))
        c.require(not unknown, f"'gate.config' has unknown field(s) {unknown}")
        c.require(clean["num_experts"] == len(experts),
                  f"the gate scores {clean['num_experts']} expert(s) but 'experts' lists {len(experts)}")
        c.require(clean["embed_dim"] == model_config["prompt_embed_dim"],
                  f"'gate.config.embed_dim' is {clean['embed_dim']} but the base model's prompt_embed_dim is "
                  f"{model_config['prompt_embed_dim']}")
        out["gate"] = {**_file_entry(gate, "gate.", c, files), "config": clean}

    tau = c.field(raw, "tau", (int, float), "", default=0.5)
    c.require(math.isfinite(tau) and 0.0 <= tau <= 1.0, f"'tau' must be between 0 and 1, not {tau}")
    out["tau"] = float(tau)
    selector = c.field(raw, "selector", str, "", default="paper")
    c.require(selector in SELECTORS, f"'selector' must be one of {', '.join(SELECTORS)}, not {selector!r}")
    out["selector"] = selector
    pre = raw.get("preprocessing")
    out["preprocessing"] = _validate_preprocessing(
        pre if pre is not None else {**DEFAULT_PREPROCESSING, "window": model_config["img_size"]}, c)

    for rel in files:
        path = _bundle_path(folder, rel)
        c.require(path.is_file(), f"lists {rel}, which is missing from the bundle folder (the bundle is incomplete: "
                                  "download or copy it again)")
    return out


def _validate_model_config(raw: Mapping, c: _Checker) -> dict:
    unknown = sorted(set(raw) - set(VIT_B_ORI) - {"box_prompts"})
    c.require(not unknown, f"'base.model_config' has unknown field(s) {unknown}; known: {sorted(VIT_B_ORI)}, box_prompts")
    config: Dict[str, Any] = {}
    for key, default in VIT_B_ORI.items():
        where = "base.model_config."
        if isinstance(default, tuple):
            value = c.field(raw, key, list, where, default=list(default))
            c.require(all(isinstance(v, int) and not isinstance(v, bool) for v in value),
                      f"'{where}{key}' must be a list of integers")
            config[key] = tuple(value)
        elif key == "click_mark_radius":
            value = c.field(raw, key, (int, float), where, default=default)
            c.require(math.isfinite(value) and value >= 0, f"'{where}{key}' must be a number >= 0 (0: off)")
            config[key] = float(value)
        elif isinstance(default, float):
            value = c.field(raw, key, (int, float), where, default=default)
            c.require(math.isfinite(value) and value > 0, f"'{where}{key}' must be a positive number")
            config[key] = float(value)
        else:
            value = c.field(raw, key, int, where, default=default)
            c.require(value > 0, f"'{where}{key}' must be a positive integer, not {value}")
            config[key] = value
    config["box_prompts"] = c.field(raw, "box_prompts", bool, "base.model_config.", default=False)
    return config


def _validate_hub_pointer(raw: Mapping, c: _Checker, where: str) -> dict:
    repo_id = c.field(raw, "repo_id", str, where)
    c.require(is_repo_id(repo_id), f"'{where}repo_id' must look like 'owner/name', not {repo_id!r}")
    filename = c.field(raw, "filename", str, where)
    c.require(bool(filename.strip()) and not filename.startswith("/") and ".." not in PurePosixPath(filename).parts,
              f"'{where}filename' must be a file path inside the Hub repository, not {filename!r}")
    c.require(filename.lower().endswith(CHECKPOINT_SUFFIXES),
              f"'{where}filename' must name a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), not {filename!r}")
    revision = raw.get("revision")
    c.require(revision is None or (isinstance(revision, str) and revision.strip() != ""),
              f"'{where}revision' must be a branch, tag or commit string, or null")
    sha = raw.get("sha256")
    c.require(sha is None or (isinstance(sha, str) and SHA256_RE.fullmatch(sha) is not None),
              f"'{where}sha256' must be 64 lowercase hexadecimal digits or null")
    unknown = sorted(set(raw) - {"repo_id", "filename", "revision", "sha256"})
    c.require(not unknown, f"{repr(where[:-1]) if where else 'the pointer'} has unknown field(s) {unknown}")
    return {"repo_id": repo_id, "filename": filename, "revision": revision, "sha256": sha}


def _validate_preprocessing(raw: Any, c: _Checker) -> dict:
    c.require(isinstance(raw, dict), f"'preprocessing' must be an object, not {_json_type(raw)}")
    out = dict(raw)
    spacing = raw.get("spacing_mm", DEFAULT_PREPROCESSING["spacing_mm"])
    values = spacing if isinstance(spacing, list) else [spacing]
    c.require(len(values) in (1, 3) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) and v > 0 for v in values),
              "'preprocessing.spacing_mm' must be a positive number or a list of 3 positive numbers")
    out["spacing_mm"] = spacing
    window = raw.get("window", DEFAULT_PREPROCESSING["window"])
    c.require(isinstance(window, int) and not isinstance(window, bool) and window > 0,
              "'preprocessing.window' must be a positive integer")
    out["window"] = window
    clamp = raw.get("ct_clamp", DEFAULT_PREPROCESSING["ct_clamp"])
    c.require(clamp is None or (isinstance(clamp, list) and len(clamp) == 2
                                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp)
                                and clamp[0] < clamp[1]),
              "'preprocessing.ct_clamp' must be [low, high] with low < high, or null")
    out["ct_clamp"] = clamp
    normalization = raw.get("normalization", DEFAULT_PREPROCESSING["normalization"])
    c.require(isinstance(normalization, str) and normalization != "", "'preprocessing.normalization' must be a string")
    out["normalization"] = normalization
    return out


def _file_entry(entry: Mapping, where: str, c: _Checker, files: Dict[str, str]) -> dict:
    rel = c.field(entry, "file", str, where)
    c.require(_is_safe_relative(rel), f"'{where}file' must be a relative path inside the bundle folder, not {rel!r}")
    c.require(rel.lower().endswith(SAFETENSORS_SUFFIX), f"'{where}file' must be a .safetensors file, not {rel!r}")
    key = PurePosixPath(rel).as_posix()
    c.require(key.lower() not in {k.lower() for k in files}, f"{key} is listed twice")
    sha = c.field(entry, "sha256", str, where)
    c.require(SHA256_RE.fullmatch(sha) is not None, f"'{where}sha256' must be 64 lowercase hexadecimal digits")
    files[key] = sha
    return {"file": key, "sha256": sha}


def _is_safe_relative(rel: str) -> bool:
    if not rel or "\\" in rel or ":" in rel or rel.startswith("/"):
        return False
    parts = PurePosixPath(rel).parts
    return bool(parts) and all(p not in ("..", ".", "") for p in parts)


def _bundle_path(folder: Path, rel: str) -> Path:
    return folder.joinpath(*PurePosixPath(rel).parts)


def _expert_name_problem(name: str) -> Optional[str]:
    if name in (GENERAL, AUTO) or name.lower() in (GENERAL, AUTO):
        return f"{name!r} is reserved; pick another name"
    if not _EXPERT_NAME_RE.match(name):
        return (f"{name!r} is not a usable expert name: use 1 to 64 letters, digits, '_', '-' or '.', starting "
                "with a letter or digit and not ending with '.'")
    if name.split(".")[0].lower() in _WINDOWS_DEVICE_NAMES:
        return f"{name!r} cannot be a file name on Windows; pick another name"
    return None


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------
def _verify(path: Path, expected: str, what: str) -> None:
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise unreadable(path, exc) from exc
    if actual != expected:
        raise SAMMed3DError(
            f"{what} {path.name} ({path}) has SHA-256 {actual}, but config.json records {expected}: the bundle is "
            "corrupt or was edited after it was exported. Download or copy it again, or export it again."
        )


def _local_entries(config: dict, *, include_base: bool = True) -> List[Tuple[str, str, str]]:
    """(relative file, sha256, description) of every file a config lists."""
    entries = []
    if include_base and "file" in config["base"]:
        entries.append((config["base"]["file"], config["base"]["sha256"], "base model file"))
    for expert in config["experts"]:
        entries.append((expert["file"], expert["sha256"], f"expert '{expert['name']}' file"))
    if config["gate"] is not None:
        entries.append((config["gate"]["file"], config["gate"]["sha256"], "gate file"))
    return entries


# --------------------------------------------------------------------------------------------
# Loading bundles
# --------------------------------------------------------------------------------------------
def load_bundle(folder: PathLike, *, device: Union[str, torch.device, None] = "cpu",
                progress: Optional[Callable[[int, int], None]] = None, cancel: Any = None) -> SamMed3DMoE:
    """A bundle folder as a :class:`SamMed3DMoE` in eval mode on ``device``.

    The config is validated and every file's SHA-256 is checked before anything is loaded. A base
    given as a Hub pointer is downloaded (``progress``/``cancel`` go to the download).
    """
    folder = Path(os.fspath(folder)).expanduser()
    config = read_bundle_config(folder)
    target = select_device(device)
    for rel, sha, what in _local_entries(config):
        _verify(_bundle_path(folder, rel), sha, what)
    base = _load_base(folder, config, progress=progress, cancel=cancel)
    experts, gate, info = _load_experts_and_gate(folder, config)
    moe = SamMed3DMoE(base, experts, gate, info, tau=config["tau"], selector=config["selector"],
                      box_prompts_trained=config["base"]["box_prompts_trained"],
                      preprocessing=config["preprocessing"])
    return moe.to(target).eval()


def _load_base(folder: Path, config: dict, *, progress: Any = None, cancel: Any = None) -> SamMed3D:
    model_config = dict(config["base"]["model_config"])
    box_prompts = model_config.pop("box_prompts")
    if "file" in config["base"]:
        path = _bundle_path(folder, config["base"]["file"])
        state = _read_bundle_tensors(path)
        source = f"{path.name} of bundle {folder}"
    else:
        pointer = config["base"]["hub"]
        from .hub import download_file  # lazily: only bundles that point at the Hub need it

        try:  # download_file checks the pointer's SHA-256
            path = Path(download_file(pointer["repo_id"], pointer["filename"], revision=pointer["revision"],
                                      sha256=pointer["sha256"], progress=progress, cancel=cancel))
        except DownloadError as exc:
            raise DownloadError(f"The base model of bundle {folder} could not be fetched: {exc}") from exc
        state = load_state_dict_file(path)
        source = f"{pointer['repo_id']}/{pointer['filename']} (the base of bundle {folder})"
    size = {k: v for k, v in model_config.items() if VIT_B_ORI.get(k) != v}
    return base_from_state_dict(state, box_prompts=box_prompts, size=size, source=source)


def _read_bundle_tensors(path: Path) -> Dict[str, Tensor]:
    return read_safetensors(path)


def _load_experts_and_gate(folder: Path, config: dict) -> Tuple[Dict[str, MaskDecoder3D], Optional[GatingNetwork],
                                                              Dict[str, ExpertInfo]]:
    model_config = config["base"]["model_config"]
    experts: Dict[str, MaskDecoder3D] = {}
    info: Dict[str, ExpertInfo] = {}
    for entry in config["experts"]:
        decoder = build_mask_decoder(model_config)
        path = _bundle_path(folder, entry["file"])
        load_strict(decoder, _read_bundle_tensors(path), source=f"expert '{entry['name']}' ({entry['file']})",
                     expected="a mask decoder of this bundle's base model", guess=_guess_decoder)
        experts[entry["name"]] = decoder.eval()
        info[entry["name"]] = ExpertInfo(entry["name"], list(entry["targets"]), entry["modality"], entry["description"])
    gate = None
    if config["gate"] is not None:
        gate = GatingNetwork(**config["gate"]["config"])
        path = _bundle_path(folder, config["gate"]["file"])
        load_strict(gate, _read_bundle_tensors(path), source=f"gate ({config['gate']['file']})",
                     expected=f"a gating network with {config['gate']['config']}")
        gate.eval()
    return experts, gate, info


def _guess_decoder(state: Mapping[str, Tensor], decoder: nn.Module) -> str:
    if any(k.startswith(("image_encoder.", "mask_decoder.")) for k in state):
        return ("This file holds a whole model, not a mask decoder: export model.mask_decoder.state_dict() "
                "(with LoRA merged) as the expert.")
    return ""


def load_model(spec_path: PathLike, *, device: Union[str, torch.device, None] = "cpu") -> SamMed3DMoE:
    """A bundle folder (or its config.json) -> :func:`load_bundle`; a ``.pth``/``.pt``/``.ckpt``/
    ``.safetensors`` checkpoint -> the official model wrapped as a :class:`SamMed3DMoE` without
    experts. Catalog names and Hub ids are resolved to a local path by ``hub.resolve_model``."""
    path = Path(os.fspath(spec_path)).expanduser()
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    if path.is_dir():
        return load_bundle(path, device=device)
    if not path.exists():
        raise SAMMed3DError(
            f"Model not found: {path}. Give a bundle folder (with {CONFIG_NAME}) or a checkpoint file "
            f"({', '.join(CHECKPOINT_SUFFIXES)})."
        )
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise SAMMed3DError(
            f"{path.name} is not a model: give a bundle folder (with {CONFIG_NAME}) or a checkpoint file "
            f"({', '.join(CHECKPOINT_SUFFIXES)})."
        )
    target = select_device(device)
    return SamMed3DMoE(load_checkpoint(path)).to(target).eval()


# --------------------------------------------------------------------------------------------
# Writing bundles
# --------------------------------------------------------------------------------------------
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Floating types a bundle's files may be written in (``save_bundle(dtype=...)``)."""


def save_bundle(moe: SamMed3DMoE, folder: PathLike, *, preprocessing: Optional[Mapping[str, Any]] = None,
                base_pointer: Optional[Mapping[str, Any]] = None,
                dtype: Union[str, torch.dtype, None] = None) -> Path:
    """Write ``moe`` as a bundle in ``folder`` (created if needed) and return the folder.

    ``preprocessing``: what the model expects (default :data:`DEFAULT_PREPROCESSING`, window =
    the model's input size). ``base_pointer``: ``{"repo_id", "filename", "revision", "sha256"}``
    of a Hub checkpoint holding exactly ``moe.base``'s weights, written instead of
    ``base.safetensors``. ``dtype``: store every floating-point tensor in this type on disk
    (``"float16"``/``torch.float16`` halves the size; ``"bfloat16"``, ``"float32"``); None keeps
    the model's own types. Loading always converts back into the float32 model. Every file is
    written to a temporary name and renamed into place, config.json last; files of the previous
    bundle that are no longer listed are removed; files whose content did not change are left
    untouched.
    """
    folder = Path(os.fspath(folder)).expanduser()
    cast = _save_dtype(dtype)
    model_config = _jsonable(moe.base.config)
    if base_pointer is None:
        return _write_bundle(folder, moe, base_state=moe.base.state_dict(), model_config=model_config,
                             preprocessing=preprocessing, dtype=cast)
    if not isinstance(base_pointer, Mapping):
        raise SAMMed3DError("base_pointer must be a dict with repo_id, filename, revision and sha256")
    pointer = _validate_hub_pointer(dict(base_pointer), _Checker("base_pointer", "Fix the base pointer."), "")
    return _write_bundle(folder, moe, base_entry={"hub": pointer}, model_config=model_config,
                         preprocessing=preprocessing, dtype=cast)


def _save_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in SAVE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in SAVE_DTYPES:
        return SAVE_DTYPES[dtype.strip().lower()]
    raise SAMMed3DError(f"cannot store a bundle as {dtype!r}: use one of {', '.join(SAVE_DTYPES)} (or None to keep "
                        "the model's own types)")


def _cast_state(state: Mapping[str, Tensor], dtype: Optional[torch.dtype]) -> Mapping[str, Tensor]:
    """``state`` with its floating-point tensors in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return state
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def _write_bundle(folder: Path, moe: SamMed3DMoE, *, model_config: dict, preprocessing: Optional[Mapping[str, Any]],
                  base_state: Optional[Mapping[str, Tensor]] = None, base_entry: Optional[dict] = None,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Write a bundle: ``base_state`` is written to base.safetensors, or ``base_entry`` (a Hub
    pointer, or the existing base file kept as it is) goes into config.json unchanged.
    ``dtype``: the floating type of the written files (None: the tensors' own)."""
    pre = dict(preprocessing) if preprocessing is not None else dict(moe.preprocessing)
    pre = _validate_preprocessing(pre, _Checker("preprocessing", "Fix the preprocessing settings."))
    for name in moe.expert_names:
        problem = _expert_name_problem(name)
        if problem is not None:
            raise SAMMed3DError(f"cannot save expert {name!r}: {problem}")
    lowered = [n.lower() for n in moe.expert_names]
    if len(set(lowered)) != len(lowered):
        raise SAMMed3DError(f"expert names differ only in case ({', '.join(moe.expert_names)}); they would share a "
                            "file on Windows and macOS: rename one")

    folder.mkdir(parents=True, exist_ok=True)
    old_files = _listed_files(folder)

    to_write: Dict[str, Mapping[str, Tensor]] = {}
    if base_state is not None:
        to_write[BASE_FILE] = base_state
        base_entry = {"file": BASE_FILE, "sha256": None}
    elif base_entry is None:
        raise ValueError("_write_bundle needs base_state or base_entry")
    base_entry = {**{k: v for k, v in base_entry.items() if k not in ("model_config", "box_prompts_trained")},
                  "model_config": model_config, "box_prompts_trained": bool(moe.box_prompts_trained)}
    expert_entries = []
    for name, decoder in moe.experts.items():
        info = moe.expert_info.get(name) or ExpertInfo(name)
        rel = f"{EXPERTS_DIR}/{name}{SAFETENSORS_SUFFIX}"
        to_write[rel] = decoder.state_dict()
        expert_entries.append({"name": name, "targets": [str(t) for t in info.targets], "modality": str(info.modality),
                               "description": str(info.description), "file": rel, "sha256": None})
    gate_entry = None
    if moe.gate is not None:
        to_write[GATE_FILE] = moe.gate.state_dict()
        gate_entry = {"file": GATE_FILE, "sha256": None, "config": moe.gate.config()}

    digests = _write_tensor_files(folder, {rel: _cast_state(state, dtype) for rel, state in to_write.items()})
    if "file" in base_entry and base_entry["file"] in digests:
        base_entry["sha256"] = digests[base_entry["file"]]
    for entry in expert_entries:
        entry["sha256"] = digests[entry["file"]]
    if gate_entry is not None:
        gate_entry["sha256"] = digests[GATE_FILE]

    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "base": base_entry,
        "experts": expert_entries,
        "gate": gate_entry,
        "tau": float(moe.tau),
        "selector": moe.selector,
        "preprocessing": _jsonable(pre),
    }
    _validate_config(json.loads(json.dumps(config)), folder)  # what we write must read back
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    keep = {e[0].lower() for e in _local_entries(config)}
    for rel in old_files:
        if rel.lower() not in keep:
            try:
                _bundle_path(folder, rel).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SAMMed3DError(f"the bundle was saved, but its old file {rel} could not be removed "
                                    f"({exc.strerror or exc}); delete it by hand") from exc
    experts_dir = folder / EXPERTS_DIR
    if experts_dir.is_dir() and not any(experts_dir.iterdir()):
        experts_dir.rmdir()
    return folder


def _listed_files(folder: Path) -> List[str]:
    """Files listed by the config.json already in ``folder`` (leniently: only safe paths)."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        return []
    entries = [raw.get("base"), raw.get("gate")]
    if isinstance(raw.get("experts"), list):
        entries += raw["experts"]
    listed = []
    for entry in entries:
        rel = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(rel, str) and _is_safe_relative(rel) and rel.lower().endswith(SAFETENSORS_SUFFIX):
            listed.append(rel)
    return listed


def _tensors_for_safetensors(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared tensors)."""
    out: Dict[str, Tensor] = {}
    seen = set()
    for name, tensor in state.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size()
        if storage.data_ptr() in seen or not whole:
            t = t.clone()
            storage = t.untyped_storage()
        if t.numel():
            seen.add(storage.data_ptr())
        out[name] = t
    return out


def _write_tensor_files(folder: Path, files: Mapping[str, Mapping[str, Tensor]]) -> Dict[str, str]:
    """Write each {relative path: state dict} to a temporary file, then rename them all into
    place (unchanged files are left alone). Returns {relative path: sha256}."""
    from safetensors.torch import save_file

    digests: Dict[str, str] = {}
    pending: List[Tuple[Path, Path]] = []
    try:
        for rel, state in files.items():
            target = _bundle_path(folder, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(target)
            pending.append((tmp, target))
            save_file(_tensors_for_safetensors(state), os.fspath(tmp), metadata={"format": "pt"})
            fsync(tmp)
            digests[rel] = file_sha256(tmp)
            if target.is_file() and target.stat().st_size == tmp.stat().st_size and file_sha256(target) == digests[rel]:
                tmp.unlink()
                pending.pop()
        for tmp, target in pending:
            os.replace(tmp, target)
        pending = []
    except OSError as exc:
        raise SAMMed3DError(f"could not write the bundle in {folder}: {exc.strerror or exc}. "
                            "Check the free disk space and the folder's permissions.") from exc
    finally:
        for tmp, _ in pending:
            try:
                tmp.unlink()
            except OSError:
                pass
    return digests


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively (JSON has no tuples; load converts them back)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Editing bundles
# --------------------------------------------------------------------------------------------
def convert_checkpoint(pth_path: PathLike, folder: PathLike, *, box_prompts: Optional[bool] = None,
                       preprocessing: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
                       **size: Any) -> Path:
    """An official checkpoint -> a bundle with the base model only (no experts, no gate).

    Refuses to replace an existing bundle in ``folder`` (its experts would be lost) unless
    ``overwrite``."""
    folder = Path(os.fspath(folder)).expanduser()
    if (folder / CONFIG_NAME).exists() and not overwrite:
        raise SAMMed3DError(
            f"{folder} already holds a bundle; converting into it would replace it and drop its experts. "
            "Choose an empty folder, or pass overwrite=True (--overwrite) to replace it."
        )
    base = load_checkpoint(pth_path, box_prompts=box_prompts, **size)
    return save_bundle(SamMed3DMoE(base), folder, preprocessing=preprocessing)


def add_expert_to_bundle(folder: PathLike, name: str, decoder_state_or_file: Any, *, targets: Iterable[str],
                         modality: str, description: str = "") -> Path:
    """Add an expert decoder to a bundle on disk and return the folder.

    ``decoder_state_or_file``: a ``MaskDecoder3D`` state dict (LoRA merged), a ``MaskDecoder3D``,
    or a .safetensors/.pth file holding its state dict. The gate, if any, gets an output that
    never selects the new expert until the gate is retrained, so old results do not change.
    The base model file is neither read nor rewritten.
    """
    folder = Path(os.fspath(folder)).expanduser()
    config = read_bundle_config(folder)
    if not isinstance(name, str):
        raise SAMMed3DError(f"the expert name must be a string, not {type(name).__name__}")
    problem = _expert_name_problem(name)
    if problem is not None:
        raise SAMMed3DError(f"cannot add expert: {problem}")
    existing = [e["name"] for e in config["experts"]]
    if name.lower() in (n.lower() for n in existing):
        raise SAMMed3DError(f"the bundle already has an expert named {name!r} (names are compared ignoring case); "
                            "remove it first or pick another name")
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not all(isinstance(t, str) for t in targets):
        raise SAMMed3DError("expert targets must be strings (class names such as 'liver')")
    if not isinstance(modality, str) or not isinstance(description, str):
        raise SAMMed3DError("the expert's modality and description must be strings")

    if isinstance(decoder_state_or_file, nn.Module):
        state, source = decoder_state_or_file.state_dict(), f"the decoder given for expert {name!r}"
    elif isinstance(decoder_state_or_file, Mapping):
        state, source = dict(decoder_state_or_file), f"the state dict given for expert {name!r}"
        if not all_tensors(state):
            raise SAMMed3DError(f"{source} is not a state dict (names to tensors)")
    elif isinstance(decoder_state_or_file, (str, os.PathLike)):
        state = load_state_dict_file(decoder_state_or_file)
        source = Path(os.fspath(decoder_state_or_file)).name
    else:
        raise SAMMed3DError("the expert must be a mask decoder state dict, a MaskDecoder3D, or a "
                            f".safetensors/.pth file, not {type(decoder_state_or_file).__name__}")
    decoder = build_mask_decoder(config["base"]["model_config"])
    load_strict(decoder, state, source=source, expected="a mask decoder of this bundle's base model",
                 guess=_guess_decoder)

    moe = _bundle_without_base_weights(folder, config)
    moe.add_expert(name, decoder.eval(), ExpertInfo(name, targets, modality, description))
    return _write_bundle(folder, moe, base_entry=config["base"],
                         model_config=_jsonable(config["base"]["model_config"]), preprocessing=config["preprocessing"])


def remove_expert_from_bundle(folder: PathLike, name: str) -> Path:
    """Remove an expert (its file and its gate output) from a bundle on disk; return the folder.
    The other experts' gate logits are kept, and the base model file is left as it is."""
    folder = Path(os.fspath(folder)).expanduser()
    config = read_bundle_config(folder)
    moe = _bundle_without_base_weights(folder, config)
    moe.remove_expert(name)
    return _write_bundle(folder, moe, base_entry=config["base"],
                         model_config=_jsonable(config["base"]["model_config"]), preprocessing=config["preprocessing"])


def _bundle_without_base_weights(folder: Path, config: dict) -> SamMed3DMoE:
    """The bundle's experts and gate (checksums verified) around a weightless base on the
    meta device: enough to edit the expert list without reading or downloading the base."""
    for rel, sha, what in _local_entries(config, include_base=False):
        _verify(_bundle_path(folder, rel), sha, what)
    model_config = dict(config["base"]["model_config"])
    box_prompts = model_config.pop("box_prompts")
    with torch.device("meta"):
        base = build_sam_med3d(box_prompts=box_prompts, **model_config)
    experts, gate, info = _load_experts_and_gate(folder, config)
    return SamMed3DMoE(base, experts, gate, info, tau=config["tau"], selector=config["selector"],
                       box_prompts_trained=config["base"]["box_prompts_trained"])
