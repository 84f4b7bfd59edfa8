"""Volumes and their geometry: the user's grid, the model's prepared grid, and resampling.

Conventions (see DESIGN.md, "Coordinates"):

* A volume is ``array[i, j, k]`` plus a 4x4 ``affine`` from voxel index to RAS millimetres,
  exactly as nibabel uses them (:mod:`.volume_io` reads and writes files in this convention).
* The *prepared* grid is what the model sees: the volume reoriented to the closest canonical
  RAS+ axis order (axis 0 toward R, 1 toward A, 2 toward S; axes are only permuted and flipped,
  never rotated, so an oblique volume keeps its direction cosines, like nibabel's
  ``as_closest_canonical`` and torchio's ``ToCanonical``), then resampled along each axis to
  1.5 mm. Windows of the prepared grid are in :mod:`.windows`.

Voxel-centre convention (used everywhere in this module, and the same as
``F.interpolate(..., align_corners=False)`` and ``F.grid_sample(..., align_corners=False)``):
a voxel index ``n`` is the centre of a voxel that covers ``[n - 0.5, n + 0.5]``, and resampling
keeps the *outer faces* of the grid fixed. Along an axis with old spacing ``s0`` and new spacing
``s1`` (ratio ``f = s1 / s0``), new index ``m`` samples old index ``(m + 0.5) * f - 0.5``; the new
size is ``ceil(n0 * s0 / s1)`` (as torchio's ``Resample``), so the new grid starts at the same outer
face and may reach past the far face by less than one new voxel. Samples that fall in the
half-voxel margins (or that small overhang) take the value of the nearest edge voxel (border
replication). The prepared affine encodes exactly this mapping, so a RAS point has the same
physical position in every grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nib_orientations

from .errors import SAMMed3DError

__all__ = [
    "Volume",
    "PreparedVolume",
    "is_ct",
    "prepare_volume",
    "resample_label",
    "canonical_transform",
    "DEFAULT_SPACING",
    "WINDOW_SIZE",
    "CT_CLAMP",
]

DEFAULT_SPACING = 1.5
WINDOW_SIZE = 128
CT_CLAMP = (-1000.0, 1000.0)

# Voxels per chunk when sampling through a dense grid (bounds the grid's memory).
_CHUNK_VOXELS = 1 << 21


# --------------------------------------------------------------------------- small helpers


def as_points(points, what: str = "points") -> np.ndarray:
    """Points as a float64 array (..., 3); (3,) stays (3,)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 0 or pts.shape[-1] != 3:
        raise SAMMed3DError(
            f"{what} must have 3 coordinates per point (shape (3,) or (N, 3)), got shape "
            f"{pts.shape}; pass RAS millimetres as [R, A, S]."
        )
    if not np.all(np.isfinite(pts)):
        raise SAMMed3DError(f"{what} contain NaN or infinite coordinates: {pts.tolist()}.")
    return pts


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def check_affine(affine, what: str = "affine") -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise SAMMed3DError(f"the {what} must be a 4x4 matrix, got shape {aff.shape}.")
    if not np.all(np.isfinite(aff)):
        raise SAMMed3DError(f"the {what} contains NaN or infinite values: {aff.tolist()}.")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise SAMMed3DError(
            f"the {what} is singular (a zero spacing or collapsed axes): {aff.tolist()}; "
            "fix the image header (spacing and direction)."
        )
    return aff


def axis_map(matrix: np.ndarray, tol: float = 1e-6):
    """If ``matrix`` (4x4, output index -> input index) maps each output axis to exactly one input
    axis, return ``(axes, scales, offsets)`` such that
    ``input[axes[a]] = scales[a] * output[a] + offsets[a]``; else ``None``."""
    lin = matrix[:3, :3]
    big = np.abs(lin) > tol * max(np.abs(lin).max(), 1e-300)
    if not (np.all(big.sum(axis=0) == 1) and np.all(big.sum(axis=1) == 1)):
        return None
    axes = [int(np.argmax(big[:, a])) for a in range(3)]
    scales = [float(lin[axes[a], a]) for a in range(3)]
    offsets = [float(matrix[axes[a], 3]) for a in range(3)]
    return axes, scales, offsets


# --------------------------------------------------------------------------- Volume


