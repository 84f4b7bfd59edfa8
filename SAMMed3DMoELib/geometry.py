"""Volumes, their geometry, and the mapping between the user's grid and the model's window.

Conventions (see DESIGN.md, "Coordinates"):

* A volume is ``array[i, j, k]`` plus a 4x4 ``affine`` from voxel index to RAS millimetres,
  exactly as nibabel uses them. Files are read with SimpleITK, whose LPS origin/direction are
  converted: ``affine = diag(-1, -1, 1, 1) @ affine_LPS``.
* The *prepared* grid is what the model sees: the volume reoriented to the closest canonical
  RAS+ axis order (axis 0 toward R, 1 toward A, 2 toward S; axes are only permuted and flipped,
  never rotated, so an oblique volume keeps its direction cosines, like nibabel's
  ``as_closest_canonical`` and torchio's ``ToCanonical``), then resampled along each axis to
  1.5 mm.

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

Windows are ``size``-cubed crops of the prepared grid (128 for SAM-Med3D), positioned by the
prepared-grid index of their voxel ``[0, 0, 0]``; they may hang over the volume's edges, and what
hangs over is zero before normalisation (as torchio's ``CropOrPad``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SAMMed3DError

__all__ = [
    "Volume",
    "PreparedVolume",
    "Window",
    "load_volume",
    "volume_from_sitk",
    "save_mask",
    "mask_file_extension",
    "MASK_EXTENSIONS",
    "is_ct",
    "prepare_volume",
    "prepare_label",
    "window_for_point",
    "window_for_box",
    "extract_window",
    "extract_window_tensor",
    "ras_to_window",
    "region_bbox",
    "map_back",
    "canonical_transform",
    "DEFAULT_SPACING",
    "WINDOW_SIZE",
]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_SPACING = 1.5
WINDOW_SIZE = 128
CT_CLAMP = (-1000.0, 1000.0)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Voxels per chunk when sampling through a dense grid (bounds the grid's memory).
_CHUNK_VOXELS = 1 << 21


def _sitk():
    import SimpleITK as sitk  # imported lazily: only file I/O needs it

    return sitk


# --------------------------------------------------------------------------- small helpers


def _as_points(points, what: str = "points") -> np.ndarray:
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


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _check_affine(affine, what: str = "affine") -> np.ndarray:
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


def _axis_map(matrix: np.ndarray, tol: float = 1e-6):
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
        self.affine = _check_affine(self.affine, "volume's affine (voxel index -> RAS)")

    def ijk_to_ras(self, points) -> np.ndarray:
        """Voxel indices (..., 3) -> RAS mm (..., 3)."""
        return _apply(self.affine, _as_points(points, "voxel indices"))

    def ras_to_ijk(self, points) -> np.ndarray:
        """RAS mm (..., 3) -> fractional voxel indices (..., 3)."""
        return _apply(np.linalg.inv(self.affine), _as_points(points, "RAS points"))


# --------------------------------------------------------------------------- reading


def _first_line(exc: BaseException) -> str:
    """ITK's error text without its source-file preamble and object addresses, on one line."""
    import re

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [
        ln
        for ln in lines
        if not ln.startswith("Exception thrown in SimpleITK") and not ln.endswith("trouble")
        and "trouble reading" not in ln and not ln.endswith("_read:")
    ]
    text = "; ".join(re.sub(r"\(0x[0-9a-fA-F]+\)", "", ln) for ln in lines) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise SAMMed3DError(
            f"could not scan the folder {folder} for DICOM files ({_first_line(exc)}); "
            "pass a folder holding one DICOM series, or an image file."
        ) from None
    if not series_ids:
        raise SAMMed3DError(
            f"the folder {folder} holds no DICOM series; pass a folder with the DICOM files of "
            "one series, or an image file (.nii, .nii.gz, .nrrd, .mha, .mhd)."
        )
    files_per_series = {
        sid: list(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series_ids
    }
    sid = max(series_ids, key=lambda s: len(files_per_series[s]))
    if len(series_ids) > 1:
        warnings.warn(
            f"the folder {folder} holds {len(series_ids)} DICOM series; reading the largest "
            f"({sid!r}, {len(files_per_series[sid])} files). Put each series in its own folder "
            "to choose another.",
            stacklevel=3,
        )
    reader.SetFileNames(files_per_series[sid])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise SAMMed3DError(
            f"could not read the DICOM series in {folder} ({_first_line(exc)}); check that the "
            "files are complete and belong to one 3D series."
        ) from None


def _check_voxels(arr: np.ndarray, name: str) -> Optional[float]:
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


def _sanitize(arr: np.ndarray, name: str) -> None:
    """:func:`_check_voxels`, then replace NaN/inf voxels in place."""
    fill = _check_voxels(arr, name)
    if fill is not None:
        np.copyto(arr, np.asarray(fill, dtype=arr.dtype), where=~np.isfinite(arr))


def volume_from_sitk(image, name: str = "image", _fixup=None) -> Volume:
    """Convert a SimpleITK image (LPS, array [k, j, i]) into a RAS :class:`Volume`.

    Single-volume 4D images (last size 1) are accepted; NaN/inf voxels are replaced (warning)."""
    sitk = _sitk()
    ncomp = image.GetNumberOfComponentsPerPixel()
    size = tuple(int(s) for s in image.GetSize())
    if ncomp > 1:
        raise SAMMed3DError(
            f"{name} has {ncomp} components per voxel (an RGB or vector image of size {size}): "
            "SAM-Med3D needs one scalar 3D volume; extract one component (e.g. "
            "SimpleITK.VectorIndexSelectionCast(image, 0)) and save it as its own file."
        )
    dim = image.GetDimension()
    if dim == 4 and size[3] == 1:
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        dim, size = 3, size[:3]
    if dim == 4:
        raise SAMMed3DError(
            f"{name} is a 4D image with {size[3]} volumes (size {size}): SAM-Med3D segments one "
            "3D volume at a time; pick one volume and save it, e.g. with nibabel "
            "`nib.save(nib.load(path).slicer[..., 0], 'one_volume.nii.gz')`."
        )
    if dim < 3:
        raise SAMMed3DError(
            f"{name} is a {dim}D image (size {size}): SAM-Med3D segments 3D volumes; load a 3D "
            "scan (NIfTI, NRRD, MetaImage) or a folder with a whole DICOM series."
        )
    if dim > 4:
        raise SAMMed3DError(
            f"{name} is a {dim}D image (size {size}); load a single 3D volume instead."
        )
    if min(size) < 2:
        raise SAMMed3DError(
            f"{name} has a single slice (size {size}): it is a 2D image stored as 3D; "
            "SAM-Med3D segments 3D volumes, so load the whole series/volume."
        )
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine = _LPS_TO_RAS @ lps
    arr = sitk.GetArrayFromImage(image)  # [k, j, i], our own copy
    if arr.dtype.kind == "c":
        raise SAMMed3DError(
            f"{name} has complex voxels; save the magnitude image and load that instead."
        )
    arr = arr.transpose(2, 1, 0)  # [i, j, k] (a view; no second copy)
    if _fixup is not None:
        _fixup(arr)
    _sanitize(arr, name)
    return Volume(arr, affine)


def _nifti_data_available(path: Path, needed: int) -> bool:
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() >= 4:
                f.seek(-4, os.SEEK_END)
                # gzip's trailer holds the uncompressed length mod 2**32: the cheap, usual case.
                if int.from_bytes(f.read(4), "little") == needed % 2**32:
                    return True
        import gzip
        import zlib

        total = 0
        try:
            with gzip.open(path, "rb") as g:
                while True:
                    chunk = g.read(1 << 22)
                    if not chunk:
                        break
                    total += len(chunk)
        except (EOFError, OSError, zlib.error):
            return False
        return total >= needed
    return path.stat().st_size >= needed


def _nifti_fixups(path: Path, arr: np.ndarray, name: str) -> None:
    """ITK's NIfTI reader silently fills a truncated file with zeros and turns NaN/inf voxels
    into 0. Check the data length against the header, and mark non-finite voxels (found with
    nibabel) as NaN so that :func:`_sanitize` replaces and reports them like other formats."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        hdr = img.header
        shape = tuple(int(n) for n in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        needed = int(hdr.get_data_offset()) + int(np.prod(shape)) * dtype.itemsize
    except Exception:  # nibabel cannot parse what ITK could: leave it to ITK
        return
    if not _nifti_data_available(path, needed):
        raise SAMMed3DError(
            f"{name} is truncated or corrupt: its header promises {needed} bytes of image data "
            "but the file holds less (an interrupted download or copy?); get a complete copy."
        )
    if dtype.kind == "f" and arr.dtype.kind == "f" and int(np.prod(shape)) == arr.size:
        data = np.asanyarray(img.dataobj)
        bad = ~np.isfinite(data)
        del data
        if bad.any():
            arr[bad.reshape(arr.shape)] = np.nan


def load_volume(path: PathLike) -> Volume:
    """Read a 3D image (NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd, or a DICOM series folder)
    with SimpleITK into a RAS :class:`Volume`.

    Raises :class:`SAMMed3DError` for a missing/unreadable file, a 2D/4D/vector image or a
    constant image; NaN/inf voxels are replaced by the minimum finite value with a warning."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise SAMMed3DError(f"image not found: {p}; check the path (and the working folder).")
    if p.is_dir():
        image = _read_dicom_series(p)
    else:
        sitk = _sitk()
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise SAMMed3DError(
                f"could not read {p} as an image ({_first_line(exc)}): the file is corrupt, "
                "truncated or not in a supported format (NIfTI .nii/.nii.gz, NRRD .nrrd, "
                "MetaImage .mha/.mhd, or a folder with one DICOM series); re-export it and try "
                "again."
            ) from None
        if p.name.lower().endswith((".nii", ".nii.gz")):
            return volume_from_sitk(image, name=str(p), _fixup=lambda a: _nifti_fixups(p, a, str(p)))
    return volume_from_sitk(image, name=str(p))


# --------------------------------------------------------------------------- writing

_DEFAULT_SEGMENT_COLOR = (0.501961, 0.682353, 0.501961)


MASK_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def mask_file_extension(path: PathLike) -> str:
    """The mask format a path asks for (one of :data:`MASK_EXTENSIONS`), or a SAMMed3DError."""
    path = Path(path)
    name = path.name.lower()
    for ext in MASK_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise SAMMed3DError(
        f"cannot write a mask to {path}: unknown file extension; use .nii.gz, .nii, .nrrd or "
        ".seg.nrrd (a 3D Slicer segmentation)."
    )


def _mask_to_uint8(mask, reference: Volume) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.shape != reference.shape:
        raise SAMMed3DError(
            f"the mask has shape {m.shape} but the reference volume has shape "
            f"{reference.shape}; the mask must be on the reference grid (use map_back)."
        )
    if m.dtype == bool:
        return m.astype(np.uint8)
    if m.dtype.kind not in "iu":
        raise SAMMed3DError(
            f"the mask must hold integer labels or booleans, got dtype {m.dtype}; threshold "
            "probabilities/logits first."
        )
    if m.size and (int(m.min()) < 0 or int(m.max()) > 255):
        raise SAMMed3DError(
            f"mask labels must be in 0..255, got {int(m.min())}..{int(m.max())}; relabel them."
        )
    return m.astype(np.uint8, copy=False)


def save_mask(
    mask,
    reference: Volume,
    path: PathLike,
    name: Union[str, Mapping[int, str]] = "Segment_1",
    color: Optional[Sequence[float]] = None,
) -> Path:
    """Write a label mask (uint8) on exactly ``reference``'s grid to .nii.gz/.nii/.nrrd, or to
    .seg.nrrd as a 3D Slicer segmentation (one segment per label value present; ``name`` names
    it, or maps label value -> name). Returns the path written."""
    p = Path(os.fspath(path)).expanduser()
    kind = mask_file_extension(p)
    data = _mask_to_uint8(mask, reference)
    if not p.parent.is_dir():
        raise SAMMed3DError(f"cannot write {p}: the folder {p.parent} does not exist; create it.")
    aff = reference.affine
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise SAMMed3DError(
            "the reference grid is sheared (its axes are not perpendicular), which NIfTI/NRRD "
            "images written by SimpleITK cannot represent; resample the reference to an "
            "orthogonal grid first."
        )
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in direction.ravel()])
    if kind == ".seg.nrrd":
        for key, value in _segmentation_metadata(data, name, color).items():
            image.SetMetaData(key, value)
    try:
        sitk.WriteImage(image, str(p), True)
    except RuntimeError as exc:
        raise SAMMed3DError(
            f"could not write {p} ({_first_line(exc)}); check the folder is writable and the "
            "disk not full."
        ) from None
    return p


