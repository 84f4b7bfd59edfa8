"""The interactive session: a volume, a model, the user's prompts, and masks back in place.

A :class:`Session` holds one volume prepared once for the model (canonical axes, 1.5 mm, CT
clamped), the list of prompts in RAS millimetres, and a cache of image embeddings per 128³
window, so that every click after the first in a window costs only the prompt encoder, the
gate and the decoders that contribute. Results are returned as a boolean region of the
ORIGINAL voxel grid plus its offset, so a caller writes only what can have changed.

Clicks are replayed with SAM-Med3D's training protocol by default: step k gives the decoder the
k-th prompt and the low-res logits of step k-1 (``protocol="newest"``); ``"accumulate"`` gives
all prompts so far. Step results are memoised, so adding a click runs one step, and undoing or
removing a prompt replays only from the first changed step.

Objects larger than one window: when the mask touches a window face that is not the volume's
edge, the session continues in the neighbouring window (50 % overlap, as the SAM-Med3D paper
does), seeded with the mask found so far and a positive point inside it, until the object closes
or ``max_windows`` is reached.

GUIs run sessions on :class:`~SAMMed3DMoELib.worker.SessionWorker`'s persistent thread.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry, windows
from .device import select_device
from .errors import CancelledError, SAMMed3DError
from .geometry import PreparedVolume, Volume
from .moe import AUTO, NORMALIZATIONS, Prediction, SamMed3DMoE
from .prompts import Box, Point, as_xyz
from .windows import Window

PROTOCOLS = ("newest", "accumulate")


@dataclass
class SessionResult:
    """What :meth:`Session.predict` returns."""

    region: np.ndarray
    """Boolean mask on the original grid, covering ``offset`` .. ``offset + region.shape``."""
    offset: Tuple[int, int, int]
    decoders: List[str]
    """Decoders that ran for the last step of the first window ("general", expert names)."""
    weights: Dict[str, float]
    scores: Optional[Dict[str, float]]
    """Gate scores (None without experts)."""
    windows: List[Tuple[int, int, int]]
    """Prepared-grid start index of each window used, the prompt's window first."""
    timings_ms: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    """Things the user should know (e.g. a box emulated on a model without box prompts)."""

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        """The region pasted into an all-False array of the original grid's ``shape``."""
        out = np.zeros(tuple(shape), dtype=bool)
        o = self.offset
        r = self.region
        out[o[0]:o[0] + r.shape[0], o[1]:o[1] + r.shape[1], o[2]:o[2] + r.shape[2]] = r
        return out


