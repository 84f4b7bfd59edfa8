"""The module's Logic: MRML nodes in, the engine's session in the middle, a segment out.

Only MRML and VTK classes are used here (no Qt, no ``slicer.util``, no
``slicer.ScriptedLoadableModule``), so the Logic runs inside Slicer, from a Slicer Python script
without the module's GUI, and headless with the ``slicer-core`` wheel (the tests do that).
The engine (``SAMMed3DMoELib``, which needs PyTorch) is imported only when a model or a session
is first needed, so this file can be imported before the dependencies are installed.

What the Logic does, and where:

* Geometry (:func:`node_to_world`, :func:`ijk_to_world`, :func:`volume_from_node`): a volume
  node becomes the engine's ``Volume`` with its IJK-to-RAS matrix *in world coordinates*
  (parent transforms hardened; only linear ones, a non-linear one is refused with advice).
* Prompts (:class:`PromptNodes`): two Markups point lists (positive, negative) and one Markups
  ROI become prompts in world RAS millimetres, whatever view they were placed in.
* Model work (:class:`EngineSession`, the one adapter to the engine's session API) runs on the
  engine's ``SessionWorker`` thread; :meth:`SAMMed3DMoELogic.request` submits, the GUI calls
  :meth:`SAMMed3DMoELogic.poll` from a timer on the main thread. A newer request supersedes an
  older one; a result computed for prompts that are no longer current is dropped.
* Writing (:meth:`SAMMed3DMoELogic.write_mask`): through ``vtkSlicerSegmentEditorLogic``: one
  ``SaveStateForUndo()`` per change, then ``ModifySegmentByLabelmap`` limited to the extent that
  can have changed, so the Segment Editor's editable area, intensity mask and overwrite mode are
  honoured, locked segments are never touched, and one undo restores every segment.
* Sessions are reused while the volume node, its voxels and its world geometry are unchanged,
  and released when the node or the scene goes away.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

LOCK_TAG = "SAMMed3DMoE.Locked"
"""Segment tag that marks a segment as locked: this module never writes into it or clears it."""

SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"
"""The Segment Editor module's parameter node, shared so that its masking settings apply here."""

AUTO, GENERAL = "auto", "general"
POSITIVE_COLOUR, NEGATIVE_COLOUR, BOX_COLOUR = (0.2, 0.8, 0.3), (0.9, 0.2, 0.2), (1.0, 0.85, 0.1)
DEVICES = ("auto", "cuda", "mps", "cpu")

CPU_WARNING = (
    "Running on the CPU: the first click in a new region takes about 1 s (image encoding), later "
    "clicks in the same region about 30-110 ms (measured on 2 CPU threads, see BENCHMARKS.md). "
    "A CUDA or Apple GPU is much faster."
)

PREDICT_KEY = "predict"
"""The worker key of predictions: a newer one supersedes an older one."""

# Working memory a session needs on the GPU beside the weights: the 128^3 window's activations
# in the ViT-B encoder, the prepared volume and the embedding cache (the engine's budget is
# 512 MiB). An estimate used to warn before loading, not a limit.
GPU_WORKING_BYTES = 2 * 2 ** 30


def _error(message: str) -> Exception:
    """The engine's SAMMed3DError when the engine can be imported, else a RuntimeError."""
    try:
        from SAMMed3DMoELib.errors import SAMMed3DError
    except ImportError:  # dependencies not installed yet
        return RuntimeError(message)
    return SAMMed3DError(message)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s local RAS to world RAS (identity without a parent transform).

    Raises a clear error for a non-linear parent transform: the engine works on a regular grid."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise _error(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}', which this module "
            "cannot follow. Harden the transform on the volume first (Data module: right-click the transform > "
            "'Harden transform'), or remove it, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _array_from_matrix(matrix)