def _segmentation_metadata(data: np.ndarray, name, color) -> dict:
    values = [int(v) for v in np.unique(data) if v != 0] or [1]
    if isinstance(name, Mapping):
        names = {v: str(name.get(v, f"Segment_{v}")) for v in values}
    elif len(values) == 1:
        names = {values[0]: str(name)}
    else:
        names = {v: f"{name}_{v}" for v in values}
    rgb = tuple(float(c) for c in (color if color is not None else _DEFAULT_SEGMENT_COLOR))
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise SAMMed3DError(f"segment color must be 3 numbers in 0..1, got {color!r}.")
    meta = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for n, v in enumerate(values):
        idx = np.nonzero(data == v)
        if idx[0].size:
            extent = " ".join(f"{int(a.min())} {int(a.max())}" for a in idx)
        else:
            extent = "0 -1 0 -1 0 -1"
        meta.update(
            {
                f"Segment{n}_ID": f"Segment_{v}",
                f"Segment{n}_Name": names[v],
                f"Segment{n}_NameAutoGenerated": "0",
                f"Segment{n}_LabelValue": str(v),
                f"Segment{n}_Layer": "0",
                f"Segment{n}_Extent": extent,
                f"Segment{n}_Color": " ".join(f"{c:.6f}" for c in rgb),
                f"Segment{n}_ColorAutoGenerated": "0" if color is not None else "1",
                f"Segment{n}_Tags": "Segmentation.Status:inprogress|",
            }
        )
    return meta


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
    affine is ``affine @ P``. Axes are matched greedily in original-axis order to the world axis
    their (orthogonalised) direction is closest to, as nibabel's ``io_orientation`` does."""
    aff = _check_affine(affine)
    lin = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)[None, :]
    u, _, vt = np.linalg.svd(lin)
    rot = u @ vt  # nearest orthogonal matrix (removes shear)
    free_world = [True, True, True]
    axes = [-1, -1, -1]
    flips = [False, False, False]
    for src_axis in range(3):
        col = np.abs(rot[:, src_axis]) * np.asarray(free_world, dtype=float)
        world = int(np.argmax(col))
        free_world[world] = False
        axes[world] = src_axis
        flips[world] = bool(rot[world, src_axis] < 0)
    P = np.zeros((4, 4))
    P[3, 3] = 1.0
    for a in range(3):
        c = axes[a]
        if flips[a]:
            P[c, a] = -1.0
            P[c, 3] = float(shape[c] - 1)
        else:
            P[c, a] = 1.0
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
        return _apply(np.linalg.inv(self.affine), _as_points(points, "RAS points"))

    def index_to_ras(self, points) -> np.ndarray:
        """Prepared-grid indices (..., 3) -> RAS mm (..., 3)."""
        return _apply(self.affine, _as_points(points, "prepared indices"))

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


