"""Objects larger than a window and results a GUI can write, proven with the oracle network
(Testing/oracle_model.py: a documented stand-in for a trained model whose mask of every window is
known) on an image made from the example CT's reference liver.

The image keeps the CT's 3 mm grid and the oracle works on 3 mm, 32³ windows (96 mm), so the
liver (about 200 mm across) needs tens of windows and every mask can be checked voxel for voxel.
"""

from __future__ import annotations

import numpy as np
import pytest

from oracle_model import oracle_moe, organ_image
from SAMMed3DMoELib import windows
from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.metrics import dice
from SAMMed3DMoELib.session import Session

CORE_RADIUS = 6  # voxels: a brighter ball inside the liver, well inside one 32³ window


@pytest.fixture(scope="module")
def liver(data_dir):
    volume, organ, _, interior = organ_image(data_dir)
    return volume, organ, interior


@pytest.fixture(scope="module")
def liver_with_core(data_dir):
    return organ_image(data_dir, core_radius=CORE_RADIUS)


def _session(volume, **kwargs) -> Session:
    return Session(volume, oracle_moe(), device="cpu", modality="MR", **kwargs)


def _stored(volume: Volume, mask: np.ndarray, how: str):
    """The same scan stored another way: axes reversed (and permuted), the affine changed so
    that every voxel keeps its place in RAS. Returns (volume, mask) in the new storage."""
    perm = {"as_is": (0, 1, 2), "flipped": (0, 1, 2), "flipped_permuted": (2, 0, 1)}[how]
    flips = {"as_is": (), "flipped": (0, 2), "flipped_permuted": (0, 1)}[how]
    array, label = volume.array.transpose(perm), mask.transpose(perm)
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        new_to_old[old_axis, new_axis] = 1
    for axis in flips:
        array, label = np.flip(array, axis), np.flip(label, axis)
        old_axis = perm[axis]
        new_to_old[old_axis, axis] = -1
        new_to_old[old_axis, 3] = volume.shape[old_axis] - 1
    return Volume(np.ascontiguousarray(array), volume.affine @ new_to_old), np.ascontiguousarray(label)


def _window_parts(session: Session, result, organ: np.ndarray) -> np.ndarray:
    """What the oracle finds in the listed windows: the organ's voxels inside any of them."""
    expected = np.zeros_like(organ)
    for start in result.windows:
        lo, hi = windows.region_bbox(session.prepared, windows.Window(start, session.window_size))
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        expected[box] |= organ[box]
    return expected


def _write(label: np.ndarray, result) -> np.ndarray:
    """What a GUI does with a result: overwrite the whole rewrite extent with the region."""
    o, r = result.offset, result.region
    label[o[0]:o[0] + r.shape[0], o[1]:o[1] + r.shape[1], o[2]:o[2] + r.shape[2]] = r
    return label


@pytest.mark.parametrize("how", ["as_is", "flipped", "flipped_permuted"])
def test_the_stitched_mask_matches_the_liver_across_many_windows(liver, how):
    volume, organ, interior = liver
    volume, organ = _stored(volume, organ, how)
    session = _session(volume, max_windows=200)
    session.add_point(volume.ijk_to_ras(np.argwhere(organ)[[np.argmin(np.linalg.norm(
        np.argwhere(organ) - np.argwhere(organ).mean(0), axis=1))]].astype(float))[0])
    result = session.predict()
    mask = result.full_mask(volume.shape)
    assert len(result.windows) >= 8, "the liver spans many 96 mm windows"
    assert not any("max_windows" in note for note in result.notes)
    assert dice(mask, organ) >= 0.95
    np.testing.assert_array_equal(mask, _window_parts(session, result, organ))


@pytest.mark.parametrize("max_windows", [1, 2, 3, 5])
def test_every_listed_window_contributes_its_part(liver, max_windows):
    """Reaching the limit stops new windows; the ones computed (and listed) are all in the mask."""
    volume, organ, interior = liver
    session = _session(volume, max_windows=max_windows)
    session.add_point_ijk(interior)
    result = session.predict()
    assert len(result.windows) == max_windows
    assert any("max_windows" in note for note in result.notes)
    mask = result.full_mask(volume.shape)
    np.testing.assert_array_equal(mask, _window_parts(session, result, organ))
    if max_windows > 1:  # the last window listed adds voxels no earlier window has
        fewer = _session(volume, max_windows=max_windows - 1)
        fewer.add_point_ijk(interior)
        assert (mask & ~fewer.predict().full_mask(volume.shape)).any()


def _negative_beside_the_core(organ, core, interior):
    """A liver voxel just outside the core, on the same axis line as the core's centre."""
    for axis in range(3):
        for side in (1, -1):
            voxel = np.array(interior)
            voxel[axis] += side * (CORE_RADIUS + 2)
            if np.all(voxel >= 0) and np.all(voxel < organ.shape) and organ[tuple(voxel)] and not core[tuple(voxel)]:
                return voxel
    raise AssertionError("no liver voxel beside the core")


