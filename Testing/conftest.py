"""Shared fixtures: where the read-only shared material lives, and the full-size reference model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTING_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING_DIR))  # reference_weights, hub_server, ...

SHARED_DIR = TESTING_DIR.parents[1] / "shared"
DATA_DIR = SHARED_DIR / "data" / "totalsegmentator-example"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real example scans (read-only)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared example data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def reference_model_f64():
    """The full-size box-prompt model in float64 with the reference README's weights."""
    import torch

    from reference_weights import REFERENCE_DIR, reference_state_dict
    from SAMMed3DMoELib.model import build_sam_med3d

    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"shared reference outputs not found at {REFERENCE_DIR}")
    model = build_sam_med3d(box_prompts=True).to(torch.float64)
    model.load_state_dict(reference_state_dict(box_prompts=True), strict=True)
    return model