def _resample_linear_1d(x: torch.Tensor, axis: int, coords: np.ndarray) -> torch.Tensor:
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

    fill = _check_voxels(volume.array, "the volume")
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
            x = _resample_linear_1d(x, axes[a], sample)
        index = [slice(None)] * 3
        index[chunk_axis] = slice(m0, m1)
        out[tuple(index)] = x.permute(*axes).numpy()
    return PreparedVolume(array=out, affine=affine, source=volume, is_ct=bool(ct))


def _sample_grid(
    data: torch.Tensor,
    out_to_in: np.ndarray,
    out_start: Sequence[int],
    out_shape: Sequence[int],
    mode: str,
) -> torch.Tensor:
    """Sample 3D ``data`` at the points ``out_to_in @ (out_start + index)`` for every index of an
    ``out_shape`` grid, with ``grid_sample`` (align_corners=False, border padding), in chunks.
    Returns a tensor of ``out_shape`` and a boolean tensor telling which points fell inside
    ``data``'s extent ([-0.5, n - 0.5] per axis)."""
    dev = data.device
    n_in = np.asarray(data.shape[-3:], dtype=np.float64)
    lin = torch.as_tensor(out_to_in[:3, :3], dtype=torch.float64, device=dev)
    off = torch.as_tensor(out_to_in[:3, 3], dtype=torch.float64, device=dev)
    nin = torch.as_tensor(n_in, dtype=torch.float64, device=dev)
    inp = data.reshape(1, 1, *data.shape[-3:]).float()
    out = torch.empty(tuple(int(s) for s in out_shape), dtype=torch.float32, device=dev)
    inside = torch.empty(out.shape, dtype=torch.bool, device=dev)
    plane = max(1, int(out_shape[1]) * int(out_shape[2]))
    rows = max(1, _CHUNK_VOXELS // plane)
    j = torch.arange(out_shape[1], dtype=torch.float64, device=dev) + out_start[1]
    k = torch.arange(out_shape[2], dtype=torch.float64, device=dev) + out_start[2]
    for r0 in range(0, int(out_shape[0]), rows):
        r1 = min(int(out_shape[0]), r0 + rows)
        i = torch.arange(r0, r1, dtype=torch.float64, device=dev) + out_start[0]
        pts = (
            lin[:, 0].view(1, 1, 1, 3) * i.view(-1, 1, 1, 1)
            + lin[:, 1].view(1, 1, 1, 3) * j.view(1, -1, 1, 1)
            + lin[:, 2].view(1, 1, 1, 3) * k.view(1, 1, -1, 1)
            + off.view(1, 1, 1, 3)
        )  # (ri, nj, nk, 3): input indices in data's axis order
        eps = 1e-6
        inside[r0:r1] = ((pts >= -0.5 - eps) & (pts <= nin - 0.5 + eps)).all(dim=-1)
        norm = (2.0 * pts + 1.0) / nin - 1.0
        grid = norm.flip(-1).to(torch.float32).unsqueeze(0)  # grid_sample wants (x=W, y=H, z=D)
        out[r0:r1] = F.grid_sample(
            inp, grid, mode=mode, padding_mode="border", align_corners=False
        )[0, 0]
    return out, inside


def prepare_label(label_array, volume: Volume, prepared: PreparedVolume) -> np.ndarray:
    """Resample a label map on ``volume``'s grid onto the prepared grid (nearest neighbour).

    Returns an array of ``prepared.shape`` with the label's dtype."""
    if isinstance(label_array, torch.Tensor):
        lab = label_array.detach().cpu().numpy()
    else:
        lab = np.asarray(label_array)
    if lab.shape != volume.shape:
        raise SAMMed3DError(
            f"the label has shape {lab.shape} but its volume has shape {volume.shape}; the label "
            "must be on the volume's grid."
        )
    to_src = np.linalg.inv(volume.affine) @ prepared.affine  # prepared index -> label index
    amap = _axis_map(to_src)
    if amap is not None:
        axes, scales, offsets = amap
        idx = [None, None, None]
        for a in range(3):
            c = scales[a] * np.arange(prepared.shape[a], dtype=np.float64) + offsets[a]
            n = volume.shape[axes[a]]
            idx[axes[a]] = np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp)
        return np.ascontiguousarray(lab[np.ix_(*idx)].transpose(*axes))
    # General (rotated) relation between the grids: nearest-neighbour grid_sample.
    if lab.dtype.kind not in "biu" or (lab.size and int(np.abs(lab).max()) >= 2**24):
        raise SAMMed3DError(
            "labels on a grid rotated relative to the prepared grid must be integers below 2**24."
        )
    data = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))
    out, _ = _sample_grid(data, to_src, (0, 0, 0), prepared.shape, mode="nearest")
    return out.numpy().astype(lab.dtype)