def ijk_to_world(volume_node) -> np.ndarray:
    """The volume's voxel index (i, j, k) -> world RAS (mm) matrix, parent transforms included."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ _array_from_matrix(matrix)


def volume_image(volume_node):
    """The node's vtkImageData, checked: present, non-empty, one scalar component."""
    if volume_node is None:
        raise _error("No input volume is selected. Choose the volume to segment.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise _error(f"The volume '{volume_node.GetName()}' has no voxels loaded. Load the image again.")
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise _error(f"The volume '{volume_node.GetName()}' is empty ({dims[0]}x{dims[1]}x{dims[2]} voxels).")
    if image.GetNumberOfScalarComponents() != 1:
        raise _error(
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


# ---------------------------------------------------------------------------------------------
# Prompts from Markups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointPrompt:
    """A click in world RAS mm; ``key`` identifies the control point it came from."""

    key: tuple
    ras: Tuple[float, float, float]
    positive: bool


@dataclass(frozen=True)
class BoxPrompt:
    """An axis-aligned box in world RAS mm (the ROI's world bounds)."""

    key: tuple
    ras_min: Tuple[float, float, float]
    ras_max: Tuple[float, float, float]


@dataclass(frozen=True)
class Prompts:
    """Everything the user placed, in world coordinates, positive points first."""

    points: Tuple[PointPrompt, ...] = ()
    box: Optional[BoxPrompt] = None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    @property
    def has_object_prompt(self) -> bool:
        """A positive point or a box: something the model can segment from."""
        return self.box is not None or any(p.positive for p in self.points)


@dataclass(frozen=True)
class MarkupsSnapshot:
    """The control points of the prompt nodes in their local coordinates (to restore on undo)."""

    positive: Tuple[Tuple[float, float, float], ...] = ()
    negative: Tuple[Tuple[float, float, float], ...] = ()
    box: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None  # centre, size


def _defined_points(node) -> List[Tuple[str, Tuple[float, float, float], Tuple[float, float, float]]]:
    """(control point id, local position, world position) of the placed points of ``node``."""
    if node is None:
        return []
    out = []
    for n in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
            continue  # a point being placed (preview) is not a prompt yet
        local, world = [0.0] * 3, [0.0] * 3
        node.GetNthControlPointPosition(n, local)
        node.GetNthControlPointPositionWorld(n, world)
        out.append((node.GetNthControlPointID(n), tuple(local), tuple(world)))
    return out


def _box_defined(node) -> bool:
    return node is not None and node.GetNumberOfControlPoints() > 0 and node.GetNthControlPointPositionStatus(0) == node.PositionDefined


@dataclass
class PromptNodes:
    """The three Markups nodes that hold the user's prompts (each may be None)."""

    positive: object = None
    negative: object = None
    box: object = None

    def prompts(self) -> Prompts:
        """The prompts in world RAS (parent transforms of the markups applied)."""
        for node in (self.positive, self.negative, self.box):
            if node is not None:
                node_to_world(node)  # refuses a non-linear transform with a clear message
        points = []
        for role, node, positive in (("positive", self.positive, True), ("negative", self.negative, False)):
            for point_id, _local, world in _defined_points(node):
                points.append(PointPrompt((role, node.GetID(), point_id), world, positive))
        box = None
        if _box_defined(self.box):
            bounds = [0.0] * 6
            self.box.GetRASBounds(bounds)  # world, axis-aligned (a rotated ROI gives its enclosing box)
            box = BoxPrompt(("box", self.box.GetID()), tuple(bounds[0::2]), tuple(bounds[1::2]))
        return Prompts(tuple(points), box)

    def snapshot(self) -> MarkupsSnapshot:
        box = None
        if _box_defined(self.box):
            centre = [0.0] * 3
            self.box.GetCenter(centre)
            box = (tuple(centre), tuple(self.box.GetSize()))
        return MarkupsSnapshot(
            positive=tuple(local for _, local, _ in _defined_points(self.positive)),
            negative=tuple(local for _, local, _ in _defined_points(self.negative)),
            box=box,
        )

    def restore(self, snapshot: MarkupsSnapshot) -> None:
        """Put the control points back as they were in ``snapshot``."""
        for node, points in ((self.positive, snapshot.positive), (self.negative, snapshot.negative)):
            if node is None:
                continue
            node.RemoveAllControlPoints()
            for position in points:
                node.AddControlPoint(vtk.vtkVector3d(*position))
        if self.box is not None:
            self.box.RemoveAllControlPoints()
            if snapshot.box is not None:
                centre, size = snapshot.box
                self.box.SetCenter(*centre)
                self.box.SetSize(*size)

    def clear(self) -> None:
        for node in (self.positive, self.negative, self.box):
            if node is not None:
                node.RemoveAllControlPoints()


# ---------------------------------------------------------------------------------------------
# The engine adapter: the only place that knows the engine's session API
# ---------------------------------------------------------------------------------------------


def make_volume(array_kji_: np.ndarray, affine: np.ndarray):
    """The engine's Volume from a ``[k, j, i]`` array and an IJK-to-RAS matrix (no copy)."""
    from SAMMed3DMoELib.geometry import Volume

    if hasattr(Volume, "from_kji"):
        return Volume.from_kji(array_kji_, affine)
    return Volume(array_kji_.transpose(2, 1, 0), affine)


@dataclass
class Outcome:
    """What one prediction produced: the mask on the volume grid over a box, and what to show."""

    region: Optional[np.ndarray]
    """bool [i, j, k] over ``offset`` .. ``offset + region.shape``; None for "no mask"."""
    offset: Tuple[int, int, int] = (0, 0, 0)
    expert: str = ""
    confidence: Optional[float] = None
    milliseconds: float = 0.0
    notes: Tuple[str, ...] = ()

    @property
    def info(self) -> str:
        """The info line: expert used, its confidence, time taken."""
        if self.region is None:
            return "No prompts: nothing segmented."
        parts = [f"Expert: {self.expert}" if self.expert else "Model"]
        if self.confidence is not None:
            parts.append(f"confidence {self.confidence:.2f}")
        parts.append(f"{self.milliseconds:.0f} ms")
        return " · ".join(parts)


class EngineSession:
    """One engine ``Session`` for one volume, driven by whole prompt lists.

    Every method runs on the worker thread (the engine's session is not shared between threads).
    :meth:`sync` turns the current list of Markups prompts into the session's add/remove calls,
    so unchanged prompts keep their memoised steps and cached image embeddings."""

    def __init__(self, volume, model, *, device: str = AUTO, max_windows: int = 8) -> None:
        from SAMMed3DMoELib.session import Session

        self.session = Session(volume, model, device=device, max_windows=max_windows)
        self.shape = volume.shape
        self._live: Dict[tuple, Tuple[int, object]] = {}  # prompt key -> (session prompt id, prompt)
        self.closed = False

    def configure(self, expert: str = AUTO, tau: Optional[float] = None) -> None:
        self.session.expert = expert
        if tau is not None:
            if hasattr(self.session, "tau"):
                self.session.tau = float(tau)
            else:  # engines before per-session tau: the mixture's own setting (the worker owns the model)
                self.session.model.tau = float(tau)

    def sync(self, prompts: Prompts) -> None:
        """Make the session's prompts equal ``prompts`` (removed and moved ones replaced)."""
        wanted = {p.key: p for p in prompts.points}
        if prompts.box is not None:
            wanted[prompts.box.key] = prompts.box
        for key, (prompt_id, prompt) in list(self._live.items()):
            if wanted.get(key) != prompt:
                self.session.remove_prompt(prompt_id)
                del self._live[key]
        for prompt in list(prompts.points) + ([prompts.box] if prompts.box is not None else []):
            if prompt.key in self._live:
                continue
            if isinstance(prompt, BoxPrompt):
                prompt_id = self.session.set_box(prompt.ras_min, prompt.ras_max)
            else:
                prompt_id = self.session.add_point(prompt.ras, positive=prompt.positive)
            self._live[prompt.key] = (prompt_id, prompt)

    def predict(self, cancel: Optional[threading.Event] = None) -> Outcome:
        start = time.perf_counter()
        result = self.session.predict(cancel=cancel)
        milliseconds = (time.perf_counter() - start) * 1e3
        expert, confidence = describe_decoders(result.decoders, result.weights, result.scores)
        return Outcome(
            region=np.asarray(result.region, dtype=bool),
            offset=tuple(int(v) for v in result.offset),
            expert=expert,
            confidence=confidence,
            milliseconds=milliseconds,
            notes=tuple(result.notes),
        )

    def new_segment(self) -> None:
        """Forget the prompts (the next segment starts fresh); image embeddings stay cached."""
        if hasattr(self.session, "start_new_segment"):
            self.session.start_new_segment()
        else:
            for prompt_id, _ in self._live.values():
                self.session.remove_prompt(prompt_id)
        self._live.clear()

    def close(self) -> None:
        """Free what the session holds (GPU memory included)."""
        if hasattr(self.session, "close"):
            self.session.close()
        self.session = None
        self.closed = True


def describe_decoders(decoders: Sequence[str], weights: Dict[str, float], scores: Optional[Dict[str, float]]):
    """("expert name(s) used", confidence) for the info line. The confidence is the gate's score
    of the expert that was chosen (None without a gate)."""
    used = [d for d in decoders if weights.get(d, 0.0) > 0]
    experts = [d for d in used if d != GENERAL]
    if experts:
        name = experts[0]
        text = name if weights.get(name, 0.0) >= 0.999 else f"{name} {weights[name]:.0%} + general"
        return text, (scores or {}).get(name)
    return GENERAL, (scores or {}).get(GENERAL)


# ---------------------------------------------------------------------------------------------
# Results into segments
# ---------------------------------------------------------------------------------------------

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


def _extent_shape_kji(extent: Extent) -> Tuple[int, int, int]:
    return (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)


def mask_on_extent(region: Optional[np.ndarray], offset: Sequence[int], extent: Extent) -> np.ndarray:
    """``region`` pasted into an all-zero uint8 ``[k, j, i]`` array covering ``extent``."""
    out = np.zeros(_extent_shape_kji(extent), dtype=np.uint8)
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
    image.SetImageToWorldMatrix(_matrix_from_array(image_to_world))
    return image


def segment_on_grid(segmentation_node, segment_id: str, extent: Extent, image_to_world: np.ndarray) -> np.ndarray:
    """The segment's voxels resampled (nearest neighbour) onto a grid: uint8 ``[k, j, i]``."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    out = np.zeros(_extent_shape_kji(extent), dtype=np.uint8)
    own = labelmap.GetExtent()
    if own[0] > own[1] or own[2] > own[3] or own[4] > own[5]:
        return out
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*extent)
    reference.SetImageToWorldMatrix(_matrix_from_array(image_to_world))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled, False)
    got = resampled.GetExtent()
    if got[0] > got[1] or got[2] > got[3] or got[4] > got[5]:
        return out
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(_extent_shape_kji(got))
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
    return _array_from_matrix(matrix)


def on_reference_geometry(image, reference: Optional[np.ndarray]):
    """``image`` on the segmentation's grid (nearest neighbour) when its own grid differs (a
    segmentation made on another volume, or oversampled), so the Segment Editor's masks, which
    live on that grid, apply; returns (image, its extent)."""
    if reference is not None:
        probe = slicer.vtkOrientedImageData()
        probe.SetImageToWorldMatrix(_matrix_from_array(reference))
        if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, probe):
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceGeometry(
                image, _matrix_from_array(reference), resampled, False)
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
        raise _error(f"No segment '{segment_id}' in '{segmentation_node.GetName()}'.")
    if locked:
        segment.SetTag(LOCK_TAG, "1")
    else:
        segment.RemoveTag(LOCK_TAG)


# ---------------------------------------------------------------------------------------------
# The Logic
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where results go: a segment of a segmentation node."""

    segmentation: object
    segment_id: str

    @property
    def key(self) -> tuple:
        return (self.segmentation.GetID(), self.segment_id)


@dataclass
class _SessionEntry:
    key: tuple
    volume: object  # engine Volume (a copy of the voxels), until the worker opens the session
    adapter: Optional[EngineSession] = None
    target_key: Optional[tuple] = None  # the segment the session's prompts belong to
    closed: bool = False  # released on the main thread; the worker frees it after its running job


@dataclass
class _Request:
    request_id: int
    future: object
    volume_node_id: str
    volume_key: tuple
    target: Target
    markups: MarkupsSnapshot
    signature: tuple


@dataclass
class _UndoEntry:
    target_key: tuple
    markups_before: MarkupsSnapshot
    markups_after: MarkupsSnapshot
    written_before: Optional[Extent]
    written_after: Optional[Extent]
    wrote: bool


@dataclass
class PollResult:
    """What :meth:`SAMMed3DMoELogic.poll` found: ``state`` is "idle", "running", "applied",
    "dropped" (a stale result) or "error" (``message`` says what to do)."""

    state: str
    message: str = ""
    outcome: Optional[Outcome] = None
    notes: Tuple[str, ...] = field(default_factory=tuple)


class SAMMed3DMoELogic:
    """Interactive segmentation of MRML volumes with SAM-Med3D-MoE (usable without the Widget).

    ``scene``: the MRML scene (``slicer.mrmlScene`` in Slicer). ``worker``: an engine
    ``SessionWorker`` (one is created when first needed). Typical scripted use::

        logic = SAMMed3DMoELogic(slicer.mrmlScene)
        logic.set_model(model)                    # or logic.load_model("sam-med3d-turbo")
        target = logic.new_target(volumeNode)     # segmentation + empty segment
        logic.segment(volumeNode, target, PromptNodes(positive=pointsNode))   # waits
    """

    def __init__(self, scene, *, worker=None, max_undo: int = 20) -> None:
        self.scene = scene
        self.model = None
        self.model_name = ""
        self.device = AUTO
        self.max_windows = 8
        self.expert = AUTO
        self.tau: Optional[float] = None
        self._worker = worker
        self._sessions: Dict[str, _SessionEntry] = {}
        self._request_counter = 0
        self._pending: Optional[_Request] = None
        self._written: Dict[tuple, Optional[Extent]] = {}
        self._applied_markups: Dict[tuple, MarkupsSnapshot] = {}
        self._applied_signature: Dict[tuple, tuple] = {}  # what produced the segment's current result
        self._undo: List[_UndoEntry] = []
        self._redo: List[_UndoEntry] = []
        self.max_undo = int(max_undo)
        self._editor = slicer.vtkSlicerSegmentEditorLogic()
        self._editor.SetMRMLScene(scene)
        self._editor.SetMaximumNumberOfUndoStates(self.max_undo)
        self._editor.SetVerbose(True)  # a write the editor refuses is logged, not silent
        self._editor_segmentation = None
        self._observers = [
            scene.AddObserver(scene.NodeRemovedEvent, self._on_node_removed),
            scene.AddObserver(scene.EndCloseEvent, self._on_scene_closed),
        ]

    # ----------------------------------------------------------------- lifetime
    @property
    def worker(self):
        if self._worker is None:
            from SAMMed3DMoELib.worker import SessionWorker

            self._worker = SessionWorker()
        return self._worker

    def cleanup(self) -> None:
        """Release every session and stop the worker (never blocks on a running prediction)."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        self.release_sessions()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    # ----------------------------------------------------------------- model
    def set_model(self, model, name: str = "") -> None:
        """Use ``model`` (an engine ``SamMed3DMoE``) from now on; sessions of the old one are released."""
        self.release_sessions()
        self.model = model
        self.model_name = name
        if self.expert not in self.expert_choices():
            self.expert = AUTO

    def load_model(self, spec: str, device: str = AUTO, progress=None, cancel=None):
        """Resolve ``spec`` (catalog name, local file or bundle folder, Hub repo id; downloads if
        needed, with ``progress(done, total)`` and ``cancel``), check the device's memory and load
        the model onto it. Slow: the Widget runs it on the worker thread, then calls
        :meth:`set_model` on the main thread."""
        from SAMMed3DMoELib.bundle import load_model
        from SAMMed3DMoELib.hub import resolve_model

        path = resolve_model(spec, progress=progress, cancel=cancel)
        check_device_memory(device, path)
        from SAMMed3DMoELib.device import select_device

        return load_model(path, device=select_device(None if device == AUTO else device))

    def expert_choices(self) -> List[str]:
        """"auto", "general" and the loaded bundle's experts."""
        names = list(self.model.expert_names) if self.model is not None else []
        return [AUTO, GENERAL] + names

    # ----------------------------------------------------------------- sessions
    def _session_entry(self, volume_node) -> _SessionEntry:
        key = volume_key(volume_node)
        entry = self._sessions.get(volume_node.GetID())
        if entry is not None and entry.key == key:
            return entry
        if entry is not None:
            self._close_entry(entry)
        entry = _SessionEntry(key=key, volume=volume_from_node(volume_node))
        self._sessions[volume_node.GetID()] = entry
        return entry

    def _close_entry(self, entry: _SessionEntry) -> None:
        entry.closed = True
        self.worker.submit(_close_session_job, entry)  # after the job that may be using it

    def release_session(self, volume_node_id: str) -> None:
        """Forget the session of one volume node (its memory is freed on the worker thread)."""
        entry = self._sessions.pop(volume_node_id, None)
        if entry is not None:
            self._close_entry(entry)
        if self._pending is not None and self._pending.volume_node_id == volume_node_id:
            self.cancel()

    def release_sessions(self) -> None:
        self.cancel()
        for node_id in list(self._sessions):
            self.release_session(node_id)

    def session_adapter(self, volume_node) -> Optional[EngineSession]:
        """The open session of ``volume_node`` (None before the first prediction)."""
        entry = self._sessions.get(volume_node.GetID())
        return entry.adapter if entry is not None else None

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, caller, event, node) -> None:
        if node is None:
            return
        node_id = node.GetID()
        if node_id in self._sessions:
            self.release_session(node_id)
        for key in [k for k in self._written if k[0] == node_id]:
            self._written.pop(key, None)
            self._applied_markups.pop(key, None)
            self._applied_signature.pop(key, None)
        if self._pending is not None and self._pending.target.segmentation is node:
            self.cancel()

    def _on_scene_closed(self, caller, event) -> None:
        self.release_sessions()
        self._written.clear()
        self._applied_markups.clear()
        self._applied_signature.clear()
        self._undo.clear()
        self._redo.clear()
        self._editor_segmentation = None

    # ----------------------------------------------------------------- targets and prompts
    def create_prompt_nodes(self) -> PromptNodes:
        """Markups nodes for the prompts: positive points (green), negative points (red), box (yellow)."""
        nodes = []
        for cls, name, colour in (
                ("vtkMRMLMarkupsFiducialNode", "SAM positive", POSITIVE_COLOUR),
                ("vtkMRMLMarkupsFiducialNode", "SAM negative", NEGATIVE_COLOUR),
                ("vtkMRMLMarkupsROINode", "SAM box", BOX_COLOUR)):
            node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(name))
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
            node.SetControlPointLabelFormat("+%d" if colour == POSITIVE_COLOUR else "-%d" if colour == NEGATIVE_COLOUR else "box")
            nodes.append(node)
        return PromptNodes(*nodes)

    def new_target(self, volume_node, segmentation_node=None, name: str = "") -> Target:
        """A new empty segment (in ``segmentation_node``, or in a new segmentation made for the
        volume: same parent transform, the volume's grid as reference geometry)."""
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{volume_node.GetName()} segmentation"))
            segmentation_node.CreateDefaultDisplayNodes()
            # transform first: the reference geometry is computed in the segmentation's frame
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation = segmentation_node.GetSegmentation()
        segment_id = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID("Segment"), name or "")
        return Target(segmentation_node, segment_id)

    # ----------------------------------------------------------------- predictions
    def request(self, volume_node, target: Target, prompt_nodes: PromptNodes) -> Optional[int]:
        """Segment the current prompts in the background; returns the request id. A newer
        request supersedes this one. Call :meth:`poll` to write the result when it is ready.
        Returns None (and does nothing) when neither the prompts, the volume nor the settings
        changed since the result now in the segment (Markups events repeat)."""
        if self.model is None:
            raise _error("No model is loaded. Choose a model and press 'Load model' first.")
        self._check_target(target)
        prompts = prompt_nodes.prompts()
        entry = self._session_entry(volume_node)
        signature = (prompts, entry.key, id(self.model), self.device, self.max_windows, self.expert, self.tau)
        if self._pending is not None and self._pending.signature == signature and self._pending.target.key == target.key:
            return self._pending.request_id
        if self._pending is None and self._applied_signature.get(target.key) == signature:
            return None
        self._request_counter += 1
        new_segment = entry.target_key is not None and entry.target_key != target.key
        entry.target_key = target.key
        job = functools.partial(_predict_job, entry, self.model, prompts, self.device, self.max_windows,
                                self.expert, self.tau, new_segment)
        future = self.worker.submit(job, key=PREDICT_KEY, pass_cancel=True)
        self._pending = _Request(self._request_counter, future, volume_node.GetID(), entry.key, target,
                                 prompt_nodes.snapshot(), signature)
        return self._request_counter

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def cancel(self) -> None:
        """Stop the pending prediction; its result will not be written. (A no-op job under the
        same worker key supersedes it: a queued one never starts, a running one is asked to stop.
        Other work on the worker, such as a download, goes on.)"""
        if self._pending is not None:
            self._pending = None
            self.worker.submit(_nothing, key=PREDICT_KEY)

    def poll(self) -> PollResult:
        """Write the pending result if it is ready (main thread; the Widget calls this from a timer)."""
        pending = self._pending
        if pending is None:
            return PollResult("idle")
        if not pending.future.done():
            return PollResult("running")
        self._pending = None
        if pending.future.cancelled():
            return PollResult("dropped", "superseded by a newer request")
        error = pending.future.exception()
        if error is not None:
            if type(error).__name__ == "CancelledError":
                return PollResult("dropped", str(error))
            return PollResult("error", str(error))
        outcome: Outcome = pending.future.result()
        if pending.request_id != self._request_counter:
            return PollResult("dropped", "computed for prompts that have changed since")
        volume_node = self.scene.GetNodeByID(pending.volume_node_id)
        if volume_node is None or self._sessions.get(pending.volume_node_id) is None \
                or self._sessions[pending.volume_node_id].key != pending.volume_key:
            return PollResult("dropped", "the volume changed while the model ran")
        if self.scene.GetNodeByID(pending.target.segmentation.GetID()) is None:
            return PollResult("dropped", "the segmentation was removed")
        try:
            self._apply(volume_node, pending.target, outcome, pending.markups)
        except Exception as exc:  # a clear message for the GUI, never a half-written state
            return PollResult("error", str(exc), outcome)
        self._applied_signature[pending.target.key] = pending.signature
        return PollResult("applied", outcome.info, outcome, outcome.notes)

    def wait(self, timeout: Optional[float] = None) -> PollResult:
        """Block until the pending request is done, then :meth:`poll` (scripts and tests)."""
        pending = self._pending
        if pending is not None:
            try:
                pending.future.exception(timeout=timeout)
            except Exception:  # cancelled: poll reports it
                pass
        return self.poll()

    def segment(self, volume_node, target: Target, prompt_nodes: PromptNodes, timeout: Optional[float] = None) -> PollResult:
        """:meth:`request` and :meth:`wait`: segment the prompts and write the result."""
        self.request(volume_node, target, prompt_nodes)
        result = self.wait(timeout)
        if result.state == "error":
            raise _error(result.message)
        return result

    # ----------------------------------------------------------------- writing
    def _apply(self, volume_node, target: Target, outcome: Outcome, markups: MarkupsSnapshot) -> None:
        before = self._written.get(target.key)
        markups_before = self._applied_markups.get(target.key, MarkupsSnapshot())
        written, wrote = self.write_mask(volume_node, target, outcome.region, outcome.offset)
        self._push_undo(_UndoEntry(target.key, markups_before, markups, before, written, wrote))
        self._applied_markups[target.key] = markups

    def write_mask(self, volume_node, target: Target, region: Optional[np.ndarray], offset=(0, 0, 0)):
        """Make ``target``'s segment equal ``region`` (bool [i, j, k] on the volume's grid at
        ``offset``; None = empty) inside the extent that can have changed: the mask's own extent
        united with what this module wrote there before (so stale voxels are cleared). Goes
        through the Segment Editor logic: one undo state, masking and overwrite settings honoured,
        locked segments untouched. Returns (the extent now written, whether anything was written)."""
        self._check_target(target)
        segmentation_node, segment_id = target.segmentation, target.segment_id
        new_extent = mask_extent(region, offset)
        rewrite = union_extent(new_extent, self._written.get(target.key))
        if rewrite is None:
            return None, False
        shape = volume_image(volume_node).GetDimensions()
        rewrite = _clip_extent(rewrite, shape)
        grid = np.linalg.inv(node_to_world(segmentation_node)) @ ijk_to_world(volume_node)
        new = mask_on_extent(region, offset, rewrite)
        current = segment_on_grid(segmentation_node, segment_id, rewrite, grid)
        stale = current & (1 - new)
        add = new & (1 - self._locked_union(segmentation_node, segment_id, rewrite, grid))

        editor_node = self._prepare_editor(volume_node, segmentation_node, segment_id)
        self._check_mask_segment(editor_node, segmentation_node)
        reference = reference_geometry(segmentation_node)
        self._editor.SaveStateForUndo()
        for mask, mode in ((stale, self._editor.ModificationModeRemove), (add, self._editor.ModificationModeAdd)):
            if mask.any():
                image, extent = on_reference_geometry(oriented_image(mask, rewrite, grid), reference)
                self._editor.ModifySegmentByLabelmap(segmentation_node, segment_id, image, mode, extent, True, False)
        self._written[target.key] = new_extent
        return new_extent, True

    def _locked_union(self, segmentation_node, segment_id: str, extent: Extent, grid: np.ndarray) -> np.ndarray:
        locked = np.zeros(_extent_shape_kji(extent), dtype=np.uint8)
        segmentation = segmentation_node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            other = segmentation.GetNthSegmentID(n)
            if other != segment_id and is_segment_locked(segmentation_node, other):
                locked |= segment_on_grid(segmentation_node, other, extent, grid)
        return locked

    def _check_target(self, target: Target) -> None:
        if target is None or target.segmentation is None:
            raise _error("No segmentation is selected. Choose one or press 'New segment'.")
        if target.segmentation.GetSegmentation().GetSegment(target.segment_id) is None:
            raise _error(f"The segment '{target.segment_id}' no longer exists. Choose a segment or press 'New segment'.")
        if is_segment_locked(target.segmentation, target.segment_id):
            name = target.segmentation.GetSegmentation().GetSegment(target.segment_id).GetName()
            raise _error(f"The segment '{name}' is locked. Unlock it, or press 'New segment' to segment into a new one.")

    def _check_mask_segment(self, editor_node, segmentation_node) -> None:
        if editor_node.GetMaskMode() != segmentation_node.EditAllowedInsideSingleSegment:
            return
        mask_id = editor_node.GetMaskSegmentID()
        if mask_id and is_segment_locked(segmentation_node, mask_id):
            name = segmentation_node.GetSegmentation().GetSegment(mask_id).GetName()
            raise _error(
                f"The editable area is inside segment '{name}', which is locked, so nothing could be written. "
                "Unlock it or choose another editable area (Segment Editor > Masking)."
            )

    def segment_editor_node(self):
        """The Segment Editor module's parameter node (created if missing): its editable area,
        intensity mask and overwrite settings apply to this module's writes."""
        node = self.scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = self.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
            node = self.scene.AddNode(node)
        return node

    def _prepare_editor(self, volume_node, segmentation_node, segment_id: str):
        editor_node = self.segment_editor_node()
        if self._editor.GetSegmentEditorNode() is not editor_node:
            self._editor.SetSegmentEditorNode(editor_node)
        if editor_node.GetSegmentationNode() is not segmentation_node:
            self._editor.SetSegmentationNode(segmentation_node)
        if self._editor_segmentation is not segmentation_node:
            # the editor's undo history belongs to one segmentation
            self._editor_segmentation = segmentation_node
            self._undo.clear()
            self._redo.clear()
        if editor_node.GetSourceVolumeNode() is not volume_node:
            self._editor.SetSourceVolumeNode(volume_node)
        self._editor.SetCurrentSegmentID(segment_id)
        return editor_node

    # ----------------------------------------------------------------- undo / redo
    def _push_undo(self, entry: _UndoEntry) -> None:
        self._undo.append(entry)
        del self._undo[:-self.max_undo]
        self._redo.clear()

    def forget_history(self) -> None:
        """Drop the undo/redo steps (the Widget calls this when the user picks another segment)."""
        self._undo.clear()
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self, prompt_nodes: PromptNodes) -> bool:
        """Undo the last change this module made: every segment it touched and the prompts
        (restored in ``prompt_nodes``) go back. False when there is nothing to undo."""
        self.cancel()
        if not self._undo:
            return False
        entry = self._undo[-1]
        if entry.wrote:
            if not self._editor.CanUndo():
                self._undo.clear()
                self._redo.clear()
                return False
            self._editor.Undo()
        self._undo.pop()
        self._redo.append(entry)
        self._written[entry.target_key] = entry.written_before
        self._applied_markups[entry.target_key] = entry.markups_before
        self._applied_signature.pop(entry.target_key, None)
        prompt_nodes.restore(entry.markups_before)
        return True

    def redo(self, prompt_nodes: PromptNodes) -> bool:
        """Redo what :meth:`undo` undid."""
        self.cancel()
        if not self._redo:
            return False
        entry = self._redo[-1]
        if entry.wrote:
            if not self._editor.CanRedo():
                self._redo.clear()
                return False
            self._editor.Redo()
        self._redo.pop()
        self._undo.append(entry)
        self._written[entry.target_key] = entry.written_after
        self._applied_markups[entry.target_key] = entry.markups_after
        self._applied_signature.pop(entry.target_key, None)
        prompt_nodes.restore(entry.markups_after)
        return True

    # ----------------------------------------------------------------- segment workflow
    def clear(self, volume_node, target: Target, prompt_nodes: PromptNodes) -> None:
        """Remove the prompts and what they segmented (one undo step)."""
        self.cancel()
        before = self._written.get(target.key)
        markups_before = self._applied_markups.get(target.key, MarkupsSnapshot())
        prompt_nodes.clear()
        written, wrote = self.write_mask(volume_node, target, None)
        self._push_undo(_UndoEntry(target.key, markups_before, MarkupsSnapshot(), before, written, wrote))
        self._applied_markups[target.key] = MarkupsSnapshot()
        self._applied_signature.pop(target.key, None)

    def next_segment(self, volume_node, target: Target, prompt_nodes: PromptNodes, accept: bool = True) -> Target:
        """Start a new segment with fresh prompts ("accept and next" when ``accept``: the current
        segment is marked completed). What was written stays; the image embeddings stay cached."""
        self.cancel()
        segmentation = target.segmentation.GetSegmentation()
        segment = segmentation.GetSegment(target.segment_id)
        if accept and segment is not None:
            slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, slicer.vtkSlicerSegmentationsModuleLogic.Completed)
        prompt_nodes.clear()
        self._written.pop(target.key, None)
        self._applied_markups.pop(target.key, None)
        self._applied_signature.pop(target.key, None)
        self._undo.clear()
        self._redo.clear()
        return self.new_target(volume_node, target.segmentation)  # its first request starts the session afresh

    def show_in_3d(self, segmentation_node, show: bool) -> None:
        """Show (build) or hide the segmentation's closed-surface representation in 3D views."""
        if show:
            segmentation_node.CreateClosedSurfaceRepresentation()
        else:
            segmentation_node.RemoveClosedSurfaceRepresentation()


