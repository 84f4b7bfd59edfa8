"""Where the repository's sample scans live (``Resources/SampleData``), for the demo, the worked
training examples and the tests."""

from __future__ import annotations

from pathlib import Path

from .errors import SAMMed3DError

SAMPLE_DATA_DIR = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "totalsegmentator-example"
"""The TotalSegmentator example scans (Apache-2.0; see ``Resources/SampleData/README.md``)."""


def sample_file(name: str, folder: Path = SAMPLE_DATA_DIR) -> Path:
    """``folder / name``, or a SAMMed3DError saying where the sample data should be."""
    path = Path(folder).expanduser() / name
    if not path.exists():
        raise SAMMed3DError(
            f"the sample data file {path} was not found; it ships with the repository "
            f"(Resources/SampleData/totalsegmentator-example): run from a clone of the repository, or pass "
            "the folder that holds the TotalSegmentator example scans (--data)"
        )
    return path