class _Grid:
    """What a volume on a voxel grid knows of its geometry: ``array`` and ``affine``."""

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(eq=False)
class Volume(_Grid):
    """A 3D scalar image: ``array[i, j, k]`` and the 4x4 voxel-index -> RAS (mm) ``affine``."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise SAMMed3DError(
                f"a volume must be a 3D array indexed [i, j, k], got {arr.ndim}D with shape "
                f"{arr.shape}; pick one 3D volume (one time point / channel) first."
            )
        if arr.dtype.kind not in "biuf":
            raise SAMMed3DError(
                f"volume voxels must be real numbers, got dtype {arr.dtype}; convert the image "
                "to a scalar (e.g. magnitude) volume first."
            )
        self.array = arr
        self.affine = check_affine(self.affine, "volume's affine (voxel index -> RAS)")

    @classmethod
    def from_kji(cls, array_kji, ijk_to_ras) -> "Volume":
        """A volume from an array indexed ``[k, j, i]`` (Slicer's ``arrayFromVolume`` order) and
        its 4x4 IJK-to-RAS matrix (``GetIJKToRASMatrix`` with parent transforms hardened). The
        array is not copied: ``volume.array`` is a transposed view of it."""
        arr = np.asarray(array_kji)
        if arr.ndim != 3:
            raise SAMMed3DError(
                f"a volume from Slicer must be a 3D array indexed [k, j, i], got {arr.ndim}D with shape "
                f"{arr.shape}; pick one 3D volume (one time point / component) first."
            )
        return cls(arr.transpose(2, 1, 0), np.asarray(ijk_to_ras, dtype=np.float64))

    def ijk_to_ras(self, points) -> np.ndarray:
        """Voxel indices (..., 3) -> RAS mm (..., 3)."""
        return apply_affine(self.affine, as_points(points, "voxel indices"))

    def ras_to_ijk(self, points) -> np.ndarray:
        """RAS mm (..., 3) -> fractional voxel indices (..., 3)."""
        return apply_affine(np.linalg.inv(self.affine), as_points(points, "RAS points"))


def check_voxels(arr: np.ndarray, name: str) -> Optional[float]:
    """Refuse an all-NaN/inf or constant image; when some voxels are NaN/inf, warn and return the
    value that replaces them (the minimum finite value), else None. ``arr`` is not modified."""
    finite = None
    n_bad = 0
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        n_bad = int(arr.size - np.count_nonzero(finite))
        if n_bad == arr.size:
            raise SAMMed3DError(
                f"{name}: every voxel is NaN or infinite: there is no image to segment; "
                "check the file or the step that produced it."
            )
    vmin = float(arr.min(where=finite, initial=np.inf) if n_bad else arr.min())
    vmax = float(arr.max(where=finite, initial=-np.inf) if n_bad else arr.max())
    if vmin == vmax:
        raise SAMMed3DError(
            f"{name}: the image is constant (all voxels = {vmin:g}): nothing to segment; "
            "load the actual scan."
        )
    if not n_bad:
        return None
    warnings.warn(
        f"{name}: {n_bad} voxel(s) were NaN or infinite; they were replaced by the "
        f"minimum finite value ({vmin:g}).",
        RuntimeWarning,
        stacklevel=4,
    )
    return vmin



# --------------------------------------------------------------------------- modality


def is_ct(volume: Union[Volume, np.ndarray]) -> bool:
    """Guess CT from the intensity range: Hounsfield units reach air (min <= -500, not below the
    int16 range) and stay in a plausible range above (0 <= max <= 32767). MR is rarely negative.
    CT stored without its rescale (e.g. 0..4095) is not detected: pass modality="CT"."""
    arr = volume.array if isinstance(volume, Volume) else np.asarray(volume)
    if arr.size == 0:
        return False
    vmin, vmax = float(np.nanmin(arr)), float(np.nanmax(arr))
    return -32768.0 <= vmin <= -500.0 and 0.0 <= vmax <= 32767.0


# --------------------------------------------------------------------------- prepared grid


def canonical_transform(affine, shape) -> Tuple[np.ndarray, list, list]:
    """The closest canonical (RAS+) axis order of a grid, by permuting/flipping axes only.

    Returns ``(P, axes, flips)``: ``P`` (4x4) maps canonical voxel indices to the original ones,
    canonical axis ``a`` is original axis ``axes[a]``, reversed if ``flips[a]``. The canonical
    affine is ``affine @ P``, exactly what ``nibabel.as_closest_canonical`` gives: the axis
    matching is nibabel's ``io_orientation`` (each axis goes to the world axis its orthogonalised
    direction is closest to). When two axes compete for one world axis (directions near 45
    degrees), nibabel's rule decides; from nibabel 5.3 the strongest axis chooses first."""
    aff = check_affine(affine)
    ornt = nib_orientations.io_orientation(aff)
    P = nib_orientations.inv_ornt_aff(ornt, tuple(shape))
    axes = [-1, -1, -1]
    flips = [False, False, False]
    for src_axis, (world, sign) in enumerate(ornt):
        axes[int(world)] = src_axis
        flips[int(world)] = bool(sign < 0)
    return P, axes, flips


