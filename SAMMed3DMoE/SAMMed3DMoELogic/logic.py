"""The Logic class: requests on the worker thread, results written through the Segment Editor
logic with undo, sessions kept per volume and released with it (see the package docstring)."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import vtk

import slicer

from .engine import AUTO, GENERAL, EngineSession, Outcome, cancelled_error, load_model, new_worker, user_error
from .geometry import ijk_to_world, node_to_world, volume_from_node, volume_image, volume_key
from .prompts import BOX_COLOUR, NEGATIVE_COLOUR, POSITIVE_COLOUR, MarkupsSnapshot, PromptNodes, Prompts
from .segments import (
    Extent,
    clip_extent,
    extent_shape_kji,
    is_segment_locked,
    mask_extent,
    mask_on_extent,
    on_reference_geometry,
    oriented_image,
    reference_geometry,
    segment_on_grid,
    union_extent,
)

SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"
"""The Segment Editor module's parameter node, shared so that its masking settings apply here."""

PREDICT_KEY = "predict"
"""The worker key of predictions: a newer one supersedes an older one."""


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
            self._worker = new_worker()
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
        return load_model(spec, device, progress=progress, cancel=cancel)

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
            raise user_error("No model is loaded. Choose a model and press 'Load model' first.")
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
            raise user_error(result.message)
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
        rewrite = clip_extent(rewrite, shape)
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
        locked = np.zeros(extent_shape_kji(extent), dtype=np.uint8)
        segmentation = segmentation_node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            other = segmentation.GetNthSegmentID(n)
            if other != segment_id and is_segment_locked(segmentation_node, other):
                locked |= segment_on_grid(segmentation_node, other, extent, grid)
        return locked

    def _check_target(self, target: Target) -> None:
        if target is None or target.segmentation is None:
            raise user_error("No segmentation is selected. Choose one or press 'New segment'.")
        if target.segmentation.GetSegmentation().GetSegment(target.segment_id) is None:
            raise user_error(f"The segment '{target.segment_id}' no longer exists. Choose a segment or press 'New segment'.")
        if is_segment_locked(target.segmentation, target.segment_id):
            name = target.segmentation.GetSegmentation().GetSegment(target.segment_id).GetName()
            raise user_error(f"The segment '{name}' is locked. Unlock it, or press 'New segment' to segment into a new one.")

    def _check_mask_segment(self, editor_node, segmentation_node) -> None:
        if editor_node.GetMaskMode() != segmentation_node.EditAllowedInsideSingleSegment:
            return
        mask_id = editor_node.GetMaskSegmentID()
        if mask_id and is_segment_locked(segmentation_node, mask_id):
            name = segmentation_node.GetSegmentation().GetSegment(mask_id).GetName()
            raise user_error(
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


def _predict_job(entry: _SessionEntry, model, prompts: Prompts, device: str, max_windows: int, expert: str,
                 tau: Optional[float], new_segment: bool, cancel: Optional[threading.Event] = None) -> Outcome:
    """Runs on the worker thread: open the volume's session (first time), start afresh when the
    prompts are for another segment than last time, sync the prompts, predict."""
    if entry.closed:
        raise cancelled_error("the volume's session was released before this request ran")
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
        raise user_error("Only negative points are placed. Add a positive point on the object (or a box).")
    return adapter.predict(cancel)


def _nothing() -> None:
    pass


def _close_session_job(entry: _SessionEntry) -> None:
    """Runs on the worker thread: free a released session (GPU memory included)."""
    if entry.adapter is not None:
        entry.adapter.close()
    entry.volume = None