class Session:
    """Interactive segmentation of one volume with one model (see the module docstring)."""

    def __init__(
        self,
        volume: Volume,
        model: SamMed3DMoE,
        *,
        device=None,
        modality: str = "auto",
        protocol: str = "newest",
        expert: str = AUTO,
        max_windows: int = 8,
        cache_bytes: int = 512 * 2 ** 20,
        cpu_fallback: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise SAMMed3DError(f"unknown click protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if not isinstance(model, SamMed3DMoE):
            model = SamMed3DMoE(model)
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.protocol = protocol
        self.expert = expert
        self.max_windows = int(max_windows)
        self.cache_bytes = int(cache_bytes)
        self.cpu_fallback = cpu_fallback
        self.window_size = self.model.base.img_size
        self._lowres = self.model.base.prompt_encoder.mask_input_size
        pre = self.model.preprocessing
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
        self._prompts: List[Tuple[int, object]] = []
        self._history: List[List[Tuple[int, object]]] = []
        self._ids = itertools.count(1)
        self._embeddings: "OrderedDict[Tuple[int, int, int], torch.Tensor]" = OrderedDict()
        # (window start, expert, protocol, tau, selector, expert names) -> [(step, prediction)]
        self._steps: Dict[tuple, List[Tuple[tuple, Prediction]]] = {}
        self.notes: List[str] = []

    # ------------------------------------------------------------------ prompts
    @property
    def volume(self) -> Volume:
        return self.prepared.source

    @property
    def prompts(self) -> List[Tuple[int, object]]:
        """(id, Point or Box) in the order given."""
        return list(self._prompts)

    def add_point(self, ras, positive: bool = True) -> int:
        """Add a click at RAS mm; returns its id. A point off the volume is refused."""
        point = Point(tuple(as_xyz(ras, "a point")), bool(positive))
        self._check_on_volume(point.ras)
        return self._push(point)

    def add_point_ijk(self, ijk, positive: bool = True) -> int:
        """Add a click given as voxel indices of the original volume."""
        return self.add_point(self.volume.ijk_to_ras(np.asarray(ijk, dtype=float).reshape(1, 3))[0], positive)

    def set_box(self, ras_min, ras_max) -> int:
        """Set the box prompt (replacing an earlier box); returns its id."""
        a, b = as_xyz(ras_min, "a box corner"), as_xyz(ras_max, "a box corner")
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        if np.any(hi - lo < float(self.volume.spacing.min())):  # thinner than a voxel along R, A or S
            raise SAMMed3DError(
                f"the box {lo.round(1).tolist()}..{hi.round(1).tolist()} mm has (almost) zero extent on at "
                f"least one axis; drag it over the object in all three directions"
            )
        windows.window_for_box(self.prepared, lo, hi, self.window_size)  # refuses a box off the volume
        self._save_history()
        self._prompts = [(i, p) for i, p in self._prompts if not isinstance(p, Box)]
        box_id = next(self._ids)
        self._prompts.append((box_id, Box(tuple(lo), tuple(hi))))
        return box_id

    def remove_prompt(self, prompt_id: int) -> None:
        if prompt_id not in [i for i, _ in self._prompts]:
            raise SAMMed3DError(f"no prompt with id {prompt_id}; current ids: {[i for i, _ in self._prompts]}")
        self._save_history()
        self._prompts = [(i, p) for i, p in self._prompts if i != prompt_id]

    def undo(self) -> bool:
        """Undo the last prompt change; False when there is nothing to undo."""
        if not self._history:
            return False
        self._prompts = self._history.pop()
        return True

    def reset(self) -> None:
        """Forget all prompts (the embedding cache stays: the image did not change)."""
        self._save_history()
        self._prompts = []

    def _push(self, prompt) -> int:
        self._save_history()
        prompt_id = next(self._ids)
        self._prompts.append((prompt_id, prompt))
        return prompt_id

    def _save_history(self) -> None:
        self._history.append(list(self._prompts))
        del self._history[:-100]

    def _check_on_volume(self, ras) -> None:
        ijk = self.volume.ras_to_ijk(np.asarray(ras, dtype=float).reshape(1, 3))[0]
        shape = np.asarray(self.volume.shape)
        if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
            raise SAMMed3DError(
                f"the point {np.round(ras, 1).tolist()} (RAS mm) lies outside the volume "
                f"(voxel {np.round(ijk, 1).tolist()} of a {shape.tolist()} grid); place it on the image"
            )

    # ------------------------------------------------------------------ prediction
    def predict(self, cancel: Optional[threading.Event] = None) -> SessionResult:
        """Segment the current prompts. Raises SAMMed3DError when there is nothing to segment.

        If the GPU runs out of memory, the session moves to the CPU (with a warning and a note
        in the result) and predicts again there, unless ``cpu_fallback`` is False."""
        try:
            return self._predict(cancel)
        except torch.cuda.OutOfMemoryError:
            if not self.cpu_fallback or self.device.type == "cpu":
                raise SAMMed3DError(
                    "the GPU ran out of memory; close other GPU programs or use the CPU (--device cpu)"
                ) from None
        self._move_to_cpu()
        return self._predict(cancel)

    def _move_to_cpu(self) -> None:
        message = "the GPU ran out of memory; continuing on the CPU (slower)"
        warnings.warn(message)
        self.notes.append(message)
        self.device = torch.device("cpu")
        self.model.to(self.device)
        self.prepared.tensor(self.device)  # replaces the GPU copy of the prepared volume
        self._embeddings = OrderedDict((k, v.to(self.device)) for k, v in self._embeddings.items())
        self._steps.clear()
        torch.cuda.empty_cache()

    def _predict(self, cancel: Optional[threading.Event]) -> SessionResult:
        points = [p for _, p in self._prompts if isinstance(p, Point)]
        boxes = [p for _, p in self._prompts if isinstance(p, Box)]
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
        steps = self._prompt_steps(first, points, box, notes)
        prediction = self._replay(first, steps, timings, cancel)

        regions = []
        visited = [first]
        queue = [(first, prediction.logits)]
        while queue:
            window, logits = queue.pop(0)
            start = time.perf_counter()
            # window-sized logits, used both to map back and to find the faces the mask touches
            full = F.interpolate(logits.float(), size=(self.window_size,) * 3, mode="trilinear", align_corners=False)[0, 0]
            region, offset = windows.map_back(full, self.prepared, window)
            if box is not None and not self.model.base.box_prompts:
                region = self._clip_to_box(region, offset, box)
            regions.append((region, offset))
            timings["map_back"] += (time.perf_counter() - start) * 1e3
            for neighbour, seed in self._neighbours(window, full, visited):
                if len(visited) >= self.max_windows:
                    notes.append(
                        f"the object reaches past the window limit (max_windows={self.max_windows}); the mask "
                        "stops there (raise max_windows to follow it further)"
                    )
                    queue = []
                    break
                self._check_cancel(cancel)
                visited.append(neighbour)
                seeded = self._seed_prediction(neighbour, seed, points, timings, cancel)
                queue.append((neighbour, seeded.logits))
        for p in points:
            if all(self._in_window(w, p) is None for w in visited):
                notes.append(
                    f"the point {np.round(p.ras, 1).tolist()} mm lies outside every window the object reached "
                    "and was not used; place points on the same object, or start a new segment for it"
                )
        start = time.perf_counter()
        region, offset = _union(regions)
        timings["map_back"] += (time.perf_counter() - start) * 1e3
        return SessionResult(
            region=region,
            offset=offset,
            decoders=prediction.decoders,
            weights=prediction.weights,
            scores=prediction.scores,
            windows=[w.start for w in visited],
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            notes=sorted(set(self.notes + notes)),
        )

    def _prompt_steps(self, window: Window, points: List[Point], box: Optional[Box], notes: List[str]) -> List[tuple]:
        """One (coords, labels, box) triple per replay step, in window voxel indices."""
        box_window = None
        if box is not None:
            # all 8 corners: on an oblique grid two opposite RAS corners are not the extremes
            lo, hi = box.ras_min, box.ras_max
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            corners = windows.ras_to_window(self.prepared, window, corners)
            box_window = (tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))
            if not self.model.base.box_prompts:
                notes.append(
                    "this model has no box prompt; the box is used as a positive point at its centre "
                    "and the mask is limited to the box"
                )
                centre = (np.asarray(box.ras_min) + np.asarray(box.ras_max)) / 2
                points = [Point(tuple(centre), True)] + points
                box_window = None
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
            chosen = slice(k, k + 1) if self.protocol == "newest" else slice(0, k + 1)
            steps.append((tuple(coords[chosen]), tuple(labels[chosen]), box_window))
        return steps

    def _in_window(self, window: Window, point: Point) -> Optional[np.ndarray]:
        """The point's voxel coordinates in ``window``, or None when it lies outside."""
        c = windows.ras_to_window(self.prepared, window, np.array([point.ras]))[0]
        return None if np.any(c < -0.5) or np.any(c > self.window_size - 0.5) else c

    def _replay(self, window: Window, steps: List[tuple], timings: dict, cancel) -> Prediction:
        """Run the steps in ``window``, reusing memoised results of an unchanged prefix."""
        embedding = self._embedding(window, timings, cancel)
        model = self.model
        key = (window.start, self.expert, self.protocol, model.tau, model.selector, tuple(model.expert_names))
        memo = self._steps.setdefault(key, [])
        keep = 0
        while keep < min(len(memo), len(steps)) and memo[keep][0] == steps[keep]:
            keep += 1
        del memo[keep:]
        for k in range(keep, len(steps)):
            self._check_cancel(cancel)
            mask = memo[k - 1][1].logits if k else torch.zeros((1, 1) + self._lowres, dtype=self.dtype, device=self.device)
            memo.append((steps[k], self._decode(embedding, steps[k], mask, timings)))
        return memo[-1][1]

    def _decode(self, embedding: torch.Tensor, step: tuple, mask: torch.Tensor, timings: dict) -> Prediction:
        coords, labels, box = step
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
                                            mask_logits=mask.to(self.device, self.dtype), expert=self.expert)
        timings["decode"] += (time.perf_counter() - start) * 1e3
        return prediction

    def _embedding(self, window: Window, timings: dict, cancel) -> torch.Tensor:
        cached = self._embeddings.get(window.start)
        if cached is not None:
            self._embeddings.move_to_end(window.start)
            return cached
        self._check_cancel(cancel)
        start = time.perf_counter()
        image = windows.extract_window_tensor(self.prepared, window, self.device)[None, None].to(self.dtype)
        with torch.inference_mode():
            embedding = self.model.encode(image)
        timings["encode"] += (time.perf_counter() - start) * 1e3
        self._embeddings[window.start] = embedding
        while len(self._embeddings) > 1 and sum(e.numel() * e.element_size() for e in self._embeddings.values()) > self.cache_bytes:
            self._embeddings.popitem(last=False)
        return embedding

    # ------------------------------------------------------------------ windows beyond the first
    def _neighbours(self, window: Window, full: torch.Tensor, used: List[Window]):
        """Windows (50 % overlap) across faces that the mask touches and that are not the
        volume's edge, each with the mask found so far (``full``: the window's logits
        upsampled to the window size) as its seed."""
        size = self.window_size
        mask = full > 0
        shape = self.prepared.shape
        used_starts = {w.start for w in used}
        for axis in range(3):
            for side, face in ((-1, 0), (1, size - 1)):
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
                yield neighbour, (window, full)

    def _seed_prediction(self, window: Window, seed: Tuple[Window, torch.Tensor], points: List[Point],
                         timings: dict, cancel) -> Prediction:
        """Predict in a neighbouring window from the previous window's mask: its logits moved
        into this window as the mask prompt, a positive point at the mask's centre in the
        overlap, and the user's points that lie in this window (so a click can correct it)."""
        previous, full = seed
        size = self.window_size
        shift = [w - p for w, p in zip(window.start, previous.start)]
        moved = torch.full((size,) * 3, -20.0, device=full.device)
        src = tuple(slice(max(0, s), size + min(0, s)) for s in shift)
        dst = tuple(slice(max(0, -s), size - max(0, s)) for s in shift)
        moved[dst] = full[src]
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
        return self._decode(embedding, step, mask_prompt.to(self.dtype), timings)

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