@dataclass(eq=False)
class PreparedVolume(_Grid):
    """A volume on the model's grid: canonical RAS+ axis order, ``spacing`` mm, CT clamped.

    ``array`` is float32 [d0, d1, d2]; ``affine`` maps prepared voxel indices to RAS;
    ``source`` is the original :class:`Volume` the mask is mapped back to."""

    array: np.ndarray
    affine: np.ndarray
    source: Volume
    is_ct: bool

    def ras_to_index(self, points) -> np.ndarray:
        """RAS mm (..., 3) -> fractional prepared-grid indices (..., 3)."""
        return apply_affine(np.linalg.inv(self.affine), as_points(points, "RAS points"))

    def index_to_ras(self, points) -> np.ndarray:
        """Prepared-grid indices (..., 3) -> RAS mm (..., 3)."""
        return apply_affine(self.affine, as_points(points, "prepared indices"))

    def source_to_prepared(self) -> np.ndarray:
        """4x4 matrix: original-grid voxel index -> prepared-grid voxel index."""
        return np.linalg.inv(self.affine) @ self.source.affine

    def tensor(self, device) -> torch.Tensor:
        """The prepared array as a float32 tensor on ``device``, made once and kept there (on
        the CPU it shares the numpy array's memory)."""
        device = torch.device(device)
        cached = self.__dict__.get("_tensor")
        same = cached is not None and cached.device.type == device.type and device.index in (None, cached.device.index)
        if not same:
            cached = torch.from_numpy(np.ascontiguousarray(self.array, dtype=np.float32)).to(device)
            self.__dict__["_tensor"] = cached
        return cached


def _target_spacing(spacing) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(3, float(s))
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise SAMMed3DError(
            f"spacing must be a positive number or 3 positive numbers (mm), got {spacing!r}."
        )
    return s


