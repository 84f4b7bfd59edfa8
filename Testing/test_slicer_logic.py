"""The Slicer module's Logic on real MRML (the ``slicer-core`` wheel), the real example CT and its
reference labels, and the engine's real network (tiny random weights, or weights chosen so the
mask is known: ``tiny_models.constant_mask_decoder``).

Stand-ins, and why: the Slicer application cannot run here, so there is no ``slicer.mrmlScene``
(each test makes a scene and gives it to the Logic) and no Qt timer (the tests call
``logic.poll()`` or ``logic.wait()`` as the Widget's timer would). Converter rules come from a
real ``vtkSlicerSegmentationsModuleLogic`` (see ``slicer_helpers``).
"""

from __future__ import annotations

import ast
import json
import math
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import vtk

from slicer_helpers import (
    add_label_segment,
    add_linear_transform,
    add_points,
    add_roi,
    add_volume,
    new_scene,
    segment_mask_kji,
    set_roi,
)
from tiny_models import constant_mask_decoder, tiny_moe, tiny_sam

import slicer  # noqa: E402  (slicer-core)
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session

import SAMMed3DMoELogic as L  # noqa: E402  (the module folder is on sys.path via slicer_helpers)

LIVER, KIDNEY_RIGHT = 5, 2


@pytest.fixture(scope="module")
def ct(data_dir):
    image = nib.load(data_dir / "example_ct.nii.gz")
    labels = nib.load(data_dir / "example_ct_seg.nii.gz")
    names = json.loads((data_dir / "example_ct_seg_labels.json").read_text())
    assert names[str(LIVER)]["name"] == "liver"
    return np.asarray(image.dataobj).astype(np.int16), image.affine, np.asarray(labels.dataobj)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.fixture(scope="module")
def random_model():
    return tiny_moe(seed=3)


@pytest.fixture(scope="module")
def box_model():
    """Known mask: every voxel of the window is inside (constant positive logits), and no box
    embedding, so a box limits the mask to itself (the engine's box emulation)."""
    base = tiny_sam(seed=1, box_prompts=False)
    constant_mask_decoder(base.mask_decoder, 8.0)
    return SamMed3DMoE(base).eval()


def _logic(scene, model, max_windows=1):
    logic = L.SAMMed3DMoELogic(scene)
    logic.set_model(model, "test")
    logic.device = "cpu"
    logic.max_windows = max_windows
    return logic


def _engine_mask(model, array_ijk, world_affine, click_ras, max_windows=1) -> np.ndarray:
    """What the engine itself gives for one positive click: bool [k, j, i] on the grid."""
    session = Session(Volume(array_ijk, world_affine), model, device="cpu", max_windows=max_windows)
    session.add_point(click_ras)
    result = session.predict()
    return result.full_mask(array_ijk.shape).transpose(2, 1, 0)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    m = np.eye(4)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def _flip_ij(shape) -> np.ndarray:
    """Index map of an array stored with i and j reversed (an LPS-stored copy of a RAS scan)."""
    f = np.eye(4)
    f[0, 0], f[0, 3] = -1, shape[0] - 1
    f[1, 1], f[1, 3] = -1, shape[1] - 1
    return f


# ---------------------------------------------------------------------------------------------
# Geometry: RAS, LPS, oblique, parent transform
# ---------------------------------------------------------------------------------------------


