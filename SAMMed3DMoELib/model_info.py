"""What a checkpoint or a bundle holds: architecture, parameters, experts, checksums (for ``info`` and model managers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .catalog import load_catalog


def _meta_parameter_count(module_factory) -> int:
    import torch

    with torch.device("meta"):
        module = module_factory()
    return int(sum(p.numel() for p in module.parameters()))


def _architecture(model_config: dict) -> Tuple[str, bool]:
    from .model import VIT_B_ORI

    diffs = {k: model_config[k] for k in VIT_B_ORI if _as_tuple(model_config.get(k)) != _as_tuple(VIT_B_ORI[k])}
    if not diffs:
        return "SAM-Med3D ViT-B 'ori' (the official size)", True
    shown = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in diffs.items())
    return f"SAM-Med3D of a custom size ({shown})", False


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _catalog_matches(sha256: str, filename: str, catalog: Optional[dict]) -> Tuple[Optional[str], Optional[str]]:
    """(catalog name whose checksum matches, catalog name with the same file name but another checksum)."""
    entries = load_catalog() if catalog is None else catalog
    match = next((e.name for e in entries.values() if e.sha256 == sha256), None)
    other = next((e.name for e in entries.values() if e.filename and Path(e.filename).name == filename
                  and e.sha256 and e.sha256 != sha256), None)
    return match, other


def bundle_info(folder: Path) -> dict:
    """What a bundle folder holds (architecture, experts, gate, preprocessing), every file's checksum checked."""
    from . import hub
    from .bundle import read_bundle_config
    from .files import file_sha256
    from .model import GatingNetwork, build_mask_decoder, build_sam_med3d

    config = read_bundle_config(folder)
    model_config = dict(config["base"]["model_config"])
    box_prompts = bool(model_config.pop("box_prompts"))
    architecture, official = _architecture(model_config)
    files = []

    def check(rel: str, expected: str, what: str) -> bool:
        actual = file_sha256(folder.joinpath(*rel.split("/")))
        files.append({"file": rel, "what": what, "sha256": actual, "expected_sha256": expected,
                      "verified": actual == expected})
        return actual == expected

    base_entry: Dict[str, Any]
    if "file" in config["base"]:
        check(config["base"]["file"], config["base"]["sha256"], "base model")
        base_entry = {"file": config["base"]["file"]}
    else:
        pointer = config["base"]["hub"]
        cached = hub.cached_file(pointer["repo_id"], pointer["filename"], revision=pointer["revision"])
        base_entry = {"hub": pointer, "cached_path": str(cached) if cached else None}
        if cached is not None and pointer["sha256"]:
            actual = file_sha256(cached)
            files.append({"file": f"{pointer['repo_id']}/{pointer['filename']}", "what": "base model (Hub)",
                          "sha256": actual, "expected_sha256": pointer["sha256"],
                          "verified": actual == pointer["sha256"]})
    base_params = _meta_parameter_count(lambda: build_sam_med3d(box_prompts=box_prompts, **model_config))
    decoder_params = _meta_parameter_count(lambda: build_mask_decoder(config["base"]["model_config"]))
    experts = []
    for e in config["experts"]:
        ok = check(e["file"], e["sha256"], f"expert '{e['name']}'")
        experts.append({"name": e["name"], "targets": e["targets"], "modality": e["modality"],
                        "description": e["description"], "file": e["file"], "parameters": decoder_params,
                        "sha256_verified": ok})
    gate = None
    gate_params = 0
    if config["gate"] is not None:
        ok = check(config["gate"]["file"], config["gate"]["sha256"], "gate")
        gate_params = _meta_parameter_count(lambda: GatingNetwork(**config["gate"]["config"]))
        gate = {"config": config["gate"]["config"], "file": config["gate"]["file"], "parameters": gate_params,
                "sha256_verified": ok}
    verified = all(f["verified"] for f in files) if files else None
    return {
        "kind": "bundle",
        "path": str(folder),
        "format_version": config["format_version"],
        "architecture": architecture,
        "official_architecture": official,
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_config.items()},
        "box_prompts": box_prompts,
        "base": base_entry,
        "parameters": {"base": base_params, "experts": decoder_params * len(experts), "gate": gate_params,
                       "total": base_params + decoder_params * len(experts) + gate_params},
        "experts": experts,
        "gate": gate,
        "tau": config["tau"],
        "selector": config["selector"],
        "preprocessing": config["preprocessing"],
        "files": files,
        "sha256_verified": verified,
        "sha256_note": ("every file matches the SHA-256 recorded in config.json" if verified
                        else "NOT verified: at least one file differs from config.json" if verified is False
                        else "nothing to verify locally (the base is on the Hub and not downloaded yet)"),
    }


def checkpoint_info(path: Path, catalog: Optional[dict] = None) -> dict:
    """What a checkpoint file holds, whether it loads, and whether its checksum is a published one."""
    import torch

    from .checkpoint import BOX_KEY, load_state_dict_file
    from .files import file_sha256
    from .model import build_sam_med3d
    from .moe import DEFAULT_PREPROCESSING

    state = load_state_dict_file(path)
    sha = file_sha256(path)
    box_prompts = BOX_KEY in state
    with torch.device("meta"):
        official_model = build_sam_med3d(box_prompts=box_prompts)
    reference = official_model.state_dict()
    buffers = {name for name, _ in official_model.named_buffers()}
    # Learnable parameters: every stored tensor except the fixed buffers (the prompt encoder's
    # random Fourier-feature matrix), as model.parameters() would count them.
    parameters = int(sum(t.numel() for k, t in state.items() if k not in buffers))
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    mismatched = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    official = not (missing or unexpected or mismatched)
    if official:
        architecture = "SAM-Med3D ViT-B 'ori' (the official size)"
        problem = None
    else:
        problem = (f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mis-shaped "
                   "tensor(s) compared with the official architecture")
        pos = state.get("image_encoder.pos_embed")
        if not any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in state):
            architecture = "not SAM-Med3D (another architecture)"
        elif pos is not None and pos.dim() == 4:
            architecture = "a 2D SAM checkpoint (SAM, MedSAM or SAM-Med2D), not SAM-Med3D"
        elif pos is not None and tuple(pos.shape) != tuple(reference["image_encoder.pos_embed"].shape):
            architecture = f"SAM-Med3D of another size (position embedding {list(pos.shape)})"
        else:
            architecture = "SAM-Med3D-like, but not the official architecture"
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    match, other = _catalog_matches(sha, path.name, catalog)
    if match:
        note = f"matches the published checksum of catalog model '{match}'"
    elif other:
        note = (f"DIFFERS from the published checksum of catalog model '{other}' (same file name): not the "
                "published file")
    else:
        note = "no published checksum known for this file: not verified"
    return {
        "kind": "checkpoint",
        "path": str(path),
        "file_size": path.stat().st_size,
        "architecture": architecture,
        "official_architecture": official,
        "loadable": official,
        "problem": problem,
        "box_prompts": box_prompts,
        "tensors": len(state),
        "dtypes": dtypes,
        "parameters": {"base": parameters, "experts": 0, "gate": 0, "total": parameters},
        "experts": [],
        "gate": None,
        "tau": None,
        "selector": None,
        "preprocessing": dict(DEFAULT_PREPROCESSING),
        "sha256": sha,
        "sha256_verified": bool(match),
        "sha256_note": note,
        "catalog_match": match,
    }

