"""Prompts as the user gives them: points and boxes in RAS millimetres, checked once, here.

The rules for what a prompt may be live in this module only; the session, the command line and
the Slicer module call them:

* a point must lie on the volume: its voxel index within ``[-0.5, n - 0.5]`` on every axis
  (the outer faces of the edge voxels), :func:`point_on_volume` and :func:`ijk_on_volume`;
* a box must be at least one voxel thick along R, A and S (the smallest voxel spacing of the
  volume), :func:`box_from_corners`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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

    @property
    def centre(self) -> np.ndarray:
        return (np.asarray(self.ras_min) + np.asarray(self.ras_max)) / 2.0

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) in RAS mm (on an oblique grid two opposite corners are not the
        extremes, so code that maps a box to voxels uses all 8)."""
        lo, hi = self.ras_min, self.ras_max
        return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def as_xyz(values, what: str) -> np.ndarray:
    """Three finite coordinates, or a SAMMed3DError saying what was given."""
    try:
        xyz = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        xyz = np.array([])
    if xyz.size != 3 or not np.all(np.isfinite(xyz)):
        raise SAMMed3DError(f"{what} needs three finite coordinates (R, A, S in mm), got {values!r}")
    return xyz


def volume_extent_text(volume) -> str:
    """The RAS extent of a volume's voxels (outer faces), e.g. ``R -179.5..186.5, A ...`` mm."""
    n = np.asarray(volume.shape, dtype=float)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    ras = volume.ijk_to_ras(corners)
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("RAS", lo, hi)) + " mm"


def _inside(ijk: np.ndarray, shape) -> bool:
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(shape) - 0.5))


def point_on_volume(volume, ras, what: Optional[str] = None, hint: str = "") -> np.ndarray:
    """The fractional voxel index (3,) of a RAS point (mm) that lies on ``volume``; a point off
    the volume raises a SAMMed3DError starting with ``what`` (default: the point and its
    coordinates), naming the volume's extent, ending with ``hint``."""
    ras = as_xyz(ras, what or "the point")
    what = what or f"the point {np.round(ras, 1).tolist()} (RAS mm)"
    ijk = volume.ras_to_ijk(ras.reshape(1, 3))[0]
    if not _inside(ijk, volume.shape):
        raise SAMMed3DError(
            f"{what} lies outside the image, which spans "
            f"{volume_extent_text(volume)}; check the signs (RAS, not the LPS of ITK/DICOM: negate the first "
            f"two){hint}"
        )
    return ijk


def ijk_on_volume(volume, ijk, what: str = "the voxel index") -> np.ndarray:
    """The RAS point (3,) of a voxel index (fractional allowed) that lies on ``volume``."""
    ijk = np.asarray(ijk, dtype=float).reshape(-1)
    if ijk.size != 3 or not np.all(np.isfinite(ijk)):
        raise SAMMed3DError(f"{what} needs three finite voxel indices (i, j, k)")
    if not _inside(ijk, volume.shape):
        n = volume.shape
        raise SAMMed3DError(
            f"{what} lies outside the image: voxel indices must lie within 0..{n[0] - 1}, 0..{n[1] - 1}, "
            f"0..{n[2] - 1} (shape {'x'.join(map(str, n))})"
        )
    return volume.ijk_to_ras(ijk.reshape(1, 3))[0]


def box_from_corners(volume, corner_a, corner_b, what: str = "the box") -> Box:
    """A :class:`Box` from two opposite RAS corners in any order. It must be at least one voxel
    (the volume's smallest spacing) thick along R, A and S; whether it overlaps the volume is
    checked where the window is placed (:func:`~SAMMed3DMoELib.windows.window_for_box`)."""
    a, b = as_xyz(corner_a, f"{what}'s corner"), as_xyz(corner_b, f"{what}'s corner")
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    thinnest = float(np.min(volume.spacing))
    thin = np.nonzero(hi - lo < thinnest)[0]
    if thin.size:
        raise SAMMed3DError(
            f"{what} has (almost) zero extent along {', '.join('RAS'[int(axis)] for axis in thin)} (less than one "
            f"voxel, {thinnest:g} mm; it spans {lo.round(1).tolist()}..{hi.round(1).tolist()} mm); give two opposite "
            "corners so that the box covers the object in all three directions"
        )
    return Box(tuple(float(v) for v in lo), tuple(float(v) for v in hi))
