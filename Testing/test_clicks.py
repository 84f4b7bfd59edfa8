"""Click simulation (SAMMed3DMoELib.clicks): the rules of SAM-Med3D's protocol, the no-error case
the official code crashes on, reproducibility, and the deterministic 'suggested click'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SAMMed3DMoELib.clicks import bounding_boxes, first_click, next_click, sample_clicks
from SAMMed3DMoELib.errors import SAMMed3DError


def _masks():
    target = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    target[0, 0, 1:3, 1:3, 1:3] = True          # 8 voxels
    prediction = torch.zeros_like(target)
    prediction[0, 0, 1:3, 1:3, 1] = True        # covers 4 of them ...
    prediction[0, 0, 5, 5, 5] = True            # ... and 1 background voxel
    return prediction, target


def test_clicks_are_uniform_over_the_error_region_with_the_right_polarity():
    prediction, target = _masks()
    fn = target & ~prediction
    fp = prediction & ~target
    n = int((fn | fp).sum())  # 4 false negatives + 1 false positive
    draws = 20 * n
    u = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws  # evenly spread: each voxel exactly 20 times
    coords, labels = sample_clicks(prediction.expand(draws, -1, -1, -1, -1), target.expand(draws, -1, -1, -1, -1), u)
    seen = {}
    for c, label in zip(coords[:, 0].long().tolist(), labels[:, 0].tolist()):
        seen.setdefault(tuple(c), []).append(label)
    assert len(seen) == n and all(len(v) == 20 for v in seen.values())
    for (i, j, k), polarity in seen.items():
        assert set(polarity) == {1 if fn[0, 0, i, j, k] else 0}
        assert bool(fn[0, 0, i, j, k] or fp[0, 0, i, j, k])


def test_first_click_is_a_positive_voxel_of_the_target():
    _, target = _masks()
    rng = np.random.default_rng(0)
    for _ in range(20):
        click = first_click(target[0, 0].numpy(), rng)
        assert click.positive and target[0, 0][click.index]


def test_no_error_region_confirms_the_object_or_clicks_background():
    _, target = _masks()
    click = next_click(target[0, 0].numpy(), target[0, 0].numpy(), np.random.default_rng(1))
    assert click.positive and target[0, 0][click.index]
    empty = np.zeros((4, 4, 4), bool)
    click = next_click(empty, empty, np.random.default_rng(1))
    assert not click.positive and all(0 <= i < 4 for i in click.index)


def test_batch_items_do_not_depend_on_each_other():
    prediction, target = _masks()
    other = torch.zeros_like(target)
    other[0, 0, 4, 4, 4] = True
    batch = sample_clicks(torch.cat([prediction, other]), torch.cat([target, target]), torch.tensor([0.3, 0.7]))
    alone = sample_clicks(prediction, target, torch.tensor([0.3]))
    assert torch.equal(batch[0][:1], alone[0]) and torch.equal(batch[1][:1], alone[1])


def test_center_mode_suggests_the_most_interior_error_voxel():
    target = np.zeros((9, 9, 9), bool)
    target[1:8, 1:8, 1:8] = True
    click = next_click(np.zeros_like(target), target, mode="center")
    assert click == next_click(np.zeros_like(target), target, mode="center")  # deterministic
    assert click.positive and click.index == (4, 4, 4)
    prediction = np.zeros_like(target)
    prediction[0:9, 0:9, 0:9] = True  # everything: the largest error is the background shell
    click = next_click(prediction, target, mode="center")
    assert not click.positive and not target[click.index]


def test_bounding_box_spans_voxel_faces_and_jitter_keeps_it_valid():
    _, target = _masks()
    box = bounding_boxes(target)
    assert box.tolist() == [[[0.5, 0.5, 0.5], [2.5, 2.5, 2.5]]]
    jittered = bounding_boxes(target, torch.full((1, 2, 3), 5.0))
    assert (jittered[:, 1] - jittered[:, 0] >= 1.0).all() and (jittered <= 5.5).all() and (jittered >= -0.5).all()
    with pytest.raises(SAMMed3DError, match="non-empty target"):
        bounding_boxes(torch.zeros_like(target))


def test_bad_input_is_explained():
    with pytest.raises(SAMMed3DError, match="one shape"):
        sample_clicks(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5), torch.zeros(1))
    with pytest.raises(SAMMed3DError, match="unknown click mode"):
        next_click(np.zeros((2, 2, 2)), np.ones((2, 2, 2)), mode="random")
