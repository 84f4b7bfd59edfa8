"""The normative weight formula of ``Testing/Data/reference/README.md`` and helpers to load the
reference outputs; used by the parity tests and the encoder benchmark."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "Data" / "reference"
REFERENCE_SEED = 20261123


def reference_tensor(name: str, shape) -> np.ndarray:
    """The reference README's formula for the state-dict entry ``name``."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(name.encode("utf-8"))))
    z = rng.standard_normal(shape)
    if name.endswith("positional_encoding_gaussian_matrix"):
        return z
    if name.endswith(".bias"):
        return 0.02 * z
    if len(shape) == 1:
        return 1.0 + 0.1 * z
    if any(t in name for t in ("pos_embed", "rel_pos", "embed.weight", "embeddings.", "token")):
        return 0.02 * z
    return z / np.sqrt(np.prod(shape[1:]))


def reference_state_dict(box_prompts: bool = True, dtype=torch.float64) -> dict:
    """Every entry of the official key list, filled by the formula."""
    keys = json.loads((REFERENCE_DIR / keys_file(box_prompts)).read_text())["keys"]
    return {name: torch.from_numpy(reference_tensor(name, tuple(shape))).to(dtype) for name, shape in keys.items()}


def keys_file(box_prompts: bool) -> str:
    return "sammed3d_vit_b_ori_box_keys.json" if box_prompts else "sammed3d_vit_b_ori_keys.json"


def reference_input(dtype=torch.float64) -> torch.Tensor:
    vol = np.random.Generator(np.random.PCG64(REFERENCE_SEED)).standard_normal((1, 1, 128, 128, 128))
    return torch.from_numpy(vol).to(dtype)


def reference_outputs() -> dict:
    with np.load(REFERENCE_DIR / "sammed3d_reference_outputs.npz") as data:
        return {k: data[k] for k in data.files}


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts hold the same names and values (``b`` cast to ``a``'s dtypes)."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key].to(a[key].dtype)), key
