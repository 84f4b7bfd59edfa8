"""Results into segments: voxel extents, masks as ``vtkOrientedImageData``, a segment read back
on a grid, the segmentation's own grid, and locked segments."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .engine import user_error
from .geometry import numpy_matrix, vtk_matrix

LOCK_TAG = "SAMMed3DMoE.Locked"
"""Segment tag that marks a segment as locked: this module never writes into it or clears it."""

Extent = Tuple[int, int, int, int, int, int]  # (i0, i1, j0, j1, k0, k1), inclusive, as VTK


def mask_extent(region: Optional[np.ndarray], offset: Sequence[int]) -> Optional[Extent]:
    """The inclusive extent of the True voxels of ``region`` placed at ``offset`` (None if none)."""
    if region is None or not region.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(region.any(axis=other))
        lo.append(int(hits[0]) + int(offset[axis]))
        hi.append(int(hits[-1]) + int(offset[axis]))
    return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


def union_extent(a: Optional[Extent], b: Optional[Extent]) -> Optional[Extent]:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(min(a[n], b[n]) if n % 2 == 0 else max(a[n], b[n]) for n in range(6))


def extent_shape_kji(extent: Extent) -> Tuple[int, int, int]:
    return (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)


def mask_on_extent(region: Optional[np.ndarray], offset: Sequence[int], extent: Extent) -> np.ndarray:
    """``region`` pasted into an all-zero uint8 ``[k, j, i]`` array covering ``extent``."""
    out = np.zeros(extent_shape_kji(extent), dtype=np.uint8)
    if region is None:
        return out
    lo = np.array(extent[0::2])
    hi = np.array(extent[1::2]) + 1
    src_lo = np.maximum(lo - np.asarray(offset), 0)
    src_hi = np.minimum(hi - np.asarray(offset), region.shape)
    if np.any(src_hi <= src_lo):
        return out
    piece = region[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    dst_lo = np.asarray(offset) + src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[2]:dst_hi[2], dst_lo[1]:dst_hi[1], dst_lo[0]:dst_hi[0]] = piece.transpose(2, 1, 0)
    return out


def oriented_image(mask_kji: np.ndarray, extent: Extent, image_to_world: np.ndarray):
    """A uint8 ``vtkOrientedImageData`` with ``extent`` and geometry ``image_to_world``."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(mask_kji, np.uint8).ravel()
    image.SetImageToWorldMatrix(vtk_matrix(image_to_world))
    return image


def segment_on_grid(segmentation_node, segment_id: str, extent: Extent, image_to_world: np.ndarray) -> np.ndarray:
    """The segment's voxels resampled (nearest neighbour) onto a grid: uint8 ``[k, j, i]``."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    out = np.zeros(extent_shape_kji(extent), dtype=np.uint8)
    own = labelmap.GetExtent()
    if own[0] > own[1] or own[2] > own[3] or own[4] > own[5]:
        return out
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*extent)
    reference.SetImageToWorldMatrix(vtk_matrix(image_to_world))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled, False)
    got = resampled.GetExtent()
    if got[0] > got[1] or got[2] > got[3] or got[4] > got[5]:
        return out
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(extent_shape_kji(got))
    lo = np.array(extent[0::2])
    g = np.array(got[0::2]) - lo
    out[g[2]:g[2] + values.shape[0], g[1]:g[1] + values.shape[1], g[0]:g[0] + values.shape[2]] = values > 0
    return out


def reference_geometry(segmentation_node) -> Optional[np.ndarray]:
    """The segmentation's labelmap grid (its reference image geometry, IJK to segmentation RAS),
    or None when it has none yet (the first write then sets it)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentation_node.GetSegmentation().GetConversionParameter(name)
    if not text:
        return None
    matrix = vtk.vtkMatrix4x4()
    extent = [0, -1, 0, -1, 0, -1]
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, matrix, extent):
        return None
    return numpy_matrix(matrix)


def on_reference_geometry(image, reference: Optional[np.ndarray]):
    """``image`` on the segmentation's grid (nearest neighbour) when its own grid differs (a
    segmentation made on another volume, or oversampled), so the Segment Editor's masks, which
    live on that grid, apply; returns (image, its extent)."""
    if reference is not None:
        probe = slicer.vtkOrientedImageData()
        probe.SetImageToWorldMatrix(vtk_matrix(reference))
        if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, probe):
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceGeometry(
                image, vtk_matrix(reference), resampled, False)
            image = resampled
    return image, tuple(image.GetExtent())


def is_segment_locked(segmentation_node, segment_id: str) -> bool:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    value = vtk.reference("")
    return bool(segment is not None and segment.GetTag(LOCK_TAG, value) and str(value) == "1")


def set_segment_locked(segmentation_node, segment_id: str, locked: bool) -> None:
    """Lock (or unlock) a segment: this module then never writes into it, clears it or lets a
    new segment overwrite it, whatever the overwrite mode."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise user_error(f"No segment '{segment_id}' in '{segmentation_node.GetName()}'.")
    if locked:
        segment.SetTag(LOCK_TAG, "1")
    else:
        segment.RemoveTag(LOCK_TAG)


def clip_extent(extent: Extent, dims: Sequence[int]) -> Extent:
    return (max(extent[0], 0), min(extent[1], dims[0] - 1), max(extent[2], 0), min(extent[3], dims[1] - 1),
            max(extent[4], 0), min(extent[5], dims[2] - 1))
