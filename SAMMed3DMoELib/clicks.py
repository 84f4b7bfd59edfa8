"""Simulated clicks: the one implementation shared by training, evaluation and the GUI.

SAM-Med3D's protocol (and the MoE paper's evaluation): the first click is drawn uniformly from
the target; every later click is drawn uniformly from the *error region* of the current
prediction, positive where the prediction misses the target (false negative) and negative
where it covers background (false positive).

The case the official code crashes on (``randint(0)`` on an empty error region) is defined
here: when the prediction equals the target, the click confirms the object (a positive click
drawn uniformly inside the target); when the target is empty as well, it is a negative click
drawn uniformly anywhere.

Two forms:

* :func:`sample_clicks` works on batches of tensors on any device (training): masks
  ``(B, 1, X, Y, Z)``, one uniform number per item in ``u`` (so the caller decides where the
  randomness comes from and a run is reproducible whatever the device or the batch layout);
* :func:`first_click` / :func:`next_click` work on one 3D array (evaluation, the GUI), with a
  ``numpy.random.Generator``; ``mode="center"`` instead picks the most interior voxel of the
  largest error (a deterministic "suggested click" for a GUI).

Coordinates are voxel indices in the masks' own axis order (the model's point convention when
the masks are model windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import SAMMed3DError

__all__ = ["Click", "sample_clicks", "bounding_boxes", "first_click", "next_click", "simulate", "CLICK_MODES"]

CLICK_MODES = ("uniform", "center")


@dataclass(frozen=True)
class Click:
    """One simulated click: a voxel index of the masks' grid and its polarity."""

    index: Tuple[int, int, int]
    positive: bool