def _clip_extent(extent: Extent, dims: Sequence[int]) -> Extent:
    return (max(extent[0], 0), min(extent[1], dims[0] - 1), max(extent[2], 0), min(extent[3], dims[1] - 1),
            max(extent[4], 0), min(extent[5], dims[2] - 1))


def _predict_job(entry: _SessionEntry, model, prompts: Prompts, device: str, max_windows: int, expert: str,
                 tau: Optional[float], new_segment: bool, cancel: Optional[threading.Event] = None) -> Outcome:
    """Runs on the worker thread: open the volume's session (first time), start afresh when the
    prompts are for another segment than last time, sync the prompts, predict."""
    if entry.closed:
        from SAMMed3DMoELib.errors import CancelledError

        raise CancelledError("the volume's session was released before this request ran")
    if entry.adapter is None:
        entry.adapter = EngineSession(entry.volume, model, device=device, max_windows=max_windows)
    adapter = entry.adapter
    if new_segment:
        adapter.new_segment()
    adapter.configure(expert, tau)
    adapter.sync(prompts)
    if prompts.empty:
        return Outcome(region=None)
    if not prompts.has_object_prompt:
        raise _error("Only negative points are placed. Add a positive point on the object (or a box).")
    return adapter.predict(cancel)


def _nothing() -> None:
    pass


