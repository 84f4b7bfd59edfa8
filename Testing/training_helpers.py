"""Shared set-up of the training tests: the sample scans as nnU-Net datasets (converted once per
test session), small random bundles, and reading a run's log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from SAMMed3DMoELib import bundle
from SAMMed3DMoELib.moe import ExpertInfo, SamMed3DMoE

TINY_RUN = ["--num-workers", "0", "--log-every", "1", "--threads", "1", "--save-every", "1000"]
"""Options every test run shares (tiny 32³ windows at the scans' own 3 mm)."""


def converted_datasets(base: Path, data_dir: Path) -> Dict[str, Path]:
    """The sample scans in the nnU-Net layout under ``base`` (converted on first use)."""
    from Training.convert_samples import SAMPLES, convert

    folder = base / "nnunet"
    if not all((folder / name / "dataset.json").exists() for name in SAMPLES):
        convert(folder, data_dir)
    return {name: folder / name for name in SAMPLES}


def tiny_bundle(folder: Path, experts: Dict[str, Tuple[Sequence[str], str]] = (), seed: int = 0,
                spacing: float = 3.0) -> Path:
    """A bundle with a random tiny base (Training's "tiny" size) and experts that start as copies
    of its decoder: ``{name: (target classes, modality)}``."""
    from Training.data import Preprocessing
    from Training.models import MODEL_SIZES, new_model

    base = new_model(MODEL_SIZES["tiny"], box_prompts=True, seed=seed)
    decoders = {name: base.new_mask_decoder() for name in dict(experts)}
    for decoder in decoders.values():
        decoder.load_state_dict(base.mask_decoder.state_dict())
    info = {name: ExpertInfo(name, list(t), m) for name, (t, m) in dict(experts).items()}
    moe = SamMed3DMoE(base, decoders, None, info)
    pre = Preprocessing(spacing, base.img_size).as_bundle()
    return bundle.save_bundle(moe, folder, preprocessing=pre)


def train_losses(out: Path) -> List[float]:
    """The per-step training losses a run logged (log.jsonl), in step order."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])]


def checkpoint_model(out: Path, name: str = "latest.pt") -> Dict[str, torch.Tensor]:
    """The trainable state saved in a run's checkpoint (read with weights_only=True)."""
    return torch.load(out / name, map_location="cpu", weights_only=True)["model"]
