"""The module's self-test scenario, on MRML only: a synthetic volume (a bright sphere in noise),
a tiny SAM-Med3D with random weights (no download, CPU), one click, one undo.

Slicer runs it from ``SAMMed3DMoETest`` (the module's ScriptedLoadableModuleTest); the pytest
suite runs the same function on a ``slicer-core`` scene, so the scenario is checked outside
Slicer too. Needs PyTorch (imported when called).
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from SAMMed3DMoELogic import SAMMed3DMoELogic, array_kji, ijk_to_world, segment_on_grid

TINY_NETWORK = dict(
    img_size=64, patch_size=16, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=4,
    encoder_global_attn_indexes=(1,), window_size=6, prompt_embed_dim=48, decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def tiny_random_model(seed: int = 0):
    """A 64^3-window SAM-Med3D with random weights, wrapped as the engine's mixture (no experts)."""
    import torch

    from SAMMed3DMoELib.model import build_sam_med3d
    from SAMMed3DMoELib.moe import SamMed3DMoE

    torch.manual_seed(seed)
    return SamMed3DMoE(build_sam_med3d(**TINY_NETWORK)).eval()


def synthetic_volume(scene, size: int = 48, spacing: float = 2.0):
    """A scalar volume node: a sphere of +300 in N(0, 20) noise, ``size``^3 voxels."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:size, :size, :size]
    centre = (size - 1) / 2
    sphere = (i - centre) ** 2 + (j - centre) ** 2 + (k - centre) ** 2 < (size / 5) ** 2
    voxels = (rng.normal(0, 20, sphere.shape) + 300 * sphere).astype(np.int16)
    image = vtk.vtkImageData()
    image.SetDimensions(size, size, size)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SAM-Med3D-MoE self-test sphere")
    node.SetAndObserveImageData(image)
    node.SetSpacing(spacing, spacing, spacing)
    return node


def run(scene, log=print) -> None:
    """One click on the sphere writes a segment on the volume's grid; one undo empties it and
    takes the click back. Raises AssertionError with what went wrong."""
    log("Synthetic volume: a bright sphere in noise")
    volume = synthetic_volume(scene)
    logic = SAMMed3DMoELogic(scene)
    try:
        logic.set_model(tiny_random_model(), "tiny random weights")
        logic.device = "cpu"
        logic.max_windows = 1
        nodes = logic.create_prompt_nodes()
        target = logic.new_target(volume)
        centre = (np.array(array_kji(volume).shape[::-1]) - 1) / 2
        nodes.positive.AddControlPoint(*(ijk_to_world(volume) @ np.append(centre, 1))[:3])

        log("One click, tiny random-weight model")
        result = logic.segment(volume, target, nodes, timeout=120)
        assert result.state == "applied", f"the click was not written: {result.state} {result.message}"
        dims = array_kji(volume).shape[::-1]
        everything = (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        grid = ijk_to_world(volume)
        written = segment_on_grid(target.segmentation, target.segment_id, everything, grid)
        assert written.any(), "the click wrote nothing"

        log("One undo restores the empty segment and the prompts")
        assert logic.undo(nodes), "nothing to undo"
        assert not segment_on_grid(target.segmentation, target.segment_id, everything, grid).any(), \
            "undo left voxels in the segment"
        assert nodes.positive.GetNumberOfControlPoints() == 0, "undo did not take the click back"
    finally:
        logic.cleanup()
    log("Self-test passed")
