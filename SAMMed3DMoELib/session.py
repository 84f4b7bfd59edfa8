"""The interactive session: a volume, a model, the user's prompts, and masks back in place.

A :class:`Session` holds one volume prepared once for the model (canonical axes, 1.5 mm, CT
clamped), the prompts in RAS millimetres, and a cache (:mod:`.session_cache`, one memory
budget) of image embeddings and decoded click steps per window, so that every click after the
first in a window costs only the prompt encoder, the gate and the decoders that contribute.

Results a GUI can write safely: :meth:`Session.predict` returns a :class:`SessionResult` whose
``region`` covers the *rewrite extent*: the windows this prediction computed, united with the
bounding box of every voxel an earlier result of this segment set (since the session started or
:meth:`Session.start_new_segment`). Writing the whole region (False voxels included) over that
extent therefore clears voxels an earlier, larger mask set, even when a result in between was
dropped as stale. :meth:`Session.reset` returns such a result too (all False). ``region_kji``
and ``extent_ijk`` give the same in Slicer's conventions.

Clicks are replayed with SAM-Med3D's training protocol by default: step k gives the decoder the
k-th prompt and the low-res logits of step k-1 (``protocol="newest"``); ``"accumulate"`` gives
all prompts so far. Step results are memoised, so adding a click runs one step, and undoing or
removing a prompt replays only from the first changed step.

Objects larger than one window: when the object touches a window face that is not the volume's
edge, the session continues in the neighbouring window (50 % overlap, as the SAM-Med3D paper
does), seeded with the mask found so far and a positive point inside it, until the object closes
or ``max_windows`` windows are computed. The object is the mask's connected part that holds the
window's positive clicks (in a continued window, the object carried over; with a box alone, the
whole mask): a separate blob is kept in the mask but not followed. Every window computed is in
the mask and listed in ``result.windows``; the limit only stops new windows.

Threads and sharing: prompt edits and the settings ``expert``, ``tau``, ``selector`` take a lock
and bump ``revision``; :meth:`Session.predict` works on a snapshot taken under that lock, so a
GUI may edit prompts while a prediction runs on :class:`~SAMMed3DMoELib.worker.SessionWorker`
and drop results whose ``revision`` is stale. Several sessions may share one model object: a
session never moves, casts or changes it; when it needs the model on another device or dtype
it makes its own copy (load the model on the device the sessions use, so that they share it).

Out of memory (CUDA, cuBLAS/cuDNN, MPS, CPU; see :func:`~SAMMed3DMoELib.device.is_out_of_memory`):
the session frees what it owns (its cache, its device copy of the volume, its own model copy),
continues on the CPU in float32 (its own CPU copy of the model unless the given model already
is one) and predicts again, with a warning and a note; if that fails too it raises
:class:`~SAMMed3DMoELib.errors.OutOfMemoryError`. ``Session.device_step_hook`` is the seam to
inject such failures: it is called with ``"encode"``, ``"decode"`` or ``"map_back"`` right
before each step that runs on the compute device.

Box prompts: a box reaches the model only if its box embeddings were trained
(``SamMed3DMoE.box_prompts_trained``); otherwise it becomes a positive click at its centre and
the mask is limited to the box, with a note. A box larger than the window is clipped to the
window (a note says so), never sent out of range.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry, prompts, windows
from .device import copy_module, is_out_of_memory, module_placement, resolve_device, select_device
from .errors import CancelledError, OutOfMemoryError, SAMMed3DError
from .geometry import PreparedVolume, Volume
from .moe import AUTO, GENERAL, NORMALIZATIONS, SELECTORS, Prediction, SamMed3DMoE
from .prompts import Box, Point
from .session_cache import SessionCache
from .windows import Window

PROTOCOLS = ("newest", "accumulate")
STEPS = ("encode", "decode", "map_back")
"""The steps that run on the compute device (what ``Session.device_step_hook`` is told)."""


@dataclass
class SessionResult:
    """What :meth:`Session.predict` and :meth:`Session.reset` return."""

    region: np.ndarray
    """Boolean mask [i, j, k] on the original grid over the rewrite extent (``offset`` ..
    ``offset + region.shape``): write all of it, False voxels included."""
    offset: Tuple[int, int, int]
    revision: int
    """The prompt revision this result was computed for (compare with ``Session.revision``)."""
    decoders: List[str] = field(default_factory=list)
    """Decoders that ran for the last step of the first window ("general", expert names)."""
    weights: Dict[str, float] = field(default_factory=dict)
    scores: Optional[Dict[str, float]] = None
    """Gate scores (None without experts)."""
    windows: List[Tuple[int, int, int]] = field(default_factory=list)
    """Prepared-grid start index of each window computed, the prompt's window first."""
    timings_ms: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    """Things the user should know (e.g. a box emulated on a model without box prompts)."""

    @property
    def empty(self) -> bool:
        """True when no voxel is set."""
        return not self.region.any()

    @property
    def extent_ijk(self) -> Tuple[int, int, int, int, int, int]:
        """The rewrite extent ``(i0, i1, j0, j1, k0, k1)``, inclusive, as VTK image extents are
        (``(0, -1, 0, -1, 0, -1)`` when empty)."""
        if min(self.region.shape) == 0:
            return (0, -1, 0, -1, 0, -1)
        out = []
        for o, n in zip(self.offset, self.region.shape):
            out += [int(o), int(o + n - 1)]
        return tuple(out)

    @functools.cached_property
    def region_kji(self) -> np.ndarray:
        """``region`` as uint8 [k, j, i], C-contiguous (Slicer's array order, for VTK)."""
        return np.ascontiguousarray(self.region.transpose(2, 1, 0)).view(np.uint8)

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        """The region pasted into an all-False array of the original grid's ``shape``."""
        out = np.zeros(tuple(shape), dtype=bool)
        o = self.offset
        r = self.region
        out[o[0]:o[0] + r.shape[0], o[1]:o[1] + r.shape[1], o[2]:o[2] + r.shape[2]] = r
        return out