def test_a_negative_click_that_shrinks_the_object_clears_its_old_voxels(liver_with_core):
    volume, organ, core, interior = liver_with_core
    session = _session(volume, max_windows=200)
    session.add_point_ijk(interior)
    whole = session.predict()
    label = _write(np.zeros(volume.shape, bool), whole)
    np.testing.assert_array_equal(label, organ)
    assert len(whole.windows) > 1

    session.add_point_ijk(_negative_beside_the_core(organ, core, interior), positive=False)
    shrunk = session.predict()
    assert len(shrunk.windows) == 1 and shrunk.revision == session.revision
    np.testing.assert_array_equal(shrunk.full_mask(volume.shape), core)
    window_lo, window_hi = windows.region_bbox(session.prepared, windows.Window(shrunk.windows[0], 32))
    outside_window = organ.copy()
    outside_window[tuple(slice(a, b) for a, b in zip(window_lo, window_hi))] = False
    assert outside_window.any(), "the old mask had voxels outside the new window (they must be cleared)"
    np.testing.assert_array_equal(_write(label, shrunk), core)

    assert session.undo()
    undone = session.predict()
    np.testing.assert_array_equal(_write(label, undone), organ)

    cleared = session.reset()
    assert cleared.empty and cleared.revision == session.revision
    assert not _write(label, cleared).any()


def test_a_result_dropped_as_stale_leaves_nothing_behind(liver_with_core):
    """The GUI wrote the whole liver, then dropped a result (stale); the next result still
    clears what the written one set."""
    volume, organ, core, interior = liver_with_core
    session = _session(volume, max_windows=200)
    session.add_point_ijk(interior)
    label = _write(np.zeros(volume.shape, bool), session.predict())
    negative = session.add_point_ijk(_negative_beside_the_core(organ, core, interior), positive=False)
    session.predict()  # dropped: never written
    session.remove_prompt(negative)
    session.add_point_ijk(_negative_beside_the_core(organ, core, interior), positive=False)
    latest = session.predict()
    np.testing.assert_array_equal(_write(label, latest), core)


def test_a_new_segment_forgets_the_previous_extent(liver_with_core):
    volume, organ, core, interior = liver_with_core
    session = _session(volume, max_windows=200)
    session.add_point_ijk(interior)
    session.predict()
    session.start_new_segment()
    assert session.prompts == [] and not session.undo()
    session.add_point_ijk(interior)
    session.add_point_ijk(_negative_beside_the_core(organ, core, interior), positive=False)
    result = session.predict()
    lo, hi = windows.region_bbox(session.prepared, windows.Window(result.windows[0], 32))
    assert result.offset == lo and result.region.shape == tuple(np.subtract(hi, lo)), \
        "only the new window is rewritten: the accepted segment keeps its voxels"


def test_results_in_slicer_order_match_the_plain_ones(liver):
    """Volume.from_kji takes Slicer's arrayFromVolume order; region_kji and extent_ijk give the
    result as vtkOrientedImageData wants it. Both agree with the [i, j, k] results."""
    volume, organ, interior = liver
    array_kji = np.ascontiguousarray(volume.array.transpose(2, 1, 0))  # what arrayFromVolume returns
    from_slicer = Volume.from_kji(array_kji, volume.affine)
    assert from_slicer.shape == volume.shape and np.shares_memory(from_slicer.array, array_kji)
    results = []
    for vol in (volume, from_slicer):
        session = _session(vol, max_windows=3)
        session.add_point_ijk(interior)
        results.append(session.predict())
    plain, slicer = results
    np.testing.assert_array_equal(slicer.region, plain.region)
    assert slicer.offset == plain.offset

    kji = slicer.region_kji
    assert kji.dtype == np.uint8 and kji.flags.c_contiguous
    np.testing.assert_array_equal(kji, plain.region.transpose(2, 1, 0))
    i0, i1, j0, j1, k0, k1 = slicer.extent_ijk
    assert (i0, j0, k0) == plain.offset and (i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1) == plain.region.shape
    label_kji = np.zeros(array_kji.shape, np.uint8)
    label_kji[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = kji
    np.testing.assert_array_equal(label_kji, plain.full_mask(volume.shape).transpose(2, 1, 0))

    nothing = _session(volume).reset()
    assert nothing.empty and nothing.extent_ijk == (0, -1, 0, -1, 0, -1)


def test_a_blob_apart_from_the_clicked_object_is_not_followed(data_dir):
    """Spleen and liver both bright (two separate objects for the oracle), a click in the spleen:
    the session follows the spleen across its windows but opens no window for the liver, which
    merely shows in the spleen's windows (before this rule the click segmented the whole liver
    through 41 windows that hold no spleen)."""
    _, spleen, _, interior = organ_image(data_dir, "spleen")
    volume, liver, _, _ = organ_image(data_dir, "liver")
    image = Volume(1.0 + (spleen | liver).astype(np.float32), volume.affine)
    session = _session(image, max_windows=200)
    session.add_point_ijk(interior)
    result = session.predict()
    mask = result.full_mask(image.shape)
    assert len(result.windows) > 1, "the spleen spans several 96 mm windows"
    assert np.array_equal(mask & spleen, spleen)
    for start in result.windows:
        lo, hi = windows.region_bbox(session.prepared, windows.Window(start, session.window_size))
        assert spleen[tuple(slice(a, b) for a, b in zip(lo, hi))].any(), f"window {start} holds no spleen"
    assert (mask & liver).sum() < 0.05 * liver.sum()
