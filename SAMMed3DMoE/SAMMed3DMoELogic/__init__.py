"""The module's Logic: MRML nodes in, the engine's session in the middle, a segment out.

Only MRML and VTK classes are used here (no Qt, no ``slicer.util``, no
``slicer.ScriptedLoadableModule``), so the Logic runs inside Slicer, from a Slicer Python script
without the module's GUI, and headless with the ``slicer-core`` wheel (the tests do that).
The engine (``SAMMed3DMoELib``, which needs PyTorch) is imported only when a model or a session
is first needed, so this package can be imported before the dependencies are installed.

One file per concern:

* ``geometry.py``: a volume node becomes the engine's ``Volume`` with its IJK-to-RAS matrix *in
  world coordinates* (parent transforms hardened; only linear ones, a non-linear one is refused
  with advice).
* ``prompts.py``: two Markups point lists (positive, negative) and one Markups ROI become
  prompts in world RAS millimetres, whatever view they were placed in.
* ``engine.py``: the one adapter to the engine (sessions, model loading, the worker thread,
  errors), so a change of the engine's API touches only this file.
* ``segments.py``: masks as ``vtkOrientedImageData`` on the volume's or the segmentation's
  grid, segments read back, locked segments.
* ``logic.py``: :class:`SAMMed3DMoELogic`. :meth:`~SAMMed3DMoELogic.request` submits model work
  to the worker; the GUI calls :meth:`~SAMMed3DMoELogic.poll` from a timer on the main thread.
  A newer request supersedes an older one; a result for prompts that are no longer current is
  dropped. Writes go through ``vtkSlicerSegmentEditorLogic``: one ``SaveStateForUndo()`` per
  change, then ``ModifySegmentByLabelmap`` limited to the extent that can have changed, so the
  Segment Editor's editable area, intensity mask and overwrite mode are honoured, locked
  segments are never touched, and one undo restores every segment. Sessions are reused while
  the volume node, its voxels and its world geometry are unchanged, and released when the node
  or the scene goes away.
"""

from .engine import AUTO, CPU_WARNING, DEVICES, GENERAL, EngineSession, Outcome, check_device_memory, describe_decoders
from .geometry import array_kji, ijk_to_world, node_to_world, numpy_matrix, volume_from_node, vtk_matrix
from .logic import PollResult, SAMMed3DMoELogic, Target
from .prompts import BoxPrompt, MarkupsSnapshot, PointPrompt, PromptNodes, Prompts
from .segments import LOCK_TAG, is_segment_locked, segment_on_grid, set_segment_locked

__all__ = [
    "SAMMed3DMoELogic", "PromptNodes", "Prompts", "PointPrompt", "BoxPrompt", "MarkupsSnapshot", "Target", "Outcome",
    "PollResult", "EngineSession", "node_to_world", "ijk_to_world", "volume_from_node", "array_kji", "numpy_matrix",
    "vtk_matrix", "segment_on_grid", "is_segment_locked", "set_segment_locked", "check_device_memory",
    "describe_decoders", "CPU_WARNING", "DEVICES", "LOCK_TAG", "AUTO", "GENERAL",
]
