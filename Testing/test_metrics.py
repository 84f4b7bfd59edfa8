"""Dice and surface Dice (metrics.py, computed by MONAI) against values known by construction, and
on the example CT's reference labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from SAMMed3DMoELib import metrics
from SAMMed3DMoELib.errors import SAMMed3DError


def _box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_dice_of_overlapping_boxes_is_the_counted_value():
    a = _box((20, 20, 20), (2, 2, 2), (12, 12, 12))  # 1000 voxels
    b = _box((20, 20, 20), (7, 2, 2), (17, 12, 12))  # 1000 voxels, 500 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 500 / 2000)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(torch.from_numpy(a), b.astype(np.uint8)) == pytest.approx(0.5)
    empty = np.zeros_like(a)
    assert metrics.dice(empty, empty) == 1.0 and metrics.dice(a, empty) == 0.0


def test_surface_dice_follows_the_tolerance_in_millimetres():
    a = _box((30, 30, 30), (5, 5, 5), (20, 20, 20))
    shifted = np.roll(a, 1, axis=0)  # one voxel = 2 mm along the first axis
    spacing = (2.0, 1.0, 1.0)
    assert metrics.surface_dice(a, a, spacing, tolerance_mm=0.0) == pytest.approx(1.0)
    assert metrics.surface_dice(a, shifted, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    tight = metrics.surface_dice(a, shifted, spacing, tolerance_mm=1.0)
    assert 0.0 < tight < 1.0  # the two faces normal to the shift are 2 mm apart
    empty = np.zeros_like(a)
    assert metrics.surface_dice(empty, empty, spacing) == 1.0 and metrics.surface_dice(a, empty, spacing) == 0.0
    with pytest.raises(SAMMed3DError, match="spacing_mm"):
        metrics.surface_dice(a, shifted, (1.0, 0.0, 1.0))
    with pytest.raises(SAMMed3DError, match="3D masks"):
        metrics.dice(a, a[:-1])


def test_metrics_on_the_example_labels(data_dir):
    """Two different organs of the real example segmentation do not overlap; an organ against itself
    eroded by one voxel keeps a high Dice, and its surface Dice rises with the tolerance to almost 1
    at one voxel (3 mm)."""
    image = nib.load(data_dir / "example_seg.nii.gz")
    labels = np.asarray(image.dataobj)
    spacing = image.header.get_zooms()[:3]
    spleen, liver = labels == 1, labels == 5
    assert spleen.any() and liver.any()
    assert metrics.dice(spleen, liver) == 0.0
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(liver)
    assert 0.6 < metrics.dice(inner, liver) < 1.0
    strict = metrics.surface_dice(inner, liver, spacing, tolerance_mm=0.0)
    one_voxel = metrics.surface_dice(inner, liver, spacing, tolerance_mm=float(max(spacing)))
    assert strict < 0.5 < 0.95 < one_voxel <= 1.0