def _imports(tree, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_logic_imports_only_mrml_vtk_and_the_engine_lazily():
    """The Logic needs no Qt, no slicer.util and no ScriptedLoadableModule (so it runs headless and
    in Slicer scripts), and imports the engine (PyTorch) only when a model or session is needed,
    so the module can load before the dependencies are installed."""
    package = Path(L.__file__).parent
    files = sorted(package.glob("*.py"))
    assert [f.name for f in files] == ["__init__.py", "engine.py", "geometry.py", "logic.py", "prompts.py", "segments.py"]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        everywhere = _imports(tree, top_level_only=False)
        assert not [n for n in everywhere if n.split(".")[0] in ("qt", "ctk") or n.startswith(("slicer.util", "slicer.Scripted"))]
        top = _imports(tree, top_level_only=True)
        assert not [n for n in top if n.startswith(("torch", "SAMMed3DMoELib"))], (path.name, top)
        if path.name != "engine.py":  # the one adapter to the engine
            assert not [n for n in everywhere if n.startswith("SAMMed3DMoELib")], (path.name, everywhere)
    assert "qt" not in sys.modules and "slicer.ScriptedLoadableModule" not in sys.modules


@pytest.mark.parametrize("layout", ["ras", "lps", "oblique", "parent_transform"])
def test_segment_lies_on_the_volume_grid_where_the_engine_mask_is(ct, random_model, layout):
    """One positive point placed in RAS on the liver: the segment is written on the volume's own
    voxel grid, exactly where the engine's mask is (the engine run directly on the same voxels and
    world IJK-to-RAS), for a RAS-stored, an LPS-stored, an oblique volume and one under a linear
    parent transform. All four are the same anatomy, so their masks agree voxel for voxel."""
    array, affine, labels = ct
    liver_ijk = np.round(_centroid(labels == LIVER)).astype(int)
    click_ras = (affine @ np.append(liver_ijk, 1))[:3]

    scene = new_scene()
    transform = None
    if layout == "ras":
        stored, local = array, affine
    elif layout == "lps":
        flip = _flip_ij(array.shape)
        stored, local = array[::-1, ::-1, :], affine @ flip
        assert np.allclose(local @ flip @ np.append(liver_ijk, 1), affine @ np.append(liver_ijk, 1))
        assert local[0, 0] < 0 and local[1, 1] < 0  # indices run toward L and P
    elif layout == "oblique":
        centre = affine @ np.append(np.array(array.shape) / 2, 1)
        rotate = np.eye(4)
        rotate[:3, 3] = centre[:3]
        rotate = rotate @ _rotation(2, 20) @ _rotation(0, 10)
        rotate[:3, 3] -= (rotate[:3, :3] @ centre[:3])
        stored, local = array, rotate @ affine
        click_ras = (local @ np.append(liver_ijk, 1))[:3]  # the same voxel, now at oblique RAS
    else:
        to_world = _rotation(1, 30)
        to_world[:3, 3] = (12.0, -40.0, 7.5)
        transform = add_linear_transform(scene, to_world)
        stored, local = array, affine
        click_ras = (to_world @ affine @ np.append(liver_ijk, 1))[:3]  # placed in world RAS

    volume = add_volume(scene, stored, local, transform_node=transform)
    world = L.ijk_to_world(volume)
    logic = _logic(scene, random_model)
    target = logic.new_target(volume)
    assert target.segmentation.GetTransformNodeID() == volume.GetTransformNodeID()
    nodes = L.PromptNodes(positive=add_points(scene, "P", [click_ras]))
    result = logic.segment(volume, target, nodes, timeout=60)
    assert result.state == "applied", result.message

    got = segment_mask_kji(target.segmentation, target.segment_id, volume)
    expected = _engine_mask(random_model, stored, world, click_ras)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(got, expected)
    # the same anatomy: back in the RAS-stored layout the mask is the same
    reference = _engine_mask(random_model, array, affine, (affine @ np.append(liver_ijk, 1))[:3])
    as_ras_stored = got[:, ::-1, ::-1] if layout == "lps" else got
    np.testing.assert_array_equal(as_ras_stored, reference)
    logic.cleanup()


def test_non_linear_parent_transform_is_refused_with_advice(ct, random_model):
    array, affine, _ = ct
    scene = new_scene()
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume = add_volume(scene, array, affine, transform_node=grid)
    logic = _logic(scene, random_model)
    target = logic.new_target(volume)
    nodes = L.PromptNodes(positive=add_points(scene, "P", [affine[:3, 3] + 60]))
    with pytest.raises(SAMMed3DError, match="non-linear transform 'warp'.*Harden"):
        logic.request(volume, target, nodes)
    logic.cleanup()


# ---------------------------------------------------------------------------------------------
# Segment Editor settings: overwrite, editable area, intensity mask, locked segments, undo
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def liver_scene(ct, box_model):
    """The CT, a finished 'liver' segment from the reference labels, and a click whose window
    (a known box, ``box_model``) overlaps the liver's edge."""
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = _logic(scene, box_model)
    target = logic.new_target(volume)
    liver_mask = labels == LIVER
    liver_id = add_label_segment(target.segmentation, liver_mask, volume, "liver")
    ijk = np.argwhere(liver_mask)
    edge = ijk[ijk[:, 0].argmax()]  # the liver's voxel furthest toward +i (left)
    click = (affine @ np.append(edge, 1))[:3]
    nodes = L.PromptNodes(positive=add_points(scene, "P", [click]))
    window = _engine_mask(box_model, array, affine, click)
    liver_kji = liver_mask.transpose(2, 1, 0)
    assert window.any() and (window & liver_kji).any() and (window & ~liver_kji).any()
    yield dict(scene=scene, volume=volume, logic=logic, target=target, liver_id=liver_id, nodes=nodes,
               window=window, liver=liver_kji, array_kji=array.transpose(2, 1, 0))
    logic.cleanup()


def _masks(s):
    seg = s["target"].segmentation
    return (segment_mask_kji(seg, s["target"].segment_id, s["volume"]),
            segment_mask_kji(seg, s["liver_id"], s["volume"]))


def _editor(s):
    return s["logic"].segment_editor_node()


def test_overwrite_none_leaves_a_finished_neighbour_untouched(liver_scene):
    s = liver_scene
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, liver = _masks(s)
    np.testing.assert_array_equal(new, s["window"])
    np.testing.assert_array_equal(liver, s["liver"])


def test_overwrite_all_clips_the_neighbour_and_one_undo_restores_every_segment(liver_scene):
    s = liver_scene
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, liver = _masks(s)
    np.testing.assert_array_equal(new, s["window"])
    np.testing.assert_array_equal(liver, s["liver"] & ~s["window"])

    assert s["logic"].undo(s["nodes"])
    new, liver = _masks(s)
    assert not new.any()
    np.testing.assert_array_equal(liver, s["liver"])
    assert s["nodes"].positive.GetNumberOfControlPoints() == 0  # the prompts went back too

    assert s["logic"].redo(s["nodes"])
    new, liver = _masks(s)
    np.testing.assert_array_equal(new, s["window"])
    np.testing.assert_array_equal(liver, s["liver"] & ~s["window"])
    assert s["nodes"].positive.GetNumberOfControlPoints() == 1


def test_overwrite_visible_spares_a_hidden_neighbour(liver_scene):
    s = liver_scene
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    s["target"].segmentation.GetDisplayNode().SetSegmentVisibility(s["liver_id"], False)
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, liver = _masks(s)
    np.testing.assert_array_equal(new, s["window"])
    np.testing.assert_array_equal(liver, s["liver"])


@pytest.mark.parametrize("area", ["outside_all", "inside_liver"])
def test_editable_area_is_honoured(liver_scene, area):
    s = liver_scene
    editor = _editor(s)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    if area == "outside_all":
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
        expected = s["window"] & ~s["liver"]
    else:
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor.SetMaskSegmentID(s["liver_id"])
        expected = s["window"] & s["liver"]
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, liver = _masks(s)
    assert expected.any()
    np.testing.assert_array_equal(new, expected)
    np.testing.assert_array_equal(liver, s["liver"])


def test_intensity_mask_is_honoured(liver_scene):
    s = liver_scene
    editor = _editor(s)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(0.0, 200.0)
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, _ = _masks(s)
    hu = s["array_kji"]
    expected = s["window"] & (hu >= 0) & (hu <= 200)
    assert expected.any() and (s["window"] & ~expected).any()
    np.testing.assert_array_equal(new, expected)


def test_segmentation_on_a_finer_grid_gets_the_same_mask(liver_scene):
    """A segmentation whose labelmap grid is not the volume's (here 2x oversampled, as the
    Segment Editor's "Specify geometry" makes it): the mask is resampled onto that grid, and the
    intensity range still applies there."""
    s = liver_scene
    array_kji = s["array_kji"]
    fine = s["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    fine.CreateDefaultDisplayNodes()
    ijk = L.ijk_to_world(s["volume"])
    fine_ijk = ijk.copy()
    fine_ijk[:3, :3] /= 2  # half the spacing, same origin: fine voxel 2n is coarse voxel n
    image = slicer.vtkOrientedImageData()
    dims = np.array(array_kji.shape[::-1])
    image.SetExtent(0, 2 * dims[0] - 1, 0, 2 * dims[1] - 1, 0, 2 * dims[2] - 1)
    image.SetImageToWorldMatrix(L.vtk_matrix(fine_ijk))
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    fine.GetSegmentation().SetConversionParameter(name, slicer.vtkSegmentationConverter.SerializeImageGeometry(image))
    editor = _editor(s)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(0.0, 200.0)
    target = s["logic"].new_target(s["volume"], fine)
    assert s["logic"].segment(s["volume"], target, s["nodes"], timeout=60).state == "applied"
    labelmap = slicer.vtkOrientedImageData()
    fine.GetBinaryLabelmapRepresentation(target.segment_id, labelmap)
    assert np.allclose(L.numpy_matrix(_image_to_world(labelmap)), fine_ijk)
    coarse = L.segment_on_grid(fine, target.segment_id, (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1), ijk)
    expected = s["window"] & (array_kji >= 0) & (array_kji <= 200)
    assert expected.any()
    np.testing.assert_array_equal(coarse.astype(bool), expected)


def _image_to_world(image):
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix


def test_locked_segment_is_never_touched_even_with_overwrite_all(liver_scene):
    s = liver_scene
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    L.set_segment_locked(s["target"].segmentation, s["liver_id"], True)
    s["logic"].segment(s["volume"], s["target"], s["nodes"], timeout=60)
    new, liver = _masks(s)
    np.testing.assert_array_equal(liver, s["liver"])
    np.testing.assert_array_equal(new, s["window"] & ~s["liver"])
    # writing into the locked segment itself is refused with a clear message
    locked_target = L.Target(s["target"].segmentation, s["liver_id"])
    with pytest.raises(SAMMed3DError, match="locked"):
        s["logic"].request(s["volume"], locked_target, s["nodes"])


def test_shrinking_result_clears_its_stale_voxels(ct, box_model):
    """A box shrunk by the user gives a smaller mask: voxels of the larger one are cleared (also
    those the smaller result's own window does not cover); removing every prompt empties it."""
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = _logic(scene, box_model)
    target = logic.new_target(volume)
    centre = (affine @ np.append(np.round(_centroid(labels == LIVER)), 1))[:3]
    roi = add_roi(scene, centre - 40, centre + 40)
    nodes = L.PromptNodes(box=roi)
    logic.segment(volume, target, nodes, timeout=60)
    big = segment_mask_kji(target.segmentation, target.segment_id, volume)
    undo_steps = len(logic._undo)
    assert logic.request(volume, target, nodes) is None  # nothing changed (Markups events repeat): no work
    assert logic.poll().state == "idle" and len(logic._undo) == undo_steps
    set_roi(roi, centre - (30, 30, 10), centre - (2, 2, -10))  # smaller, off-centre
    logic.segment(volume, target, nodes, timeout=60)
    small = segment_mask_kji(target.segmentation, target.segment_id, volume)
    assert small.any() and big.sum() > 3 * small.sum()
    assert not (small & ~big).any()
    # exactly the engine's box-limited mask for the small box, nothing left of the big one
    session = Session(Volume(array, affine), box_model, device="cpu", max_windows=1)
    session.set_box(centre - (30, 30, 10), centre - (2, 2, -10))
    np.testing.assert_array_equal(small, session.predict().full_mask(array.shape).transpose(2, 1, 0))
    # one undo brings back the larger mask and the larger box
    assert logic.undo(nodes)
    np.testing.assert_array_equal(segment_mask_kji(target.segmentation, target.segment_id, volume), big)
    np.testing.assert_allclose(roi.GetSize(), (80, 80, 80))
    assert logic.redo(nodes)
    np.testing.assert_array_equal(segment_mask_kji(target.segmentation, target.segment_id, volume), small)

    roi.RemoveAllControlPoints()
    assert logic.segment(volume, target, nodes, timeout=60).state == "applied"
    assert not segment_mask_kji(target.segmentation, target.segment_id, volume).any()
    logic.cleanup()


# ---------------------------------------------------------------------------------------------
# Sessions and the worker
# ---------------------------------------------------------------------------------------------


def test_session_is_reused_and_released(ct, random_model):
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    other = add_volume(scene, array[:, :, :40], affine, name="slab")
    logic = _logic(scene, random_model)
    target = logic.new_target(volume)
    click = (affine @ np.append(np.round(_centroid(labels == LIVER)), 1))[:3]
    nodes = L.PromptNodes(positive=add_points(scene, "P", [click]))

    logic.segment(volume, target, nodes, timeout=60)
    first = logic.session_adapter(volume)
    nodes.positive.AddControlPoint(*(click + (6.0, 0, 0)))
    logic.segment(volume, target, nodes, timeout=60)
    assert logic.session_adapter(volume) is first  # same volume, same voxels: reused

    L.array_kji(volume)[0, 0, 0] += 1  # the user edits the voxels
    volume.GetImageData().GetPointData().GetScalars().Modified()
    logic.segment(volume, target, nodes, timeout=60)
    second = logic.session_adapter(volume)
    assert second is not first
    logic.worker.submit(lambda: None).result(timeout=30)  # closes run on the worker, in order
    assert first.closed and not second.closed

    other_target = logic.new_target(other)
    logic.segment(other, other_target, L.PromptNodes(positive=add_points(scene, "Q", [affine[:3, 3] + 90])), timeout=60)
    third = logic.session_adapter(other)
    scene.RemoveNode(volume)  # the node goes away: its session is released
    logic.worker.submit(lambda: None).result(timeout=30)
    assert second.closed and not third.closed
    scene.Clear(0)  # the scene is closed: every session is released
    logic.worker.submit(lambda: None).result(timeout=30)
    assert third.closed
    logic.cleanup()


def test_newer_request_supersedes_and_the_main_thread_polls(ct, box_model):
    """Two clicks in quick succession: only the result for the newest prompts is written; the
    main thread never blocks (it polls, as the Widget's QTimer does)."""
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = _logic(scene, box_model)
    target = logic.new_target(volume)
    centre = (affine @ np.append(np.round(_centroid(labels == LIVER)), 1))[:3]
    roi = add_roi(scene, centre - 40, centre + 40)
    nodes = L.PromptNodes(box=roi)
    first_id = logic.request(volume, target, nodes)
    set_roi(roi, centre - 10, centre + 10)
    second_id = logic.request(volume, target, nodes)
    assert second_id == first_id + 1
    states = []
    deadline = time.time() + 60
    while time.time() < deadline:
        result = logic.poll()
        states.append(result.state)
        if result.state not in ("running",):
            break
        time.sleep(0.005)
    assert states[-1] == "applied", states
    assert logic.poll().state == "idle"
    got = segment_mask_kji(target.segmentation, target.segment_id, volume)
    session = Session(Volume(array, affine), box_model, device="cpu", max_windows=1)
    session.set_box(centre - 10, centre + 10)
    np.testing.assert_array_equal(got, session.predict().full_mask(array.shape).transpose(2, 1, 0))
    logic.cleanup()


def test_cancel_drops_the_prediction_but_not_other_work_on_the_worker(ct, box_model):
    """Undo, clear or a new segment cancel a pending prediction; a model download running on the
    same worker thread (the Widget's job) must go on."""
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = _logic(scene, box_model)
    target = logic.new_target(volume)
    gate = threading.Event()
    download = logic.worker.submit(lambda cancel: "downloaded" if gate.wait(30) and not cancel.is_set() else "stopped",
                                   key="model", pass_cancel=True)
    centre = (affine @ np.append(np.round(_centroid(labels == LIVER)), 1))[:3]
    logic.request(volume, target, L.PromptNodes(positive=add_points(scene, "P", [centre])))
    logic.cancel()
    gate.set()
    assert download.result(timeout=30) == "downloaded"
    logic.worker.submit(lambda: None).result(timeout=30)
    assert logic.poll().state == "idle"
    assert not segment_mask_kji(target.segmentation, target.segment_id, volume).any()
    logic.cleanup()


def test_accept_and_next_keeps_the_segment_and_starts_fresh(liver_scene):
    s = liver_scene
    logic = s["logic"]
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    logic.segment(s["volume"], s["target"], s["nodes"], timeout=60)
    next_target = logic.next_segment(s["volume"], s["target"], s["nodes"])
    assert next_target.segment_id != s["target"].segment_id
    assert s["nodes"].positive.GetNumberOfControlPoints() == 0
    segment = s["target"].segmentation.GetSegmentation().GetSegment(s["target"].segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment) == slicer.vtkSlicerSegmentationsModuleLogic.Completed
    # a click for the next segment does not rewrite the accepted one
    far = (L.ijk_to_world(s["volume"]) @ np.append(np.array(s["array_kji"].shape[::-1]) // 2, 1))[:3]
    s["nodes"].positive.AddControlPoint(*far)
    logic.segment(s["volume"], next_target, s["nodes"], timeout=60)
    accepted = segment_mask_kji(s["target"].segmentation, s["target"].segment_id, s["volume"])
    np.testing.assert_array_equal(accepted, s["window"])
    assert segment_mask_kji(next_target.segmentation, next_target.segment_id, s["volume"]).any()
    assert not logic.can_undo or logic.undo(s["nodes"])
    np.testing.assert_array_equal(segment_mask_kji(s["target"].segmentation, s["target"].segment_id, s["volume"]),
                                  s["window"])


def test_the_same_prompts_sent_to_another_segment_leave_the_first_as_it_is(liver_scene):
    s = liver_scene
    logic = s["logic"]
    _editor(s).SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    logic.segment(s["volume"], s["target"], s["nodes"], timeout=60)
    other = logic.new_target(s["volume"], s["target"].segmentation)
    assert logic.segment(s["volume"], other, s["nodes"], timeout=60).state == "applied"
    for target in (s["target"], other):
        np.testing.assert_array_equal(segment_mask_kji(target.segmentation, target.segment_id, s["volume"]), s["window"])


def test_only_negative_points_and_no_model_give_clear_messages(ct, random_model):
    array, affine, _ = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = L.SAMMed3DMoELogic(scene)
    target = logic.new_target(volume)
    nodes = L.PromptNodes(negative=add_points(scene, "N", [affine[:3, 3] + 60]))
    with pytest.raises(SAMMed3DError, match="No model is loaded"):
        logic.request(volume, target, nodes)
    logic.set_model(random_model)
    logic.device = "cpu"
    logic.request(volume, target, nodes)
    result = logic.wait(60)
    assert result.state == "error" and "positive point" in result.message
    logic.cleanup()


def test_the_modules_self_test_scenario_passes_on_real_mrml():
    """The scenario Slicer's ScriptedLoadableModuleTest runs (SAMMed3DMoESelfTest.run), here on a
    slicer-core scene instead of slicer.mrmlScene."""
    import SAMMed3DMoESelfTest

    messages = []
    SAMMed3DMoESelfTest.run(new_scene(), log=messages.append)
    assert messages[-1] == "Self-test passed"


def test_a_model_loads_from_a_bundle_folder_onto_the_chosen_device(ct, tmp_path):
    from SAMMed3DMoELib.bundle import save_bundle

    save_bundle(tiny_moe(seed=5), tmp_path / "bundle")
    array, affine, labels = ct
    scene = new_scene()
    volume = add_volume(scene, array, affine)
    logic = L.SAMMed3DMoELogic(scene)
    model = logic.load_model(str(tmp_path / "bundle"), device="cpu")
    logic.set_model(model, "bundle")
    assert logic.expert_choices() == ["auto", "general", "expert1", "expert2"]
    logic.device, logic.max_windows = "cpu", 1
    nodes = L.PromptNodes(positive=add_points(scene, "P", [(affine @ np.append(np.round(_centroid(labels == LIVER)), 1))[:3]]))
    result = logic.segment(volume, logic.new_target(volume), nodes, timeout=60)
    assert result.state == "applied" and result.outcome.info.startswith("Expert: ")
    logic.cleanup()


def test_info_line_names_the_expert_and_its_confidence():
    text, confidence = L.describe_decoders(["general", "liver"], {"general": 0.3, "liver": 0.7},
                                           {"general": 0.2, "liver": 0.8})
    assert text == "liver 70% + general" and confidence == pytest.approx(0.8)
    assert L.Outcome(region=np.zeros((1, 1, 1), bool), expert=text, confidence=0.8, milliseconds=41.6).info == \
        "Expert: liver 70% + general · confidence 0.80 · 42 ms"
    assert L.describe_decoders(["general"], {"general": 1.0}, None) == ("general", None)
