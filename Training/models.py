"""Models for training: size presets, where a run's starting weights come from, and bundles.

Starting points (``--init``): nothing (random weights of ``--model-size``), a bundle folder, an
official ``.pth``/``.safetensors`` checkpoint, or a training checkpoint of ``pretrain``
(``latest.pt``/``best.pt``). Everything is read with ``weights_only=True`` or from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from SAMMed3DMoELib import bundle
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.model import VIT_B_ORI, SamMed3D, build_sam_med3d
from SAMMed3DMoELib.moe import SamMed3DMoE

from . import checkpoints
from .data import Preprocessing

MODEL_SIZES: Dict[str, Dict[str, Any]] = {
    # 32³ windows, 2³ tokens: the test model (seconds per dozen steps on a CPU core).
    "tiny": dict(img_size=32, patch_size=16, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=4,
                 encoder_global_attn_indexes=(1,), window_size=2, prompt_embed_dim=48, decoder_mlp_dim=64,
                 iou_head_hidden_dim=32, decoder_heads=4),
    # 64³ windows, 4³ tokens of 16³ voxels, a 96-wide decoder: trains on 2 CPU cores within minutes.
    "small": dict(img_size=64, patch_size=16, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6,
                  encoder_global_attn_indexes=(1, 3), window_size=4, prompt_embed_dim=96, decoder_mlp_dim=384,
                  iou_head_hidden_dim=64, decoder_heads=4),
    # "small" with 8³-voxel patches: 8³ tokens and 32³ low-res masks (6 mm at 3 mm spacing, where
    # "small" has 16³ of 12 mm, too coarse for vessels and the spinal cord); 2.7 M parameters,
    # about 1 s per step of 4 samples on 2 CPU cores. The demo model's size.
    "small8": dict(img_size=64, patch_size=8, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6,
                   encoder_global_attn_indexes=(1, 3), window_size=4, prompt_embed_dim=96, decoder_mlp_dim=384,
                   iou_head_hidden_dim=64, decoder_heads=4),
    # SAM-Med3D's ViT-B ("ori"), 128³ windows: the architecture of the official checkpoints.
    "base": {},
}


def model_size(spec: str) -> Dict[str, Any]:
    """A preset name or a JSON object of ``build_sam_med3d`` size keywords (over ViT-B)."""
    spec = str(spec).strip()
    if spec in MODEL_SIZES:
        return dict(MODEL_SIZES[spec])
    try:
        size = json.loads(spec)
    except json.JSONDecodeError:
        raise SAMMed3DError(f"--model-size must be one of {', '.join(MODEL_SIZES)} or a JSON object of size keywords "
                            f"({', '.join(sorted(VIT_B_ORI))}), not {spec!r}") from None
    if not isinstance(size, dict):
        raise SAMMed3DError("--model-size JSON must be an object, e.g. {\"img_size\": 64, \"encoder_depth\": 4}")
    return size


def new_model(size: Dict[str, Any], box_prompts: bool, seed: int) -> SamMed3D:
    torch.manual_seed(seed)
    try:
        return build_sam_med3d(box_prompts=box_prompts, **size)
    except (TypeError, ValueError) as exc:
        raise SAMMed3DError(f"cannot build that model size: {exc}") from None


def _base_from_state(state: Dict[str, torch.Tensor], config: Dict[str, Any]) -> SamMed3D:
    config = dict(config)
    box = bool(config.pop("box_prompts", False))
    model = build_sam_med3d(box_prompts=box, **config)
    model.load_state_dict(state, strict=True)
    return model


def load_start(init: Optional[str], size: Dict[str, Any], box_prompts: bool, seed: int
               ) -> Tuple[SamMed3D, Optional[Preprocessing], str, bool]:
    """The model a run starts from, the preprocessing it was trained with (None: unknown), a
    description of where it came from, and whether its box-prompt embeddings were trained."""
    if not init:
        return new_model(size, box_prompts, seed), None, f"random weights (seed {seed})", False
    path = Path(init).expanduser()
    if path.is_dir():
        moe = bundle.load_bundle(path, device="cpu")
        return moe.base, Preprocessing.from_bundle(moe.preprocessing), f"bundle {path}", moe.box_prompts_trained
    if path.suffix == ".pt" and path.is_file():
        try:
            ck = checkpoints.load_checkpoint(path)
        except SAMMed3DError:
            ck = None
        if ck is not None:
            if ck.get("task") != "pretrain":
                raise SAMMed3DError(f"{path} is a {ck.get('task')} checkpoint; --init takes a pretrain checkpoint, "
                                    "a bundle or an official checkpoint")
            extra = ck["options"]
            pre = Preprocessing.from_bundle(extra["preprocessing"])
            model = _base_from_state(ck["model"], extra["model_config"])
            return model, pre, f"pretrain checkpoint {path}", bool(extra.get("box_prompts_trained")) and model.box_prompts
    if not path.exists():
        raise SAMMed3DError(f"--init {init}: no such file or folder")
    model = bundle.load_model(path, device="cpu").base
    return model, None, f"checkpoint {path}", False  # official training fed no boxes (see SamMed3DMoE)


def export_bundle(base: SamMed3D, folder: Path, pre: Preprocessing, provenance: Dict[str, Any],
                  box_prompts_trained: bool = False) -> Path:
    """Write ``base`` as a bundle (no experts yet) plus ``training/pretrain.json`` (how it was made);
    ``box_prompts_trained`` says whether its box-prompt embeddings were trained (the session
    uses boxes only then)."""
    folder = Path(folder).expanduser()
    if (folder / bundle.CONFIG_NAME).exists():
        existing = bundle.read_bundle_config(folder)
        if existing["experts"]:
            raise SAMMed3DError(f"{folder} already holds a bundle with experts; exporting the base there would drop them. "
                                "Choose another --export folder")
    bundle.save_bundle(SamMed3DMoE(base.eval(), box_prompts_trained=box_prompts_trained), folder,
                       preprocessing=pre.as_bundle())
    write_provenance(folder, "pretrain", provenance)
    return folder


def write_provenance(folder: Path, name: str, info: Dict[str, Any]) -> Path:
    """``<bundle>/training/<name>.json``: the options and results of the run that made a part
    (not listed in config.json, so bundle tools leave it alone)."""
    path = Path(folder) / "training" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
    return path