@dataclass(frozen=True)
class _Snapshot:
    """The prompts and settings one prediction works on."""

    prompts: Tuple[Tuple[int, object], ...]
    revision: int
    expert: str
    tau: float
    selector: str
    protocol: str
    max_windows: int
    expert_names: Tuple[str, ...]

    @property
    def settings(self) -> tuple:
        """What memoised steps depend on besides the steps themselves."""
        return (self.expert, self.protocol, self.tau, self.selector, self.expert_names)


class Session:
    """Interactive segmentation of one volume with one model (see the module docstring).

    ``model``: a :class:`SamMed3DMoE` (or a bare ``SamMed3D``), possibly shared with other
    sessions. ``device``: "auto" (see :func:`~SAMMed3DMoELib.device.select_device`), "cpu",
    "cuda", "cuda:N", "mps". ``memory_budget_bytes``: what the cache of embeddings and click
    steps may hold on the device. ``cpu_fallback``: continue on the CPU when the device runs out
    of memory (else raise :class:`~SAMMed3DMoELib.errors.OutOfMemoryError`).
    """

    device_step_hook: Optional[Callable[[str], None]] = None
    """Test seam: called with the step name (one of :data:`STEPS`) before each step on the
    compute device, on the thread that predicts. Raising from it injects a failure there."""

    def __init__(
        self,
        volume: Volume,
        model,
        *,
        device="auto",
        modality: str = "auto",
        protocol: str = "newest",
        expert: str = AUTO,
        max_windows: int = 8,
        memory_budget_bytes: int = 512 * 2 ** 20,
        cpu_fallback: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise SAMMed3DError(f"unknown click protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if not isinstance(model, SamMed3DMoE):
            model = SamMed3DMoE(model)
        self._source = model
        self.device = resolve_device(select_device(device))
        self.protocol = protocol
        self.max_windows = int(max_windows)
        self.cpu_fallback = cpu_fallback
        self.window_size = model.base.img_size
        self._lowres = model.base.prompt_encoder.mask_input_size
        pre = model.preprocessing
        if pre["normalization"] not in NORMALIZATIONS:
            raise SAMMed3DError(
                f"the model asks for image normalisation {pre['normalization']!r}, which this version does not "
                f"know ({', '.join(NORMALIZATIONS)}); upgrade sammed3d-moe"
            )
        if int(pre["window"]) != self.window_size:
            raise SAMMed3DError(
                f"the model's preprocessing says {pre['window']}³ windows but its network takes "
                f"{self.window_size}³; the bundle's config.json is inconsistent"
            )
        start = time.perf_counter()
        self.prepared: PreparedVolume = geometry.prepare_volume(
            volume, spacing=pre["spacing_mm"], modality=modality, ct_clamp=pre["ct_clamp"])
        self.prepare_ms = (time.perf_counter() - start) * 1e3
        self._use_model(self.device, dtype=None)
        self._lock = threading.RLock()  # prompts, revision, settings, written extent
        self._predicting = threading.Lock()  # one prediction at a time (it owns the cache)
        self._prompts: List[Tuple[int, object]] = []
        self._history: List[List[Tuple[int, object]]] = []
        self._ids = itertools.count(1)
        self._revision = 0
        self._expert = AUTO
        self._tau: Optional[float] = None
        self._selector: Optional[str] = None
        self.expert = expert
        self._written: Optional[Tuple[np.ndarray, np.ndarray]] = None  # [lo, hi) of voxels results set
        self._cache = SessionCache(memory_budget_bytes)
        self._closed = False
        self.notes: List[str] = []

    # ------------------------------------------------------------------ model placement
    def _use_model(self, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        """Compute on ``device`` in ``dtype`` (default: the model's, or that of its first
        parameter when its parts disagree): the given model itself when it is already there so,
        else this session's own copy."""
        placement = module_placement(self._source)
        if placement is not None and placement[0] == device and dtype in (None, placement[1]):
            self.model, self.owns_model = self._source, False
        else:
            dtype = dtype or (placement[1] if placement else next(self._source.parameters()).dtype)
            self.model, self.owns_model = copy_module(self._source, device, dtype).eval(), True
        self.device = device
        self.dtype = next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ settings
    @property
    def expert(self) -> str:
        """"auto" (gate + selector), "general" or an expert's name, for this session only."""
        return self._expert

    @expert.setter
    def expert(self, value: str) -> None:
        if value not in (AUTO, GENERAL) and value not in self._source.expert_names:
            raise SAMMed3DError(
                f"no expert named {value!r}; choose auto, general or one of: "
                f"{', '.join(self._source.expert_names) or '(this model has no experts)'}"
            )
        with self._lock:
            self._expert = value

    @property
    def tau(self) -> float:
        """The selector's threshold τ for this session (None restores the model's)."""
        return self._source.tau if self._tau is None else self._tau

    @tau.setter
    def tau(self, value: Optional[float]) -> None:
        if value is not None and not (0.0 <= float(value) <= 1.0):
            raise SAMMed3DError(f"tau must be between 0 and 1, got {value!r}")
        with self._lock:
            self._tau = None if value is None else float(value)

    @property
    def selector(self) -> str:
        """The selector ("paper", "average", "renormalized") for this session (None: the model's)."""
        return self._source.selector if self._selector is None else self._selector

    @selector.setter
    def selector(self, value: Optional[str]) -> None:
        if value is not None and value not in SELECTORS:
            raise SAMMed3DError(f"unknown selector {value!r}; choose one of {', '.join(SELECTORS)}")
        with self._lock:
            self._selector = value

    # ------------------------------------------------------------------ prompts
    @property
    def volume(self) -> Volume:
        return self.prepared.source

    @property
    def revision(self) -> int:
        """Incremented by every prompt change (add, remove, box, undo, reset, new segment)."""
        return self._revision

    @property
    def prompts(self) -> List[Tuple[int, object]]:
        """(id, Point or Box) in the order given (a copy)."""
        with self._lock:
            return list(self._prompts)

    def add_point(self, ras, positive: bool = True) -> int:
        """Add a click at RAS mm; returns its id. A point off the volume is refused."""
        xyz = prompts.as_xyz(ras, "a point")
        prompts.point_on_volume(self.volume, xyz)
        return self._push(Point(tuple(float(v) for v in xyz), bool(positive)))

    def add_point_ijk(self, ijk, positive: bool = True) -> int:
        """Add a click given as voxel indices of the original volume."""
        return self._push(Point(tuple(float(v) for v in prompts.ijk_on_volume(self.volume, ijk, "the point")),
                                bool(positive)))

    def set_box(self, ras_min, ras_max) -> int:
        """Set the box prompt (replacing an earlier box); returns its id."""
        box = prompts.box_from_corners(self.volume, ras_min, ras_max)
        windows.window_for_box(self.prepared, box.ras_min, box.ras_max, self.window_size)  # refuses a box off the volume
        with self._lock:
            self._save_history()
            self._prompts = [(i, p) for i, p in self._prompts if not isinstance(p, Box)]
            box_id = next(self._ids)
            self._prompts.append((box_id, box))
            return box_id

    def remove_prompt(self, prompt_id: int) -> None:
        with self._lock:
            if prompt_id not in [i for i, _ in self._prompts]:
                raise SAMMed3DError(f"no prompt with id {prompt_id}; current ids: {[i for i, _ in self._prompts]}")
            self._save_history()
            self._prompts = [(i, p) for i, p in self._prompts if i != prompt_id]

    def undo(self) -> bool:
        """Undo the last prompt change; False when there is nothing to undo."""
        with self._lock:
            if not self._history:
                return False
            self._prompts = self._history.pop()
            self._revision += 1
            return True

    def reset(self) -> SessionResult:
        """Forget all prompts (undoable). Returns the result that clears every voxel the
        segment's earlier results set (write it like any result). The cache stays."""
        with self._lock:
            self._save_history()
            self._prompts = []
            result = self._clearing_result(self._revision, [])
            self._written = None
            return result

    def start_new_segment(self) -> None:
        """Accept what was written and start the next object: prompts, undo history and the
        rewrite extent are forgotten (the cache stays: the image did not change)."""
        with self._lock:
            self._prompts, self._history, self._written = [], [], None
            self._revision += 1

    def close(self) -> None:
        """Free what the session holds on its device (cache, volume copy, own model copy). Does
        not wait for a running prediction (that one frees them when it ends). A closed session
        refuses to predict."""
        with self._lock:
            self._closed = True
        if self._predicting.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._predicting.release()

    def _release(self) -> None:
        self._cache.clear()
        self.prepared.__dict__.pop("_tensor", None)  # the device copy (PreparedVolume.tensor)
        if self.owns_model:
            self.model, self.owns_model = self._source, False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _push(self, prompt) -> int:
        with self._lock:
            self._save_history()
            prompt_id = next(self._ids)
            self._prompts.append((prompt_id, prompt))
            return prompt_id

    def _save_history(self) -> None:
        """Called under the lock before every change: keeps the undo history, bumps the revision."""
        self._history.append(list(self._prompts))
        del self._history[:-100]
        self._revision += 1

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            if self._closed:
                raise SAMMed3DError("this session was closed; start a new session for this volume")
            return _Snapshot(tuple(self._prompts), self._revision, self._expert, self.tau, self.selector,
                             self.protocol, self.max_windows, tuple(self._source.expert_names))

    # ------------------------------------------------------------------ results
    def _clearing_result(self, revision: int, notes: List[str]) -> SessionResult:
        """An all-False result over what earlier results set (call under the lock)."""
        if self._written is None:
            return SessionResult(np.zeros((0, 0, 0), dtype=bool), (0, 0, 0), revision, notes=notes)
        lo, hi = self._written
        return SessionResult(np.zeros(tuple(hi - lo), dtype=bool), tuple(int(v) for v in lo), revision, notes=notes)

    def _rewrite(self, region: np.ndarray, offset, **fields) -> SessionResult:
        """The computed ``region`` widened to the rewrite extent; records the voxels it sets."""
        lo = np.asarray(offset, dtype=np.int64)
        hi = lo + region.shape
        set_voxels = _bbox(region)
        with self._lock:
            if self._written is not None:
                lo, hi = np.minimum(lo, self._written[0]), np.maximum(hi, self._written[1])
            if set_voxels is not None:
                new = (set_voxels[0] + offset, set_voxels[1] + offset)
                self._written = new if self._written is None else (
                    np.minimum(self._written[0], new[0]), np.maximum(self._written[1], new[1]))
        if tuple(lo) != tuple(offset) or tuple(hi - lo) != region.shape:
            out = np.zeros(tuple(hi - lo), dtype=bool)
            o = np.asarray(offset) - lo
            out[o[0]:o[0] + region.shape[0], o[1]:o[1] + region.shape[1], o[2]:o[2] + region.shape[2]] = region
            region = out
        return SessionResult(region=region, offset=tuple(int(v) for v in lo), **fields)

    # ------------------------------------------------------------------ prediction
    def predict(self, cancel: Optional[threading.Event] = None) -> SessionResult:
        """Segment the prompts as they are now (a snapshot: later edits do not affect this call).

        With no prompt at all the result clears the segment's earlier voxels; only negative
        points raise a SAMMed3DError. On running out of memory, see the module docstring."""
        snapshot = self._snapshot()
        with self._predicting:
            try:
                return self._predict_with_fallback(snapshot, cancel)
            finally:
                if self._closed:
                    self._release()

    def _predict_with_fallback(self, snapshot: _Snapshot, cancel) -> SessionResult:
        try:
            return self._predict(snapshot, cancel)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc):
                raise
            where = self.device.type.upper() if self.device.type != "cpu" else "CPU"
            if not self.cpu_fallback:
                raise OutOfMemoryError(
                    f"the {where} ran out of memory; close other programs that use it, or run on the CPU"
                ) from None
        try:
            self._fall_back(where)
            return self._predict(snapshot, cancel)
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                raise OutOfMemoryError(
                    f"the {where} ran out of memory, and so did the CPU after the session freed its cache; close "
                    "other programs, or segment a smaller volume (crop it first)"
                ) from None
            raise

    def _fall_back(self, where: str) -> None:
        """Free what this session owns on its device and continue on the CPU in float32."""
        if where == "CPU":
            message = "the CPU ran out of memory; the session freed its cache and tried again"
        else:
            message = f"the {where} ran out of memory; continuing on the CPU (slower)"
        warnings.warn(message)
        previous = self.device
        self._cache.clear()
        self.prepared.__dict__.pop("_tensor", None)
        if self.device.type != "cpu" or self.dtype != torch.float32:
            self._use_model(torch.device("cpu"), torch.float32)
        if previous.type == "cuda":
            torch.cuda.empty_cache()
        self.notes.append(message)

    def _device_step(self, name: str) -> None:
        if self.device_step_hook is not None:
            self.device_step_hook(name)

    def _predict(self, snapshot: _Snapshot, cancel: Optional[threading.Event]) -> SessionResult:
        points = [p for _, p in snapshot.prompts if isinstance(p, Point)]
        boxes = [p for _, p in snapshot.prompts if isinstance(p, Box)]
        if not snapshot.prompts:
            with self._lock:
                return self._clearing_result(snapshot.revision, ["there are no prompts; the mask is cleared"])
        if not boxes and not any(p.positive for p in points):
            raise SAMMed3DError(
                "only negative (background) points are placed; add a positive point on the object, or a box"
            )
        timings = {"prepare": self.prepare_ms, "encode": 0.0, "decode": 0.0, "map_back": 0.0}
        self.prepare_ms = 0.0  # counted once, in the first prediction
        notes: List[str] = []
        box = boxes[0] if boxes else None
        if box is not None:
            first = windows.window_for_box(self.prepared, box.ras_min, box.ras_max, self.window_size)
        else:
            first_positive = next(p for p in points if p.positive)
            first = windows.window_for_point(self.prepared, first_positive.ras, self.window_size)
        box_trained = self.model.base.box_prompts and self.model.box_prompts_trained
        steps = self._prompt_steps(first, points, box, box_trained, snapshot.protocol, notes)
        prediction = self._replay(first, steps, snapshot, timings, cancel)

        regions = []
        visited = [first]
        # each queued window with the voxels where the object is known to be (the positive clicks;
        # in a seeded window, the object carried over): only mask parts holding them extend
        queue = deque([(first, prediction.logits, self._click_voxels(first, points))])
        while queue:  # every window queued is mapped back: the limit stops new windows only
            window, logits, anchors = queue.popleft()
            self._device_step("map_back")
            start = time.perf_counter()
            # window-sized logits, used both to map back and to find the faces the mask touches
            full = F.interpolate(logits.float(), size=(self.window_size,) * 3, mode="trilinear", align_corners=False)[0, 0]
            region, offset = windows.map_back(full, self.prepared, window)
            if box is not None and not box_trained:
                region = self._clip_to_box(region, offset, box)
            regions.append((region, offset))
            timings["map_back"] += (time.perf_counter() - start) * 1e3
            for neighbour, seed in self._neighbours(window, full, visited, anchors):
                if len(visited) >= snapshot.max_windows:
                    notes.append(
                        f"the object reaches past the window limit (max_windows={snapshot.max_windows}); the mask "
                        "stops there (raise max_windows to follow it further)"
                    )
                    break
                self._check_cancel(cancel)
                visited.append(neighbour)
                previous, previous_logits, previous_object = seed
                moved = self._moved(neighbour, previous, previous_logits, -20.0)
                seeded = self._seed_prediction(neighbour, moved, points, snapshot, timings, cancel)
                queue.append((neighbour, seeded.logits, self._moved(neighbour, previous, previous_object, False)))
        for p in points:
            if all(self._in_window(w, p) is None for w in visited):
                notes.append(
                    f"the point {np.round(p.ras, 1).tolist()} mm lies outside every window the object reached "
                    "and was not used; place points on the same object, or start a new segment for it"
                )
        start = time.perf_counter()
        region, offset = _union(regions)
        result = self._rewrite(
            region, offset, revision=snapshot.revision, decoders=prediction.decoders, weights=prediction.weights,
            scores=prediction.scores, windows=[w.start for w in visited], notes=sorted(set(self.notes + notes)))
        timings["map_back"] += (time.perf_counter() - start) * 1e3
        result.timings_ms = {k: round(v, 2) for k, v in timings.items()}
        return result

    def _prompt_steps(self, window: Window, points: List[Point], box: Optional[Box], box_trained: bool,
                      protocol: str, notes: List[str]) -> List[tuple]:
        """One (coords, labels, box) triple per replay step, in window voxel indices."""
        box_window = None
        if box is not None and box_trained:
            box_window = self._box_in_window(window, box, notes)
        elif box is not None:
            why = ("this model has no box prompt" if not self.model.base.box_prompts
                   else "this model's box prompt was never trained")
            notes.append(f"{why}; the box is used as a positive point at its centre and the mask is limited to the box")
            points = [Point(tuple(box.centre), True)] + points
        coords, labels = [], []
        for p in points:
            c = self._in_window(window, p)
            if c is None:
                continue  # used in a neighbouring window if the object reaches there (see _predict)
            coords.append(tuple(c))
            labels.append(1 if p.positive else 0)
        if not coords:  # a box alone is one step
            return [((), (), box_window)]
        steps = []
        for k in range(len(coords)):
            chosen = slice(k, k + 1) if protocol == "newest" else slice(0, k + 1)
            steps.append((tuple(coords[chosen]), tuple(labels[chosen]), box_window))
        return steps

    def _box_in_window(self, window: Window, box: Box, notes: List[str]) -> Tuple[tuple, tuple]:
        """The box's corners in window voxel indices, clipped to the window's voxels."""
        corners = windows.ras_to_window(self.prepared, window, box.corners())
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        size = self.window_size
        if np.any(lo < -0.5) or np.any(hi > size - 0.5):
            side = size * float(np.min(self.prepared.spacing))
            notes.append(
                f"the box is larger than the model's window ({side:.0f} mm a side); only the part inside the "
                "window around the box's centre was used (draw a smaller box, or use points)"
            )
        return tuple(np.clip(lo, 0, size - 1)), tuple(np.clip(hi, 0, size - 1))

    def _in_window(self, window: Window, point: Point) -> Optional[np.ndarray]:
        """The point's voxel coordinates in ``window``, or None when it lies outside."""
        c = windows.ras_to_window(self.prepared, window, np.array([point.ras]))[0]
        return None if np.any(c < -0.5) or np.any(c > self.window_size - 0.5) else c

    def _replay(self, window: Window, steps: List[tuple], snapshot: _Snapshot, timings: dict, cancel) -> Prediction:
        """Run the steps in ``window``, reusing memoised results of an unchanged prefix."""
        embedding = self._embedding(window, timings, cancel)
        memo = self._cache.steps(window.start, snapshot.settings)
        keep = 0
        while keep < min(len(memo), len(steps)) and memo[keep][0] == steps[keep]:
            keep += 1
        del memo[keep:]
        for k in range(keep, len(steps)):
            self._check_cancel(cancel)
            mask = memo[k - 1][1].logits if k else torch.zeros((1, 1) + self._lowres, dtype=self.dtype, device=self.device)
            memo.append((steps[k], self._decode(embedding, steps[k], mask, snapshot, timings)))
        self._cache.trim(keep=window.start)
        return memo[-1][1]

    def _decode(self, embedding: torch.Tensor, step: tuple, mask: torch.Tensor, snapshot: _Snapshot,
                timings: dict) -> Prediction:
        coords, labels, box = step
        self._device_step("decode")
        start = time.perf_counter()
        points = None
        if coords:
            points = (
                torch.tensor([coords], dtype=self.dtype, device=self.device),
                torch.tensor([labels], dtype=torch.long, device=self.device),
            )
        boxes = None
        if box is not None:
            boxes = torch.tensor(np.stack(box)[None], dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            prediction = self.model.predict(embedding, points=points, boxes=boxes,
                                            mask_logits=mask.to(self.device, self.dtype), expert=snapshot.expert,
                                            tau=snapshot.tau, selector=snapshot.selector)
        timings["decode"] += (time.perf_counter() - start) * 1e3
        return prediction

    def _embedding(self, window: Window, timings: dict, cancel) -> torch.Tensor:
        cached = self._cache.embedding(window.start)
        if cached is not None:
            return cached
        self._check_cancel(cancel)
        self._device_step("encode")
        start = time.perf_counter()
        image = windows.extract_window_tensor(self.prepared, window, self.device)[None, None].to(self.dtype)
        with torch.inference_mode():
            embedding = self.model.encode(image)
        timings["encode"] += (time.perf_counter() - start) * 1e3
        self._cache.put_embedding(window.start, embedding)
        return embedding

    @property
    def cached_bytes(self) -> int:
        """Bytes the session's cache holds on its device (embeddings and memoised click steps);
        kept within ``memory_budget_bytes`` (see :mod:`.session_cache`)."""
        return self._cache.nbytes

    @property
    def memory_budget_bytes(self) -> int:
        return self._cache.budget_bytes

    # ------------------------------------------------------------------ windows beyond the first
    def _neighbours(self, window: Window, full: torch.Tensor, used: List[Window], anchors: Optional[torch.Tensor]):
        """Windows (50 % overlap) across faces that the object touches and that are not the
        volume's edge, each with its seed: this window, the mask found so far (``full``: the
        window's logits upsampled to the window size) and the object's voxels. The object is
        the mask's connected parts that hold an ``anchors`` voxel (bool, window-sized; None: the
        whole mask): a blob apart from the clicked object may be in the mask but is not followed
        into other windows."""
        size = self.window_size
        mask = full > 0
        faces = [(axis, side, face) for axis in range(3) for side, face in ((-1, 0), (1, size - 1))
                 if bool(mask.select(axis, face).any())]
        if faces and anchors is not None:
            mask = _parts_holding(mask, anchors)
        shape = self.prepared.shape
        used_starts = {w.start for w in used}
        for axis, side, face in faces:
            if not bool(mask.select(axis, face).any()):
                continue
            if (side < 0 and window.start[axis] <= 0) or (side > 0 and window.stop[axis] >= shape[axis]):
                continue  # the face is the volume's edge: the object ends there
            start = list(window.start)
            start[axis] += side * size // 2
            neighbour = Window(tuple(start), size)
            if neighbour.start in used_starts:
                continue
            used_starts.add(neighbour.start)
            yield neighbour, (window, full, mask)

    def _moved(self, window: Window, previous: Window, values: torch.Tensor, fill) -> torch.Tensor:
        """A window-sized tensor of ``previous`` moved into ``window`` (``fill`` where it does
        not reach)."""
        size = self.window_size
        shift = [w - p for w, p in zip(window.start, previous.start)]
        moved = torch.full((size,) * 3, fill, dtype=values.dtype, device=values.device)
        src = tuple(slice(max(0, s), size + min(0, s)) for s in shift)
        dst = tuple(slice(max(0, -s), size - max(0, s)) for s in shift)
        moved[dst] = values[src]
        return moved

    def _click_voxels(self, window: Window, points: List[Point]) -> Optional[torch.Tensor]:
        """Bool (S, S, S): the voxels of ``window`` under its positive points; None when it has
        none (a box alone: the whole mask is the object)."""
        size = self.window_size
        voxels = [np.clip(np.rint(c), 0, size - 1).astype(int) for c in
                  (self._in_window(window, p) for p in points if p.positive) if c is not None]
        if not voxels:
            return None
        anchors = torch.zeros((size,) * 3, dtype=torch.bool)
        for v in voxels:
            anchors[tuple(v)] = True
        return anchors

    def _seed_prediction(self, window: Window, moved: torch.Tensor, points: List[Point],
                         snapshot: _Snapshot, timings: dict, cancel) -> Prediction:
        """Predict in a neighbouring window from the previous window's mask: its logits
        ``moved`` into this window (:meth:`_moved`) as the mask prompt, a positive point at
        the mask's centre in the overlap, and the user's points that lie in this window (so a
        click can correct it)."""
        mask_prompt = F.interpolate(moved[None, None], size=self._lowres, mode="trilinear", align_corners=False)
        inside = torch.nonzero(moved > 0).float()
        centre = inside.mean(0)
        point = inside[(inside - centre).norm(dim=1).argmin()]
        coords, labels = [tuple(point.tolist())], [1]
        for p in points:
            c = self._in_window(window, p)
            if c is not None:
                coords.append(tuple(c))
                labels.append(1 if p.positive else 0)
        step = (tuple(coords), tuple(labels), None)
        embedding = self._embedding(window, timings, cancel)
        return self._decode(embedding, step, mask_prompt.to(self.dtype), snapshot, timings)

    def _clip_to_box(self, region: np.ndarray, offset, box: Box) -> np.ndarray:
        """Limit a region to the voxels whose centres lie in the RAS box (one float32 plane of
        the region per RAS axis at a time, broadcast from the three index ramps)."""
        affine = self.volume.affine
        ramps = [(np.arange(n, dtype=np.float32) + o) for n, o in zip(region.shape, offset)]
        shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
        inside = region.copy()
        for axis in range(3):
            coordinate = np.float32(affine[axis, 3]) + sum(
                np.float32(affine[axis, c]) * ramps[c].reshape(shapes[c]) for c in range(3))
            inside &= (coordinate >= box.ras_min[axis] - 1e-3) & (coordinate <= box.ras_max[axis] + 1e-3)
        return inside

    @staticmethod
    def _check_cancel(cancel: Optional[threading.Event]) -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("the segmentation was cancelled")


def _parts_holding(mask: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The connected parts (26-connected) of ``mask`` that hold an ``anchors`` voxel (both bool,
    same shape; scipy labels the parts on the CPU)."""
    from scipy import ndimage

    parts, _ = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3, 3), dtype=bool))
    held = np.unique(parts[anchors.cpu().numpy()])
    return torch.from_numpy(np.isin(parts, held[held > 0])).to(mask.device)


def _bbox(mask: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """[lo, hi) index box of the True voxels of a 3D mask, or None when none is set."""
    plane = mask.any(axis=2)  # one pass over the mask; the last axis is then searched in the box only
    if not plane.any():
        return None
    i = np.flatnonzero(plane.any(axis=1))
    j = np.flatnonzero(plane.any(axis=0))
    k = np.flatnonzero(mask[i[0]:i[-1] + 1, j[0]:j[-1] + 1].any(axis=(0, 1)))
    return (np.array([i[0], j[0], k[0]], dtype=np.int64),
            np.array([i[-1] + 1, j[-1] + 1, k[-1] + 1], dtype=np.int64))


def _union(regions: List[Tuple[np.ndarray, Tuple[int, int, int]]]) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """OR of boxed regions, in their common bounding box."""
    if len(regions) == 1:
        return regions[0][0], tuple(regions[0][1])
    lo = np.min([o for _, o in regions], axis=0)
    hi = np.max([np.asarray(o) + r.shape for r, o in regions], axis=0)
    out = np.zeros(tuple(hi - lo), dtype=bool)
    for region, offset in regions:
        o = np.asarray(offset) - lo
        out[o[0]:o[0] + region.shape[0], o[1]:o[1] + region.shape[1], o[2]:o[2] + region.shape[2]] |= region
    return out, tuple(int(v) for v in lo)