def resample_linear_1d(x: torch.Tensor, axis: int, coords: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at fractional indices ``coords`` (border
    replication outside [0, n-1])."""
    n = x.shape[axis]
    c = np.clip(np.asarray(coords, dtype=np.float64), 0.0, n - 1)
    i0 = np.minimum(np.floor(c).astype(np.int64), n - 1)
    w = c - i0
    i1 = np.minimum(i0 + 1, n - 1)
    if np.array_equal(i0, np.arange(n)) and np.all(w < 1e-9):
        return x
    idx0 = torch.from_numpy(i0).to(x.device)
    if np.all(w < 1e-9):
        return x.index_select(axis, idx0)
    shape = [1] * x.ndim
    shape[axis] = -1
    wt = torch.from_numpy(w.astype(np.float32)).to(x.device).view(shape)
    lo = x.index_select(axis, idx0)
    hi = x.index_select(axis, torch.from_numpy(i1).to(x.device))
    hi.sub_(lo).mul_(wt)
    lo.add_(hi)
    return lo


def _float32_tensor(arr: np.ndarray) -> torch.Tensor:
    a = np.asarray(arr)
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a, dtype=np.float32)
    else:
        a = a.astype(np.float32, order="K", copy=True)
    return torch.from_numpy(a)


def prepare_volume(
    volume: Volume,
    spacing: Union[float, Sequence[float]] = DEFAULT_SPACING,
    modality: str = "auto",
    *,
    ct_clamp: Optional[Sequence[float]] = CT_CLAMP,
    slab_voxels: int = 1 << 26,
) -> PreparedVolume:
    """Reorient ``volume`` to the closest canonical RAS+ axis order, clamp CT to [-1000, 1000] HU
    and resample linearly to ``spacing`` mm (see the module docstring for the exact grid).

    ``modality``: "auto" (detect with :func:`is_ct`), "CT" or "MR". ``ct_clamp``: the HU range
    a CT is clamped to (None: no clamping). The volume is converted in
    slabs of about ``slab_voxels`` source voxels (256 MB of float32 by default)."""
    if not isinstance(volume, Volume):
        raise SAMMed3DError(f"prepare_volume needs a Volume, got {type(volume).__name__}.")
    mod = str(modality).strip().upper()
    if mod not in ("AUTO", "CT", "MR"):
        raise SAMMed3DError(f"modality must be 'auto', 'CT' or 'MR', got {modality!r}.")
    target = _target_spacing(spacing)
    ct = is_ct(volume) if mod == "AUTO" else mod == "CT"

    P, axes, flips = canonical_transform(volume.affine, volume.shape)
    can_affine = volume.affine @ P
    can_shape = np.array([volume.shape[axes[a]] for a in range(3)])
    can_spacing = np.linalg.norm(can_affine[:3, :3], axis=0)
    ratio = target / can_spacing  # canonical index step per prepared index step
    new_shape = np.maximum(1, np.ceil(can_shape * can_spacing / target - 1e-6)).astype(int)
    S = np.eye(4)
    S[:3, :3] = np.diag(ratio)
    S[:3, 3] = 0.5 * ratio - 0.5
    affine = can_affine @ S

    fill = check_voxels(volume.array, "the volume")
    # Work in slabs along the longest prepared axis, so that a volume too large to convert to
    # float32 at once is still prepared: peak memory is the result plus one slab.
    out = np.empty(tuple(int(n) for n in new_shape), dtype=np.float32)
    coords = []
    for a in range(3):
        c = (np.arange(new_shape[a], dtype=np.float64) + 0.5) * ratio[a] - 0.5
        coords.append((can_shape[a] - 1) - c if flips[a] else c)
    chunk_axis = int(np.argmax(new_shape))
    src_axis = axes[chunk_axis]
    plane_voxels = int(np.prod(volume.shape)) // volume.shape[src_axis]
    rows = max(1, int(slab_voxels // max(1, plane_voxels * ratio[chunk_axis])))
    order = sorted(range(3), key=lambda a: new_shape[a] / can_shape[a])  # shrinking axes first
    for m0 in range(0, int(new_shape[chunk_axis]), rows):
        m1 = min(int(new_shape[chunk_axis]), m0 + rows)
        c = np.clip(coords[chunk_axis][m0:m1], 0, can_shape[chunk_axis] - 1)
        lo, hi = int(np.floor(c.min())), min(int(np.floor(c.max())) + 2, int(can_shape[chunk_axis]))
        index = [slice(None)] * 3
        index[src_axis] = slice(lo, hi)
        x = _float32_tensor(volume.array[tuple(index)])
        if fill is not None:
            x = torch.nan_to_num(x, nan=fill, posinf=fill, neginf=fill)
        if ct and ct_clamp is not None:
            x.clamp_(*ct_clamp)
        for a in order:
            sample = coords[chunk_axis][m0:m1] - lo if a == chunk_axis else coords[a]
            x = resample_linear_1d(x, axes[a], sample)
        index = [slice(None)] * 3
        index[chunk_axis] = slice(m0, m1)
        out[tuple(index)] = x.permute(*axes).numpy()
    return PreparedVolume(array=out, affine=affine, source=volume, is_ct=bool(ct))


def sample_grid(
    data: torch.Tensor,
    out_to_in: np.ndarray,
    out_start: Sequence[int],
    out_shape: Sequence[int],
    mode: str,
) -> torch.Tensor:
    """Sample 3D ``data`` at the points ``out_to_in @ (out_start + index)`` for every index of an
    ``out_shape`` grid, with ``grid_sample`` (align_corners=False, border padding), in chunks.
    Returns a tensor of ``out_shape`` and a boolean tensor telling which points fell inside
    ``data``'s extent ([-0.5, n - 0.5] per axis).

    Sample coordinates are computed in float64 on the CPU and in float32 on other devices (MPS
    has no float64; on a GPU float32 is within 1e-4 voxel for grids below 1000 voxels a side)."""
    dev = data.device
    coord = torch.float64 if dev.type == "cpu" else torch.float32
    eps = 1e-6 if coord == torch.float64 else 1e-4
    n_in = np.asarray(data.shape[-3:], dtype=np.float64)
    lin = torch.as_tensor(out_to_in[:3, :3], dtype=coord, device=dev)
    off = torch.as_tensor(out_to_in[:3, 3], dtype=coord, device=dev)
    nin = torch.as_tensor(n_in, dtype=coord, device=dev)
    inp = data.reshape(1, 1, *data.shape[-3:]).float()
    out = torch.empty(tuple(int(s) for s in out_shape), dtype=torch.float32, device=dev)
    inside = torch.empty(out.shape, dtype=torch.bool, device=dev)
    plane = max(1, int(out_shape[1]) * int(out_shape[2]))
    rows = max(1, _CHUNK_VOXELS // plane)
    j = torch.arange(out_shape[1], dtype=coord, device=dev) + out_start[1]
    k = torch.arange(out_shape[2], dtype=coord, device=dev) + out_start[2]
    for r0 in range(0, int(out_shape[0]), rows):
        r1 = min(int(out_shape[0]), r0 + rows)
        i = torch.arange(r0, r1, dtype=coord, device=dev) + out_start[0]
        pts = (
            lin[:, 0].view(1, 1, 1, 3) * i.view(-1, 1, 1, 1)
            + lin[:, 1].view(1, 1, 1, 3) * j.view(1, -1, 1, 1)
            + lin[:, 2].view(1, 1, 1, 3) * k.view(1, 1, -1, 1)
            + off.view(1, 1, 1, 3)
        )  # (ri, nj, nk, 3): input indices in data's axis order
        inside[r0:r1] = ((pts >= -0.5 - eps) & (pts <= nin - 0.5 + eps)).all(dim=-1)
        norm = (2.0 * pts + 1.0) / nin - 1.0
        grid = norm.flip(-1).to(torch.float32).unsqueeze(0)  # grid_sample wants (x=W, y=H, z=D)
        out[r0:r1] = F.grid_sample(
            inp, grid, mode=mode, padding_mode="border", align_corners=False
        )[0, 0]
    return out, inside


def resample_label(label_array, volume: Volume, grid: _Grid) -> np.ndarray:
    """Resample a label map on ``volume``'s grid onto another grid in physical space (nearest
    neighbour): the prepared grid (training), or another volume's own grid (a label stored with
    other axes, flips or spacing than its image). ``grid`` is anything with ``shape`` and
    ``affine`` (a :class:`PreparedVolume` or a :class:`Volume`).

    Returns an array of ``grid.shape`` with the label's dtype."""
    if isinstance(label_array, torch.Tensor):
        lab = label_array.detach().cpu().numpy()
    else:
        lab = np.asarray(label_array)
    if lab.shape != volume.shape:
        raise SAMMed3DError(
            f"the label has shape {lab.shape} but its volume has shape {volume.shape}; the label "
            "must be on the volume's grid."
        )
    to_src = np.linalg.inv(volume.affine) @ grid.affine  # grid index -> label index
    amap = axis_map(to_src)
    if amap is not None:
        axes, scales, offsets = amap
        idx = [None, None, None]
        for a in range(3):
            c = scales[a] * np.arange(grid.shape[a], dtype=np.float64) + offsets[a]
            n = volume.shape[axes[a]]
            idx[axes[a]] = np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp)
        return np.ascontiguousarray(lab[np.ix_(*idx)].transpose(*axes))
    # General (rotated) relation between the grids: nearest-neighbour grid_sample.
    if lab.dtype.kind not in "biu" or (lab.size and int(np.abs(lab).max()) >= 2**24):
        raise SAMMed3DError(
            "labels on a grid rotated relative to the target grid must be integers below 2**24."
        )
    data = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))
    out, _ = sample_grid(data, to_src, (0, 0, 0), grid.shape, mode="nearest")
    return out.numpy().astype(lab.dtype)


