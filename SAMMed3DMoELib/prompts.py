"""Prompts as the user gives them: points and boxes in RAS millimetres, checked once, here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .errors import SAMMed3DError


@dataclass(frozen=True)
class Point:
    """A click in RAS mm; ``positive`` False for a background click."""

    ras: Tuple[float, float, float]
    positive: bool = True


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in RAS mm, given by two opposite corners."""

    ras_min: Tuple[float, float, float]
    ras_max: Tuple[float, float, float]


def as_xyz(values, what: str) -> np.ndarray:
    """Three finite coordinates, or a SAMMed3DError saying what was given."""
    try:
        xyz = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        xyz = np.array([])
    if xyz.size != 3 or not np.all(np.isfinite(xyz)):
        raise SAMMed3DError(f"{what} needs three finite coordinates (R, A, S in mm), got {values!r}")
    return xyz