# --------------------------------------------------------------------------- windows


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
    pt = _as_points(ras_point, "the point").reshape(-1, 3)
    if pt.shape[0] != 1:
        raise SAMMed3DError(f"window_for_point takes one point, got {pt.shape[0]}.")
    idx = prepared.ras_to_index(pt)[0]
    shape = np.asarray(prepared.shape)
    if np.any(idx < -0.5 - 1e-6) or np.any(idx > shape - 0.5 + 1e-6):
        raise SAMMed3DError(
            f"the point {pt[0].round(2).tolist()} (RAS mm) lies outside the volume; place it on "
            "the image."
        )
    return _window_at(idx, size)


def window_for_box(
    prepared: PreparedVolume, ras_min, ras_max, size: int = WINDOW_SIZE
) -> Window:
    """The window centred on the centre of the RAS box [ras_min, ras_max] (corners in any
    order). The box must overlap the volume."""
    _check_prepared(prepared)
    lo = _as_points(ras_min, "box corner").reshape(3)
    hi = _as_points(ras_max, "box corner").reshape(3)
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
    values = values.double()
    mean = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else 0.0
    if not math.isfinite(std) or std < 1e-8:
        std = 1.0
    out -= mean
    out /= std
    return out


def ras_to_window(prepared: PreparedVolume, window: Window, ras_points) -> np.ndarray:
    """RAS points (N, 3) -> fractional voxel indices in the window (window axis order), the
    model's point convention."""
    _check_prepared(prepared)
    pts = _as_points(ras_points, "RAS points").reshape(-1, 3)
    return prepared.ras_to_index(pts) - np.asarray(window.start, dtype=np.float64)


def region_bbox(prepared: PreparedVolume, window: Window):
    """The box of original-grid voxels whose centres lie inside the window, clipped to the volume:
    ``(start, stop)`` index triples (stop exclusive; stop == start on an axis if empty)."""
    _check_prepared(prepared)
    to_src = np.linalg.inv(prepared.source_to_prepared())  # prepared index -> source index
    lo = np.asarray(window.start, dtype=np.float64) - 0.5
    hi = lo + window.size
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    src = _apply(to_src, corners)
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
    amap = _axis_map(src_to_win) if method == "auto" else None
    if amap is not None:
        # Trilinear = three 1D linear passes; border clamping as grid_sample's "border" padding.
        axes, scales, offsets = amap  # window axis axes[r] = scales[r] * original[r] + offsets[r]
        x = t
        for r in sorted(range(3), key=lambda r: shape[r] / s):
            c = scales[r] * (np.arange(shape[r], dtype=np.float64) + start[r]) + offsets[r]
            x = _resample_linear_1d(x, axes[r], c)
        mask = x.permute(*axes) > float(threshold)
    else:
        values, inside = _sample_grid(t, src_to_win, start, shape, mode="bilinear")
        mask = (values > float(threshold)) & inside
    return mask.cpu().numpy(), start
