"""Shared fixtures: the repository's sample scans and parity references, and the full-size
reference model. A missing fixture is a failure, never a skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTING_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING_DIR))  # reference_weights, hub_server, ...

from hub_server import hub_server  # noqa: E402,F401  (the fixture, for every test file here)

REPO_DIR = TESTING_DIR.parent
DATA_DIR = REPO_DIR / "Resources" / "SampleData" / "totalsegmentator-example"


def require_fixture(path: Path) -> Path:
    """``path``, or a test failure naming it (fixtures ship with the repository)."""
    if not path.exists():
        pytest.fail(f"test fixture missing: {path}; it is part of the repository (restore it with git)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real example scans (Resources/SampleData, read them only)."""
    return require_fixture(DATA_DIR)


@pytest.fixture(scope="session")
def reference_model_f64():
    """The full-size box-prompt model in float64 with the reference README's weights."""
    import torch

    from reference_weights import REFERENCE_DIR, reference_state_dict
    from SAMMed3DMoELib.model import build_sam_med3d

    require_fixture(REFERENCE_DIR)
    model = build_sam_med3d(box_prompts=True).to(torch.float64)
    model.load_state_dict(reference_state_dict(box_prompts=True), strict=True)
    return model