def _flat_masks(prediction: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, Tuple[int, ...]]:
    if prediction.shape != target.shape or prediction.ndim not in (4, 5):
        raise SAMMed3DError(
            f"click simulation needs a prediction and a target of one shape (B, 1, X, Y, Z) or (B, X, Y, Z); "
            f"got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    spatial = tuple(int(s) for s in target.shape[-3:])
    b = target.shape[0]
    return prediction.reshape(b, -1).bool(), target.reshape(b, -1).bool(), spatial


def _uniform_pick(region: Tensor, u: Tensor) -> Tensor:
    """For each row of the boolean (B, N) ``region`` (each with at least one True), the flat index
    of its ``floor(u * count)``-th True element: a uniform draw when ``u`` is uniform in [0, 1)."""
    counts = region.sum(dim=1)
    k = (u.to(torch.float64) * counts.to(torch.float64)).floor().long()
    k = torch.minimum(k.clamp_min(0), counts - 1)
    cumulative = region.cumsum(dim=1)
    return torch.searchsorted(cumulative, (k + 1)[:, None])[:, 0]


def sample_clicks(prediction: Tensor, target: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
    """One click per batch item, uniformly from its error region.

    ``prediction``, ``target``: (B, 1, X, Y, Z) or (B, X, Y, Z) masks (bool, or numbers where
    non-zero is inside); ``u``: (B,) numbers uniform in [0, 1). Returns ``coords`` (B, 1, 3)
    float voxel indices and ``labels`` (B, 1) long (1 positive, 0 negative), on the masks' device.
    """
    pred, tgt, spatial = _flat_masks(prediction, target)
    u = torch.as_tensor(u, device=tgt.device).reshape(-1)
    if u.numel() != tgt.shape[0]:
        raise SAMMed3DError(f"sample_clicks needs one random number per batch item ({tgt.shape[0]}), got {u.numel()}")
    false_negative = tgt & ~pred
    error = false_negative | (pred & ~tgt)
    has_error = error.any(dim=1)
    has_target = tgt.any(dim=1)
    region = torch.where(has_error[:, None], error, torch.where(has_target[:, None], tgt, torch.ones_like(tgt)))
    flat = _uniform_pick(region, u)
    positive = torch.where(has_error, false_negative.gather(1, flat[:, None])[:, 0], has_target)
    coords = torch.stack(torch.unravel_index(flat, spatial), dim=-1).to(torch.float32)
    return coords[:, None, :], positive.long()[:, None]


def bounding_boxes(target: Tensor, jitter: Optional[Tensor] = None) -> Tensor:
    """The box prompt of each target: (B, 2, 3) corners ``[min - 0.5, max + 0.5]`` in voxel
    indices (the outer faces of the extreme voxels, so a one-voxel object still has a box).

    ``jitter``: optional (B, 2, 3) offsets in voxels added to the corners (training noise); the
    result is kept ordered and inside the grid. An item with an empty target is an error."""
    b = target.shape[0]
    spatial = target.shape[-3:]
    mask = target.reshape(b, *spatial).bool()
    if not bool(mask.reshape(b, -1).any(dim=1).all()):
        raise SAMMed3DError("a box prompt needs a non-empty target in every batch item")
    lows, highs = [], []
    for axis in range(3):
        other = tuple(a + 1 for a in range(3) if a != axis)
        along = mask.any(dim=other)  # (B, n_axis)
        index = torch.arange(spatial[axis], device=mask.device)
        lows.append(torch.where(along, index, spatial[axis]).min(dim=1).values)
        highs.append(torch.where(along, index, -1).max(dim=1).values)
    box = torch.stack([torch.stack(lows, -1), torch.stack(highs, -1)], dim=1).to(torch.float32)
    box[:, 0] -= 0.5
    box[:, 1] += 0.5
    if jitter is not None:
        box = box + jitter.to(box)
        limit = torch.tensor(spatial, dtype=box.dtype, device=box.device) - 0.5
        lo = torch.minimum(torch.minimum(box[:, 0], box[:, 1]).clamp(min=-0.5), limit - 1.0)
        hi = torch.minimum(torch.maximum(box[:, 0], box[:, 1]), limit.expand_as(lo))
        box = torch.stack([lo, torch.maximum(hi, lo + 1.0)], dim=1)
    return box


# ---------------------------------------------------------------------------------- one volume


def _as_bool(array, name: str) -> np.ndarray:
    a = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    if a.ndim != 3:
        raise SAMMed3DError(f"{name} must be a 3D mask, got shape {a.shape}")
    return a != 0


def first_click(target, rng: Optional[np.random.Generator] = None, mode: str = "uniform",
                spacing: Optional[Sequence[float]] = None) -> Click:
    """The first click on ``target`` (3D mask): uniform inside it, or its most interior voxel
    (``mode="center"``). Same as :func:`next_click` with an empty prediction."""
    tgt = _as_bool(target, "the target")
    return next_click(np.zeros_like(tgt), tgt, rng, mode, spacing)


def next_click(prediction, target, rng: Optional[np.random.Generator] = None, mode: str = "uniform",
               spacing: Optional[Sequence[float]] = None) -> Click:
    """The next click for 3D masks ``prediction`` and ``target`` of one grid.

    ``mode="uniform"``: SAM-Med3D's rule (see :func:`sample_clicks`), drawn with ``rng``
    (default: a fresh unseeded generator). ``mode="center"``: the voxel farthest from the border
    of the error region (false negatives and false positives taken separately, the larger wins;
    ``spacing`` in mm makes the distance physical), positive on a false negative: deterministic,
    a GUI's suggested click. Without an error region both modes confirm the object as above."""
    if mode not in CLICK_MODES:
        raise SAMMed3DError(f"unknown click mode {mode!r}; use one of {', '.join(CLICK_MODES)}")
    pred = _as_bool(prediction, "the prediction")
    tgt = _as_bool(target, "the target")
    if pred.shape != tgt.shape:
        raise SAMMed3DError(f"the prediction {pred.shape} and the target {tgt.shape} must share one grid")
    if mode == "center":
        click = _center_click(pred, tgt, spacing)
        if click is not None:
            return click
    rng = rng if rng is not None else np.random.default_rng()
    coords, labels = sample_clicks(torch.from_numpy(pred)[None], torch.from_numpy(tgt)[None],
                                   torch.tensor([rng.random()], dtype=torch.float64))
    return Click(tuple(int(v) for v in coords[0, 0].tolist()), bool(labels[0, 0]))


def _center_click(pred: np.ndarray, tgt: np.ndarray, spacing) -> Optional[Click]:
    from scipy.ndimage import distance_transform_edt

    best = None
    for region, positive in ((tgt & ~pred, True), (pred & ~tgt, False)):
        if not region.any():
            continue
        padded = np.pad(region, 1)  # the grid's edge counts as a border
        distance = distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
        index = np.unravel_index(int(np.argmax(distance)), distance.shape)
        if best is None or distance[index] > best[0]:
            best = (float(distance[index]), Click(tuple(int(i) for i in index), positive))
    return None if best is None else best[1]


def simulate(session, target, n_clicks: int, rng: Optional[np.random.Generator] = None, mode: str = "uniform",
             spacing: Optional[Sequence[float]] = None) -> Iterator[Tuple[Click, np.ndarray]]:
    """Click an interactive ``session`` (:class:`~SAMMed3DMoELib.session.Session`) ``n_clicks``
    times against ``target`` (bool [i, j, k] on the session's volume grid), each click chosen by
    :func:`next_click` from the previous prediction. The session is reset first. Yields
    ``(click, prediction)`` after each click, ``prediction`` bool [i, j, k] on the same grid."""
    target = _as_bool(target, "the target")
    session.reset()
    prediction = np.zeros(target.shape, dtype=bool)
    for _ in range(int(n_clicks)):
        click = next_click(prediction, target, rng, mode, spacing)
        session.add_point_ijk(click.index, positive=click.positive)
        prediction = session.predict().full_mask(target.shape)
        yield click, prediction
