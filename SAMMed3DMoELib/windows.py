"""Windows: the model's fixed-size crops of the prepared grid, and the way back.

Windows are ``size``-cubed crops of the prepared grid (128 for SAM-Med3D), positioned by the
prepared-grid index of their voxel ``[0, 0, 0]``; they may hang over the volume's edges, and what
hangs over is zero before normalisation (as torchio's ``CropOrPad``). Points enter a window as
fractional voxel indices in the window's axis order (the model's point convention); logits leave
it through :func:`map_back`, onto the original voxels the window covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SAMMed3DError
from .geometry import (
    WINDOW_SIZE,
    PreparedVolume,
    apply_affine,
    as_points,
    axis_map,
    resample_linear_1d,
    sample_grid,
)
from .prompts import point_on_volume


@dataclass(frozen=True)
class Window:
    """A ``size``-cubed crop of the prepared grid; ``start`` is the prepared-grid index of its
    voxel [0, 0, 0] (may be negative or run past the end: that part is zero-padded)."""

    start: Tuple[int, int, int]
    size: int = WINDOW_SIZE

    def __post_init__(self):
        start = tuple(int(v) for v in np.asarray(self.start).reshape(-1))
        if len(start) != 3:
            raise SAMMed3DError(f"a window start needs 3 indices, got {self.start!r}.")
        if int(self.size) <= 0:
            raise SAMMed3DError(f"window size must be positive, got {self.size!r}.")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "size", int(self.size))

    @property
    def stop(self) -> Tuple[int, int, int]:
        return tuple(s + self.size for s in self.start)


def _check_prepared(prepared) -> None:
    if not isinstance(prepared, PreparedVolume):
        raise SAMMed3DError(
            f"expected a PreparedVolume (from prepare_volume), got {type(prepared).__name__}."
        )


def _window_at(centre_index: np.ndarray, size: int) -> Window:
    # The centre lands on window index size // 2 (64 for 128, where SAM-Med3D's default click is).
    # A click at the centre of a 3 mm voxel lies exactly between two 1.5 mm voxels; the small
    # epsilon makes that tie round up whatever the floating-point noise of the RAS round trip.
    start = np.floor(centre_index + 0.5 + 1e-6).astype(np.int64) - int(size) // 2
    return Window(tuple(int(s) for s in start), int(size))


def window_for_point(prepared: PreparedVolume, ras_point, size: int = WINDOW_SIZE) -> Window:
    """The window centred on a RAS point (the point's nearest prepared voxel lands on window index
    size // 2). The point must lie on the volume."""
    _check_prepared(prepared)
    pt = as_points(ras_point, "the point").reshape(-1, 3)
    if pt.shape[0] != 1:
        raise SAMMed3DError(f"window_for_point takes one point, got {pt.shape[0]}.")
    point_on_volume(prepared.source, pt[0])
    return _window_at(prepared.ras_to_index(pt)[0], size)


def window_for_box(
    prepared: PreparedVolume, ras_min, ras_max, size: int = WINDOW_SIZE
) -> Window:
    """The window centred on the centre of the RAS box [ras_min, ras_max] (corners in any
    order). The box must overlap the volume."""
    _check_prepared(prepared)
    lo = as_points(ras_min, "box corner").reshape(3)
    hi = as_points(ras_max, "box corner").reshape(3)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = prepared.ras_to_index(corners)
    shape = np.asarray(prepared.shape)
    if np.any(idx.max(axis=0) < -0.5) or np.any(idx.min(axis=0) > shape - 0.5):
        raise SAMMed3DError(
            f"the box {lo.round(2).tolist()}..{hi.round(2).tolist()} (RAS mm) does not overlap "
            "the volume; draw it on the image."
        )
    centre = prepared.ras_to_index((lo + hi) / 2.0)
    return _window_at(centre, size)


def _overlap(start: Sequence[int], size: int, shape: Sequence[int]):
    lo = [max(0, s) for s in start]
    hi = [min(n, s + size) for s, n in zip(start, shape)]
    return lo, hi


def extract_window(prepared: PreparedVolume, window: Window) -> np.ndarray:
    """Crop (zero-padding what hangs over) and z-score normalise a window: mean and standard
    deviation (unbiased) of the voxels > 0, applied to all voxels, as torchio's
    ``ZNormalization(masking_method=lambda x: x > 0)``. If fewer than 2 voxels are > 0 the
    statistics of all voxels are used; a zero standard deviation is replaced by 1."""
    return extract_window_tensor(prepared, window, torch.device("cpu")).numpy()


def extract_window_tensor(prepared: PreparedVolume, window: Window, device) -> torch.Tensor:
    """:func:`extract_window` computed where the model runs: the prepared volume is copied to
    ``device`` once (see :meth:`PreparedVolume.tensor`) and every window is cut there."""
    _check_prepared(prepared)
    data = prepared.tensor(device)
    s = window.size
    out = torch.zeros((s, s, s), dtype=torch.float32, device=data.device)
    lo, hi = _overlap(window.start, s, prepared.shape)
    if all(h > l for l, h in zip(lo, hi)):
        out[
            lo[0] - window.start[0] : hi[0] - window.start[0],
            lo[1] - window.start[1] : hi[1] - window.start[1],
            lo[2] - window.start[2] : hi[2] - window.start[2],
        ] = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    values = out[out > 0]
    if values.numel() < 2:
        values = out.reshape(-1)
    # float32 statistics (MPS has no float64): torch.std_mean reduces pairwise; on 128³ windows of
    # the example CT mean and std are within 1e-7 (relative) of the float64 values.
    std, mean = torch.std_mean(values)
    std, mean = float(std), float(mean)
    if not math.isfinite(std) or std < 1e-8:
        std = 1.0
    out -= mean
    out /= std
    return out


def ras_to_window(prepared: PreparedVolume, window: Window, ras_points) -> np.ndarray:
    """RAS points (N, 3) -> fractional voxel indices in the window (window axis order), the
    model's point convention."""
    _check_prepared(prepared)
    pts = as_points(ras_points, "RAS points").reshape(-1, 3)
    return prepared.ras_to_index(pts) - np.asarray(window.start, dtype=np.float64)


def region_bbox(prepared: PreparedVolume, window: Window):
    """The box of original-grid voxels whose centres lie inside the window, clipped to the volume:
    ``(start, stop)`` index triples (stop exclusive; stop == start on an axis if empty)."""
    _check_prepared(prepared)
    to_src = np.linalg.inv(prepared.source_to_prepared())  # prepared index -> source index
    lo = np.asarray(window.start, dtype=np.float64) - 0.5
    hi = lo + window.size
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    src = apply_affine(to_src, corners)
    shape = np.asarray(prepared.source.shape)
    start = np.clip(np.ceil(src.min(axis=0) - 1e-6), 0, shape).astype(int)
    stop = np.clip(np.floor(src.max(axis=0) + 1e-6) + 1, 0, shape).astype(int)
    stop = np.maximum(stop, start)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def map_back(
    window_logits,
    prepared: PreparedVolume,
    window: Window,
    threshold: float = 0.0,
    *,
    method: str = "auto",
):
    """Map window logits (size³ or (size/4)³, e.g. the decoder's 32³; leading singleton dims are
    ignored) back to the ORIGINAL grid: low-res logits are first upsampled trilinearly
    (align_corners=False), then the logits are resampled trilinearly onto the original voxels
    inside :func:`region_bbox` and thresholded (``> threshold``).

    ``method``: "grid_sample" samples through ``F.grid_sample`` (align_corners=False, border
    padding; works for any relation between the grids); "auto" (default) uses the equivalent
    separable interpolation (same values, several times faster) when each original axis maps to
    one window axis, which is always the case for grids made by :func:`prepare_volume`.

    Returns ``(mask_region (bool array), offset)``, ``offset`` being the original-grid index of
    ``mask_region[0, 0, 0]``."""
    _check_prepared(prepared)
    if method not in ("auto", "grid_sample"):
        raise SAMMed3DError(f"method must be 'auto' or 'grid_sample', got {method!r}.")
    if not isinstance(window, Window):
        raise SAMMed3DError(f"expected a Window, got {type(window).__name__}.")
    if isinstance(window_logits, torch.Tensor):
        t = window_logits
    else:
        t = torch.as_tensor(np.asarray(window_logits))
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    s = window.size
    if t.ndim != 3:
        raise SAMMed3DError(f"window logits must be 3D (size³ or (size/4)³), got shape {tuple(t.shape)}.")
    t = t.detach().float()
    if tuple(t.shape) != (s, s, s):
        if s % 4 == 0 and tuple(t.shape) == (s // 4,) * 3:
            t = F.interpolate(t[None, None], size=(s, s, s), mode="trilinear", align_corners=False)[0, 0]
        else:
            raise SAMMed3DError(
                f"window logits have shape {tuple(t.shape)}; expected {(s,) * 3} or "
                f"{(s // 4,) * 3} for a window of size {s}."
            )
    start, stop = region_bbox(prepared, window)
    shape = tuple(b - a for a, b in zip(start, stop))
    if min(shape) <= 0:
        return np.zeros(shape, dtype=bool), start
    # original index -> window index
    src_to_win = prepared.source_to_prepared()
    src_to_win[:3, 3] -= np.asarray(window.start, dtype=np.float64)
    amap = axis_map(src_to_win) if method == "auto" else None
    if amap is not None:
        # Trilinear = three 1D linear passes; border clamping as grid_sample's "border" padding.
        axes, scales, offsets = amap  # window axis axes[r] = scales[r] * original[r] + offsets[r]
        x = t
        for r in sorted(range(3), key=lambda r: shape[r] / s):
            c = scales[r] * (np.arange(shape[r], dtype=np.float64) + start[r]) + offsets[r]
            x = resample_linear_1d(x, axes[r], c)
        mask = x.permute(*axes) > float(threshold)
    else:
        values, inside = sample_grid(t, src_to_win, start, shape, mode="bilinear")
        mask = (values > float(threshold)) & inside
    return mask.cpu().numpy(), start
