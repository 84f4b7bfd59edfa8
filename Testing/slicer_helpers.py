"""Helpers for the Slicer-module tests: real MRML scenes from the ``slicer-core`` wheel.

``slicer-core`` gives Slicer's MRML, Markups and Segmentations logic without the application
(no Qt, no ``slicer.app``, no ``slicer.mrmlScene``). Two gaps are filled here, and only here:
segmentation converter rules and subject hierarchy items exist only once the Segmentations and
Subject Hierarchy module logics have been created and given the scene and a data node gets its
hierarchy item when added (Slicer's application and its Qt plugins do that), and the module folder (``SAMMed3DMoE/``) is put on ``sys.path`` as Slicer does
for a scripted module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parent.parent / "SAMMed3DMoE"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402


def new_scene():
    """A real MRML scene with the module logics Slicer's application attaches at startup:
    Subject Hierarchy (items for data nodes) and Segmentations (converter rules)."""
    scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSubjectHierarchyModuleLogic(), slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(scene)
    scene._module_logics = logics  # keep them alive with the scene

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def add_item(caller, event, node):
        # what Slicer's subject hierarchy plugins (Qt) do for every new data node
        hierarchy = scene.GetSubjectHierarchyNode()
        if node.IsA("vtkMRMLDisplayableNode") and not node.GetHideFromEditors() and not hierarchy.GetItemByDataNode(node):
            hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)

    scene.AddObserver(scene.NodeAddedEvent, add_item)
    scene._add_item = add_item
    return scene


def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def add_volume(scene, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str = "CT", transform_node=None):
    """A scalar volume node holding ``array_ijk`` (indexed [i, j, k]) with the given IJK-to-RAS."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    image.AllocateScalars(numpy_support.get_vtk_array_type(array_ijk.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(array_ijk.transpose(2, 1, 0)).ravel()
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    if transform_node is not None:
        node.SetAndObserveTransformNodeID(transform_node.GetID())
    return node


def add_linear_transform(scene, to_parent: np.ndarray, name: str = "T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(vtk_matrix(to_parent))
    return node


def add_points(scene, name: str, world_points=(), transform_node=None):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if transform_node is not None:
        node.SetAndObserveTransformNodeID(transform_node.GetID())
    for p in world_points:
        index = node.AddControlPoint(vtk.vtkVector3d(0, 0, 0))
        node.SetNthControlPointPositionWorld(index, *[float(v) for v in p])
    return node


def add_roi(scene, ras_min, ras_max, name: str = "Box"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    set_roi(node, ras_min, ras_max)
    return node


def set_roi(node, ras_min, ras_max) -> None:
    lo, hi = np.asarray(ras_min, float), np.asarray(ras_max, float)
    node.SetCenter(*((lo + hi) / 2))
    node.SetSize(*(hi - lo))


def segment_mask_kji(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a bool [k, j, i] array on the volume's grid, read WITHOUT resampling: the
    segment's labelmap must lie on the volume's voxel grid (same IJK-to-RAS; this fails if not)."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    dims = volume_node.GetImageData().GetDimensions()
    out = np.zeros(dims[::-1], dtype=bool)
    extent = labelmap.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return out
    got, want = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(got)
    volume_node.GetIJKToRASMatrix(want)
    got_a = np.array([[got.GetElement(r, c) for c in range(4)] for r in range(4)])
    want_a = np.array([[want.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(got_a, want_a, atol=1e-6), f"segment grid {got_a.tolist()} is not the volume's grid {want_a.tolist()}"
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    values = values.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    lo = [max(extent[0], 0), max(extent[2], 0), max(extent[4], 0)]
    hi = [min(extent[1], dims[0] - 1), min(extent[3], dims[1] - 1), min(extent[5], dims[2] - 1)]
    out[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = values[
        lo[2] - extent[4]:hi[2] - extent[4] + 1, lo[1] - extent[2]:hi[1] - extent[2] + 1,
        lo[0] - extent[0]:hi[0] - extent[0] + 1] > 0  # this segment alone, as 0/1
    return out


def add_label_segment(segmentation_node, mask_ijk: np.ndarray, volume_node, name: str) -> str:
    """A segment made from a bool [i, j, k] mask on the volume's grid (e.g. a reference label)."""
    segmentation = segmentation_node.GetSegmentation()
    image = slicer.vtkOrientedImageData()
    dims = mask_ijk.shape
    image.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(
        mask_ijk.transpose(2, 1, 0), dtype=np.uint8).ravel()
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetLabelValue(1)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    segment_id = segmentation.GenerateUniqueSegmentID(name)
    assert segmentation.AddSegment(segment, segment_id)
    return segment_id
