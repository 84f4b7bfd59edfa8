"""Reading images and writing masks, in the library's RAS convention.

Files are read with SimpleITK (NIfTI, NRRD, MetaImage, DICOM series), whose LPS origin and
direction are converted to the RAS affine of :class:`~SAMMed3DMoELib.geometry.Volume`:
``affine = diag(-1, -1, 1, 1) @ affine_LPS``. Masks are written on exactly a reference grid, as
NIfTI, NRRD or a 3D Slicer segmentation (``.seg.nrrd``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import SAMMed3DError, exception_text
from .geometry import Volume, check_voxels

PathLike = Union[str, "os.PathLike[str]"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sitk():
    import SimpleITK as sitk  # imported lazily: only file I/O needs it

    return sitk


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise SAMMed3DError(
            f"could not scan the folder {folder} for DICOM files ({exception_text(exc)}); "
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
            f"could not read the DICOM series in {folder} ({exception_text(exc)}); check that the "
            "files are complete and belong to one 3D series."
        ) from None


def _sanitize(arr: np.ndarray, name: str) -> None:
    """:func:`check_voxels`, then replace NaN/inf voxels in place."""
    fill = check_voxels(arr, name)
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
                f"could not read {p} as an image ({exception_text(exc)}): the file is corrupt, "
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
    try:
        if kind == ".seg.nrrd":
            _write_segmentation(p, data, lps, name, color)
        else:
            sitk = _sitk()
            image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
            image.SetSpacing([float(s) for s in spacing])
            image.SetOrigin([float(v) for v in lps[:3, 3]])
            image.SetDirection([float(v) for v in direction.ravel()])
            sitk.WriteImage(image, str(p), True)
    except (RuntimeError, OSError) as exc:
        raise SAMMed3DError(
            f"could not write {p} ({exception_text(exc)}); check the folder is writable and the "
            "disk not full."
        ) from None
    return p


def _write_segmentation(path: Path, data: np.ndarray, ijk_to_lps: np.ndarray, name, color) -> None:
    """A 3D Slicer segmentation file, written by ``slicerio`` (maintained with 3D Slicer; it
    writes the segment fields Slicer reads: ID, name, color, label value, layer, extent): one
    segment per label value present, or one empty segment for an empty mask."""
    import slicerio

    values = [int(v) for v in np.unique(data) if v != 0] or [1]
    if isinstance(name, Mapping):
        names = {v: str(name.get(v, f"Segment_{v}")) for v in values}
    elif len(values) == 1:
        names = {values[0]: str(name)}
    else:
        names = {v: f"{name}_{v}" for v in values}
    rgb = [float(c) for c in (color if color is not None else _DEFAULT_SEGMENT_COLOR)]
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise SAMMed3DError(f"segment color must be 3 numbers in 0..1, got {color!r}.")
    segmentation = slicerio.create_segmentation(data.shape, ijk_to_lps)
    for value in values:
        slicerio.add_segment(segmentation, data == value, {
            "id": f"Segment_{value}", "name": names[value], "nameAutoGenerated": False, "color": rgb,
            "colorAutoGenerated": color is None, "tags": {"Segmentation.Status": "inprogress"},
        })
    slicerio.write_segmentation(os.fspath(path), segmentation)