def _close_session_job(entry: _SessionEntry) -> None:
    """Runs on the worker thread: free a released session (GPU memory included)."""
    if entry.adapter is not None:
        entry.adapter.close()
    entry.volume = None


def check_device_memory(device: str, model_path) -> None:
    """Before loading onto a GPU: refuse with advice when it has clearly too little free memory
    for the weights plus a session's working memory (:data:`GPU_WORKING_BYTES`)."""
    import os

    import torch

    from SAMMed3DMoELib.device import select_device

    target = select_device(None if device == AUTO else device)
    if target.type != "cuda":
        return
    path = str(model_path)
    if os.path.isdir(path):
        weights = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    else:
        weights = os.path.getsize(path)
    free, total = torch.cuda.mem_get_info(target)
    needed = weights + GPU_WORKING_BYTES
    if free < needed:
        raise _error(
            f"The GPU ({torch.cuda.get_device_name(target)}) has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB; "
            f"this model needs about {needed / 2**30:.1f} GiB. Close other programs that use the GPU, or choose "
            "the CPU as device (slower)."
        )


__all__ = [
    "SAMMed3DMoELogic", "PromptNodes", "Prompts", "PointPrompt", "BoxPrompt", "Target", "Outcome", "PollResult",
    "EngineSession", "node_to_world", "ijk_to_world", "volume_from_node", "array_kji", "segment_on_grid",
    "is_segment_locked", "set_segment_locked", "check_device_memory", "CPU_WARNING", "DEVICES", "LOCK_TAG",
]
