"""MRML geometry: a volume node's voxels and its voxel -> world RAS matrix (parent transforms
hardened; only linear ones), as the engine's ``Volume``."""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from .engine import make_volume, user_error


def numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    """A 4x4 array as a vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s local RAS to world RAS (identity without a parent transform).

    Raises a clear error for a non-linear parent transform: the engine works on a regular grid."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise user_error(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}', which this module "
            "cannot follow. Harden the transform on the volume first (Data module: right-click the transform > "
            "'Harden transform'), or remove it, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return numpy_matrix(matrix)


def ijk_to_world(volume_node) -> np.ndarray:
    """The volume's voxel index (i, j, k) -> world RAS (mm) matrix, parent transforms included."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ numpy_matrix(matrix)


def volume_image(volume_node):
    """The node's vtkImageData, checked: present, non-empty, one scalar component."""
    if volume_node is None:
        raise user_error("No input volume is selected. Choose the volume to segment.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise user_error(f"The volume '{volume_node.GetName()}' has no voxels loaded. Load the image again.")
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise user_error(f"The volume '{volume_node.GetName()}' is empty ({dims[0]}x{dims[1]}x{dims[2]} voxels).")
    if image.GetNumberOfScalarComponents() != 1:
        raise user_error(
            f"The volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel "
            "(colour or vector image). Convert it to a scalar volume first (Vector to Scalar Volume module)."
        )
    return image


def array_kji(volume_node) -> np.ndarray:
    """The voxels as a numpy view ``[k, j, i]`` on the node's memory (no copy), as
    ``slicer.util.arrayFromVolume`` gives them."""
    image = volume_image(volume_node)
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def volume_key(volume_node) -> tuple:
    """What a session depends on: the node, its voxels (modified time) and its world geometry."""
    image = volume_image(volume_node)
    scalars = image.GetPointData().GetScalars()
    return (
        volume_node.GetID(),
        max(image.GetMTime(), scalars.GetMTime()),
        tuple(np.round(ijk_to_world(volume_node), 9).ravel()),
    )


def volume_from_node(volume_node):
    """The engine's ``Volume`` for a volume node: a copy of the voxels (the worker thread reads
    them while the user may edit the node) and the world IJK-to-RAS matrix."""
    return make_volume(np.array(array_kji(volume_node), copy=True), ijk_to_world(volume_node))
