"""Overlap metrics, computed by MONAI, shared by the demo, evaluation and the tests.

* :func:`dice`: the Dice coefficient of two binary masks (``monai.metrics.compute_dice``).
* :func:`surface_dice`: the normalised surface Dice (NSD) at a tolerance in millimetres,
  spacing-aware (``monai.metrics.compute_surface_dice``, which needs SciPy).

Both take boolean (or 0/1) arrays or tensors of the same 3D shape, e.g. ``[i, j, k]`` on one
grid. Two empty masks agree perfectly (1.0); one empty and one not gives 0.0.
"""

from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch

from .errors import SAMMed3DError

ArrayLike = Union[np.ndarray, torch.Tensor]


def _pair(prediction: ArrayLike, reference: ArrayLike):
    pred = torch.as_tensor(np.asarray(prediction) if not isinstance(prediction, torch.Tensor) else prediction)
    ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise SAMMed3DError(
            f"metrics compare two 3D masks on one grid; got shapes {tuple(pred.shape)} and {tuple(ref.shape)}"
        )
    return (pred != 0).float()[None, None], (ref != 0).float()[None, None]


def dice(prediction: ArrayLike, reference: ArrayLike) -> float:
    """Dice = 2|P∩R| / (|P| + |R|) of two (X, Y, Z) masks; 1.0 when both are empty."""
    from monai.metrics import compute_dice

    pred, ref = _pair(prediction, reference)
    return float(compute_dice(pred, ref, include_background=True, ignore_empty=False)[0, 0])


def surface_dice(prediction: ArrayLike, reference: ArrayLike, spacing_mm: Sequence[float],
                 tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice of two (X, Y, Z) masks: the fraction of both surfaces that lies
    within ``tolerance_mm`` of the other, with voxel size ``spacing_mm`` (per array axis).
    1.0 when both are empty, 0.0 when exactly one is."""
    from monai.metrics import compute_surface_dice

    pred, ref = _pair(prediction, reference)
    empty_pred, empty_ref = not bool(pred.any()), not bool(ref.any())
    if empty_pred or empty_ref:
        return 1.0 if empty_pred and empty_ref else 0.0
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SAMMed3DError(f"spacing_mm needs three positive voxel sizes in mm, got {spacing_mm!r}")
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an internal argument it passes itself
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(pred, ref, class_thresholds=[float(tolerance_mm)], include_background=True,
                                     spacing=spacing)
    return float(value[0, 0])
