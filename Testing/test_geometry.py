"""Geometry: loading, the prepared grid, windows, mapping masks back, saving.

Uses the real TotalSegmentator example scans (Resources/SampleData/totalsegmentator-example). The CT is
also rewritten in four other geometries (oblique, anisotropic, permuted+flipped, all three at
once) so every check runs on grids where a mix-up of axes, signs or voxel centres shows.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.geometry import PreparedVolume, Volume, canonical_transform, is_ct, resample_label, prepare_volume
from SAMMed3DMoELib.volume_io import load_volume, save_mask
from SAMMed3DMoELib.windows import (
    Window,
    extract_window,
    extract_window_tensor,
    map_back,
    ras_to_window,
    region_bbox,
    window_for_box,
    window_for_point,
)

ORGANS = {"spleen": 1, "kidney_left": 3, "liver": 5}


# --------------------------------------------------------------------------- helpers


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [x for x in range(3) if x != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def permute_flip(arr: np.ndarray, affine: np.ndarray, perm, flips):
    """Reorder the array's axes (new axis a = old axis perm[a], reversed if flips[a]) and fix the
    affine so every voxel keeps its physical position. Returns (array, affine, T) with T the 4x4
    new index -> old index."""
    new = np.transpose(arr, perm)
    T = np.zeros((4, 4))
    T[3, 3] = 1
    for a, (old, flip) in enumerate(zip(perm, flips)):
        if flip:
            new = np.flip(new, axis=a)
            T[old, a] = -1
            T[old, 3] = arr.shape[old] - 1
        else:
            T[old, a] = 1
    return np.ascontiguousarray(new), affine @ T, T


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """Voxels whose whole (2r+1)^3 neighbourhood is inside ``mask`` (numpy only)."""
    out = mask.copy()
    n = mask.shape
    padded = np.zeros(tuple(s + 2 * r for s in n), bool)
    padded[r:-r, r:-r, r:-r] = mask
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            for dk in range(-r, r + 1):
                out &= padded[r + di : r + di + n[0], r + dj : r + dj + n[1], r + dk : r + dk + n[2]]
    return out


def window_crop(arr: np.ndarray, window: Window, fill=0.0) -> np.ndarray:
    s = window.size
    out = np.full((s, s, s), fill, dtype=np.float32)
    src = tuple(slice(max(0, a), min(n, a + s)) for a, n in zip(window.start, arr.shape))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, window.start))
    out[dst] = arr[src]
    return out


def paste(region: np.ndarray, offset, shape) -> np.ndarray:
    full = np.zeros(shape, bool)
    full[tuple(slice(o, o + n) for o, n in zip(offset, region.shape))] = region
    return full


# --------------------------------------------------------------------------- variants


class Variant:
    def __init__(self, name, path, label, to_new):
        self.name = name
        self.path = path
        self.label = label  # on the variant's grid
        self.to_new = to_new  # 4x4 original index -> variant index


@pytest.fixture(scope="module")
def variants(data_dir, tmp_path_factory):
    """The CT in five geometries, written as NIfTI with nibabel (an independent writer)."""
    tmp = tmp_path_factory.mktemp("geometry_variants")
    img = nib.load(data_dir / "example_ct_sm.nii.gz")
    arr = np.asanyarray(img.dataobj)
    aff = img.affine
    seg = np.asanyarray(nib.load(data_dir / "example_seg.nii.gz").dataobj)
    centre = aff @ np.r_[(np.array(arr.shape) - 1) / 2, 1]
    around_centre = lambda r: (  # noqa: E731
        np.block([[np.eye(3), centre[:3, None]], [0, 0, 0, 1]]) @ r
        @ np.block([[np.eye(3), -centre[:3, None]], [0, 0, 0, 1]])
    )
    oblique = around_centre(rotation(0, 20) @ rotation(2, 20))
    aniso = np.diag([0.8 / 3, 1.3 / 3, 3.0 / 3, 1.0])

    out = {}

    def add(name, a, af, lab, to_new):
        path = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(a, af), path)
        out[name] = Variant(name, path, lab, to_new)

    out["plain"] = Variant("plain", data_dir / "example_ct_sm.nii.gz", seg, np.eye(4))
    add("oblique", arr, oblique @ aff, seg, np.eye(4))
    add("anisotropic", arr, aff @ aniso, seg, np.eye(4))
    a2, af2, T = permute_flip(arr, aff, (2, 0, 1), (True, False, True))
    s2, _, _ = permute_flip(seg, aff, (2, 0, 1), (True, False, True))
    add("permuted_flipped", a2, af2, s2, np.linalg.inv(T))
    a3, af3, T3 = permute_flip(arr, around_centre(rotation(1, 25) @ rotation(0, -15)) @ aff @ aniso,
                               (1, 2, 0), (False, True, True))
    s3, _, _ = permute_flip(seg, aff, (1, 2, 0), (False, True, True))
    add("all_combined", a3, af3, s3, np.linalg.inv(T3))
    return out


@pytest.fixture(scope="module")
def loaded(variants):
    """(Volume, PreparedVolume) per variant."""
    res = {}
    for name, var in variants.items():
        vol = load_volume(var.path)
        res[name] = (vol, prepare_volume(vol))
    return res


VARIANT_NAMES = ["plain", "oblique", "anisotropic", "permuted_flipped", "all_combined"]


# --------------------------------------------------------------------------- loading


def test_nifti_affine_matches_nibabel(data_dir, variants):
    paths = [data_dir / "example_ct_sm.nii.gz", data_dir / "example_mr_sm.nii.gz"]
    paths += [v.path for v in variants.values()]
    for path in paths:
        vol = load_volume(path)
        img = nib.load(path)
        np.testing.assert_allclose(vol.affine, img.affine, atol=2e-4, err_msg=str(path))
        np.testing.assert_array_equal(vol.array, np.asanyarray(img.dataobj), err_msg=str(path))
        np.testing.assert_allclose(vol.spacing, img.header.get_zooms()[:3], rtol=1e-5)


def test_mr_lps_orientation(data_dir):
    vol = load_volume(data_dir / "example_mr_sm.nii.gz")
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert not is_ct(vol)
    prep = prepare_volume(vol)
    assert not prep.is_ct
    assert nib.aff2axcodes(prep.affine) == ("R", "A", "S")
    np.testing.assert_allclose(prep.spacing, 1.5)
    # The prepared grid covers the same physical box: compare the outer faces' centres.
    src_lo = vol.ijk_to_ras(np.array([[-0.5, -0.5, -0.5], np.array(vol.shape) - 0.5]))
    prep_lo = prep.index_to_ras(np.array([-0.5, -0.5, -0.5]))
    # The canonical low corner is the source's high corner along flipped axes (i, j).
    np.testing.assert_allclose(prep_lo, [src_lo[1, 0], src_lo[1, 1], src_lo[0, 2]], atol=1e-6)
    # MR is not clamped: the intensities stay in the MR range.
    assert prep.array.max() <= vol.array.max() + 1e-3
    assert prep.array.min() >= vol.array.min() - 1e-3


def test_dicom_series(data_dir):
    vol = load_volume(data_dir / "ct_dicom")
    assert vol.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.spacing, [0.9765625, 0.9765625, 2.0], rtol=1e-6)
    assert is_ct(vol)
    assert vol.array.min() <= -1000 and vol.array.max() > 500
    # LPS -> RAS: the RAS origin is SimpleITK's origin with x and y negated.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data_dir / "ct_dicom")))
    img = reader.Execute()
    origin = np.array(img.GetOrigin()) * [-1, -1, 1]
    np.testing.assert_allclose(vol.ijk_to_ras([0, 0, 0]), origin)
    # Voxel [i, j, k] of the volume is SimpleITK's pixel (x=i, y=j, z=k).
    arr = sitk.GetArrayViewFromImage(img)
    assert vol.array[300, 100, 7] == arr[7, 100, 300]
    prep = prepare_volume(vol)
    assert prep.is_ct and prep.array.min() >= -1000 and prep.array.max() <= 1000


def test_is_ct_and_modality_override():
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 2000, size=(20, 21, 22)).astype(np.int16)
    vol = Volume(arr, np.diag([1.5, 1.5, 1.5, 1.0]))
    assert is_ct(vol)
    assert not is_ct(Volume(np.abs(arr), vol.affine))
    ct = prepare_volume(vol)  # 1.5 mm RAS already: the prepared grid is the source grid
    np.testing.assert_allclose(ct.affine, vol.affine)
    np.testing.assert_array_equal(ct.array, np.clip(arr, -1000, 1000).astype(np.float32))
    mr = prepare_volume(vol, modality="MR")
    assert not mr.is_ct
    np.testing.assert_array_equal(mr.array, arr.astype(np.float32))
    assert prepare_volume(Volume(np.abs(arr), vol.affine), modality="CT").array.max() == 1000
    with pytest.raises(SAMMed3DError, match="modality must be"):
        prepare_volume(vol, modality="PET")


# --------------------------------------------------------------------------- prepared grid


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_canonical_order_matches_nibabel(variants, loaded, name):
    vol, prep = loaded[name]
    img = nib.load(variants[name].path)
    canon = nib.as_closest_canonical(img)
    P, _, _ = canonical_transform(vol.affine, vol.shape)
    np.testing.assert_allclose(vol.affine @ P, canon.affine, atol=2e-4)
    # Prepared axes point the canonical way, keeping oblique direction cosines (no rotation).
    dirs = prep.affine[:3, :3] / prep.spacing
    canon_dirs = canon.affine[:3, :3] / np.linalg.norm(canon.affine[:3, :3], axis=0)
    np.testing.assert_allclose(dirs, canon_dirs, atol=1e-4)
    np.testing.assert_allclose(prep.spacing, 1.5, rtol=1e-9)
    assert np.all(np.diag(dirs) > 0.5)


def _closest_canonical_by_hand(affine):
    """The hand-written rule canonical_transform used before it called nibabel: each original
    axis, in order, takes the free world axis its orthogonalised direction is closest to.
    Returns (axes, flips) like canonical_transform."""
    lin = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(lin)
    rot = u @ vt
    free, axes, flips = [True] * 3, [-1] * 3, [False] * 3
    for src in range(3):
        world = int(np.argmax(np.abs(rot[:, src]) * np.asarray(free, dtype=float)))
        free[world] = False
        axes[world], flips[world] = src, bool(rot[world, src] < 0)
    return axes, flips


def test_canonical_transform_is_nibabel_and_equals_the_hand_written_rule():
    """On oblique, flipped, permuted, anisotropic and sheared grids: the reorientation is exactly
    nibabel's as_closest_canonical (array and affine), and wherever no two axes compete for one
    world axis (all but directions near 45 degrees) it equals the rule this module had by hand."""
    rng = np.random.default_rng(7)
    agreed = 0
    for _ in range(200):
        rot = rotation(0, rng.uniform(-40, 40)) @ rotation(1, rng.uniform(-40, 40)) @ rotation(2, rng.uniform(-40, 40))
        perm = rng.permutation(3)
        lin = rot[:3, :3][:, perm] * rng.choice([-1, 1], 3) * rng.uniform(0.5, 5.0, 3)
        lin[:, 2] += 0.05 * rng.standard_normal(3) * np.linalg.norm(lin[:, 2])  # a little shear
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = lin, rng.uniform(-100, 100, 3)
        shape = tuple(int(n) for n in rng.integers(3, 7, 3))
        data = rng.standard_normal(shape)
        P, axes, flips = canonical_transform(affine, shape)

        canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
        ours = np.transpose(data, axes)
        for a in range(3):
            if flips[a]:
                ours = np.flip(ours, a)
        np.testing.assert_array_equal(ours, canon.get_fdata())
        np.testing.assert_allclose(affine @ P, canon.affine, atol=1e-6)

        orthogonal = np.linalg.svd(lin / np.linalg.norm(lin, axis=0))
        nearest = np.argmax(np.abs(orthogonal[0] @ orthogonal[2]), axis=0)
        if len(set(nearest.tolist())) == 3:  # no competition between axes
            assert (axes, flips) == _closest_canonical_by_hand(affine), affine
            agreed += 1
    assert agreed >= 150


@pytest.mark.parametrize("name", ["plain", "all_combined"])
def test_resampling_agrees_with_simpleitk(variants, loaded, name):
    """An independent resampler (ITK, linear) on the prepared grid's geometry gives our values:
    this pins the voxel-centre convention and the prepared affine together."""
    vol, prep = loaded[name]
    src = sitk.Cast(sitk.ReadImage(str(variants[name].path)), sitk.sitkFloat32)
    src = sitk.Clamp(src, sitk.sitkFloat32, -1000, 1000)
    lps = np.diag([-1.0, -1, 1, 1]) @ prep.affine
    ref = sitk.Image([int(n) for n in prep.shape], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in prep.spacing])
    ref.SetDirection([float(v) for v in (lps[:3, :3] / prep.spacing).ravel()])
    ref.SetOrigin([float(v) for v in lps[:3, 3]])
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -5000.0)
    out = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    valid = out > -4999
    valid[[0, -1]] = valid[:, [0, -1]] = valid[:, :, [0, -1]] = False  # edges: ITK's border rule differs
    assert valid.mean() > 0.8
    np.testing.assert_allclose(prep.array[valid], out[valid], atol=0.05)


def test_permuted_flipped_prepares_to_the_same_grid(loaded):
    _, plain = loaded["plain"]
    _, pf = loaded["permuted_flipped"]
    assert plain.shape == pf.shape
    np.testing.assert_allclose(pf.affine, plain.affine, atol=1e-4)
    np.testing.assert_allclose(pf.array, plain.array, atol=1e-3)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_point_maps_to_same_tissue(variants, loaded, data_dir, name):
    var = variants[name]
    vol, prep = loaded[name]
    affine_nib = nib.load(var.path).affine  # independent of our loader
    ct = np.asanyarray(nib.load(data_dir / "example_ct_sm.nii.gz").dataobj)
    seg = np.asanyarray(nib.load(data_dir / "example_seg.nii.gz").dataobj)
    for organ, lid in ORGANS.items():
        inner = eroded(seg == lid, 2)
        cand = np.argwhere(inner)
        assert len(cand), organ
        o = cand[np.argmin(np.linalg.norm(cand - cand.mean(0), axis=1))]  # interior, near centroid
        n = (var.to_new @ np.r_[o, 1])[:3].round().astype(int)
        assert vol.array[tuple(n)] == ct[tuple(o)]  # the variant really moved the voxel there
        ras = (affine_nib @ np.r_[n, 1])[:3]
        np.testing.assert_allclose(vol.ras_to_ijk(ras[None])[0], n, atol=1e-3)
        np.testing.assert_allclose(vol.ijk_to_ras(n[None])[0], ras, atol=1e-3)

        win = window_for_point(prep, ras)
        w = ras_to_window(prep, win, ras[None])[0]
        assert np.all(np.abs(w - win.size // 2) <= 0.5 + 1e-6), (organ, w)  # ties round up (window placement epsilon)
        wi = tuple(np.floor(w + 0.5).astype(int))
        plab = resample_label(var.label, vol, prep)
        assert window_crop(plab, win)[wi] == lid, (organ, name)
        # Intensity: linear interpolation of the voxels around the point (within one voxel).
        value = window_crop(prep.array, win)[wi]
        hood = ct[tuple(slice(c - 1, c + 2) for c in o)].clip(-1000, 1000)
        assert hood.min() - 1e-3 <= value <= hood.max() + 1e-3, (organ, value, hood.min(), hood.max())
        # The normalised window holds the same voxel, z-scored.
        xw = extract_window(prep, win)
        crop = window_crop(prep.array, win)
        fg = crop[crop > 0].astype(np.float64)
        assert xw[wi] == pytest.approx((value - fg.mean()) / fg.std(ddof=1), abs=1e-4)


def test_extract_window_pads_and_normalises(loaded):
    _, prep = loaded["plain"]
    # Window hanging over the low corner: negative start.
    win = window_for_point(prep, prep.index_to_ras(np.array([3.0, 5.0, 2.0])))
    assert all(s < 0 for s in win.start)
    x = extract_window(prep, win)
    assert x.shape == (128, 128, 128) and x.dtype == np.float32
    crop = window_crop(prep.array, win)
    fg = crop[crop > 0].astype(np.float64)
    mean, std = fg.mean(), fg.std(ddof=1)
    np.testing.assert_allclose(x, (crop - mean) / std, atol=1e-4)
    pad = -win.start[0]
    np.testing.assert_allclose(x[:pad], -mean / std, rtol=1e-5)  # zero padding, normalised
    assert abs(float(x[crop > 0].mean())) < 1e-3 and abs(float(x[crop > 0].std()) - 1) < 1e-3
    # A window with no voxel > 0 and a constant window do not divide by zero.
    flat = PreparedVolume(np.full((10, 10, 10), -1000, np.float32), np.eye(4), prep.source, True)
    xf = extract_window(flat, Window((0, 0, 0), 16))
    assert np.all(np.isfinite(xf))


def test_window_errors(loaded):
    _, prep = loaded["plain"]
    far = prep.index_to_ras(np.array([-40.0, 10, 10]))
    with pytest.raises(SAMMed3DError, match="outside the image"):
        window_for_point(prep, far)
    with pytest.raises(SAMMed3DError, match="does not overlap"):
        window_for_box(prep, far, far - 5)
    with pytest.raises(SAMMed3DError, match="3 coordinates"):
        window_for_point(prep, [1.0, 2.0])


# --------------------------------------------------------------------------- round trip


def organ_window(var, vol, prep, lid):
    idx = np.argwhere(var.label == lid)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ras = vol.ijk_to_ras(corners)
    return window_for_box(prep, ras.min(0), ras.max(0))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_round_trip_dice(variants, loaded, name):
    """Reference label -> prepared grid -> window -> logits -> map_back -> original grid.

    Measured Dice (spleen / kidney_left / liver; liver counted inside the window only, it is
    wider than the 192 mm window):
    * 128^3, label through resample_label (nearest): 1.000 / 1.000 / 1.000 on the 3 mm grids
      (plain, oblique, permuted_flipped): 1.5 mm halves 3 mm exactly. On the grids with a
      0.8 mm axis (anisotropic, all_combined) 0.959 / 0.941 / 0.976: nearest-neighbour
      downsampling to 1.5 mm cannot keep 0.8 mm label detail; that loss is in the label
      resampling, not in map_back.
    * 128^3, soft logits (label*2-1 resampled linearly, like a network's output): >= 0.992 on
      every grid, so map_back itself keeps sub-voxel boundaries.
    * 32^3 (the decoder's output; one voxel is 6 mm): 0.980 / 0.958 / 0.988 (avg-pooled;
      trilinear-downsampled 0.977 / 0.958 / 0.971) on the 3 mm grids; on the anisotropic grids
      only 0.89 / 0.70 / 0.94, because squeezing the affine to 0.8 mm makes the kidney ~12 mm
      thick along i, i.e. two 32^3 voxels. The bounds below are a little under the measurements;
      a wrong axis, sign or one-voxel offset falls far below them.
    """
    var = variants[name]
    vol, prep = loaded[name]
    fine_axis = name in ("anisotropic", "all_combined")
    for organ, lid in ORGANS.items():
        ref = var.label == lid
        plab = resample_label(ref.astype(np.uint8), vol, prep)
        win = organ_window(var, vol, prep, lid)
        start, stop = region_bbox(prep, win)
        sub = ref[tuple(slice(a, b) for a, b in zip(start, stop))]
        if organ != "liver":
            assert sub.sum() == ref.sum(), (organ, "window does not cover the organ")

        logits = torch.from_numpy(window_crop(plab.astype(np.float32), win) * 2 - 1)
        region, offset = map_back(logits, prep, win)
        assert tuple(offset) == start and region.shape == sub.shape and region.dtype == bool
        d_nearest = dice(region, sub)
        assert d_nearest >= (0.93 if fine_axis else 0.98), (name, organ, d_nearest)
        if organ != "liver":
            assert dice(paste(region, offset, vol.shape), ref) == pytest.approx(d_nearest)

        soft = prepare_volume(Volume(ref.astype(np.float32) * 2 - 1, vol.affine), modality="MR").array
        soft_logits = torch.from_numpy(window_crop(soft, win, fill=-1.0))
        d_soft = dice(map_back(soft_logits, prep, win)[0], sub)
        assert d_soft >= 0.98, (name, organ, d_soft)

        low = F.avg_pool3d(logits[None, None], 4)[0, 0]
        d32 = dice(map_back(low, prep, win)[0], sub)
        assert d32 >= (0.65 if fine_axis else 0.94), (name, organ, d32)


def test_map_back_fast_path_equals_grid_sample(loaded):
    vol, prep = loaded["all_combined"]
    win = window_for_point(prep, vol.ijk_to_ras(np.array(vol.shape) / 2))
    g = torch.Generator().manual_seed(0)
    low = F.avg_pool3d(torch.randn(1, 1, 32, 32, 32, generator=g), 3, 1, 1)[0, 0] * 5
    a, off_a = map_back(low, prep, win)
    b, off_b = map_back(low, prep, win, method="grid_sample")
    assert off_a == off_b and a.shape == b.shape
    assert (a != b).mean() < 1e-4 and 0.2 < a.mean() < 0.8
    with pytest.raises(SAMMed3DError, match="expected"):
        map_back(torch.zeros(64, 64, 64), prep, win)


def test_rotated_grids_general_path():
    """Label and image on grids rotated 30 degrees to each other (not just permuted): the dense
    grid_sample paths of resample_label and map_back put a sphere where it physically is."""
    centre = np.array([10.0, -20.0, 30.0])
    radius = 25.0

    def sphere_on(affine, shape):
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        ras = idx @ affine[:3, :3].T + affine[:3, 3]
        return (np.linalg.norm(ras - centre, axis=1) <= radius).reshape(shape)

    shape_a = (70, 64, 40)
    aff_a = rotation(2, 30) @ np.diag([1.2, 1.0, 2.0, 1.0])
    aff_a[:3, 3] = centre - aff_a[:3, :3] @ (np.array(shape_a) - 1) / 2
    img = Volume(sphere_on(aff_a, shape_a).astype(np.float32) * 100 + 1, aff_a)
    prep = prepare_volume(img, modality="MR")
    shape_b = (50, 50, 50)
    aff_b = np.diag([1.1, 1.1, 1.1, 1.0])
    aff_b[:3, 3] = centre - 1.1 * 24.5
    lab_b = sphere_on(aff_b, shape_b).astype(np.uint8)
    plab = resample_label(lab_b, Volume(lab_b, aff_b), prep)
    truth = sphere_on(prep.affine, prep.shape)
    assert dice(plab, truth) > 0.95
    # map_back through grid_sample onto the image's own (rotated) grid.
    win = window_for_point(prep, centre)
    logits = window_crop(truth.astype(np.float32), win) * 2 - 1
    region, off = map_back(logits, prep, win, method="grid_sample")
    assert dice(paste(region, off, img.shape), sphere_on(aff_a, shape_a)) > 0.97


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".seg.nrrd"])
@pytest.mark.parametrize("name", ["plain", "all_combined"])
def test_save_mask_keeps_the_grid(variants, loaded, tmp_path, ext, name):
    vol, _ = loaded[name]
    mask = (variants[name].label == ORGANS["spleen"]).astype(np.uint8)
    path = save_mask(mask, vol, tmp_path / f"mask{ext}", name="Spleen")
    back = load_volume(path)
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)  # spacing, origin, direction
    np.testing.assert_array_equal(back.array, mask)
    assert back.array.dtype == np.uint8
    if ext == ".nii.gz":
        np.testing.assert_allclose(nib.load(path).affine, vol.affine, atol=1e-4)
    if ext == ".seg.nrrd":
        img = sitk.ReadImage(str(path))
        assert img.GetMetaData("Segment0_Name") == "Spleen"
        assert img.GetMetaData("Segment0_LabelValue") == "1"
        assert img.GetMetaData("Segment0_Layer") == "0"
        assert img.GetMetaData("Segment0_ID")
        assert len(img.GetMetaData("Segment0_Color").split()) == 3
        nz = np.nonzero(mask)
        expected = [v for a in nz for v in (int(a.min()), int(a.max()))]
        assert [int(v) for v in img.GetMetaData("Segment0_Extent").split()] == expected
        header = path.read_bytes()[:4000].decode("latin-1")
        assert "Segment0_Name:=Spleen" in header


def test_save_mask_errors(loaded, tmp_path):
    vol, _ = loaded["plain"]
    mask = np.zeros(vol.shape, np.uint8)
    with pytest.raises(SAMMed3DError, match="unknown file extension"):
        save_mask(mask, vol, tmp_path / "mask.png")
    with pytest.raises(SAMMed3DError, match="shape"):
        save_mask(mask[:-1], vol, tmp_path / "mask.nii.gz")
    with pytest.raises(SAMMed3DError, match="integer labels"):
        save_mask(mask.astype(np.float32), vol, tmp_path / "mask.nii.gz")


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(SAMMed3DError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_corrupt_files(tmp_path, data_dir):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not an image\x00\xff" * 50)
    with pytest.raises(SAMMed3DError, match="could not read .*corrupt"):
        load_volume(bad)
    truncated = tmp_path / "truncated.nii.gz"
    full = (data_dir / "example_ct_sm.nii.gz").read_bytes()
    truncated.write_bytes(full[: len(full) // 2])  # ITK alone would fill the rest with zeros
    with pytest.raises(SAMMed3DError, match="truncated or corrupt"):
        load_volume(truncated)
    raw = tmp_path / "truncated.nii"
    nib.save(nib.load(data_dir / "example_ct_sm.nii.gz"), raw)
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(SAMMed3DError, match="truncated or corrupt"):
        load_volume(raw)
    nrrd = tmp_path / "truncated.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "example_ct_sm.nii.gz")), str(nrrd), True)
    nrrd.write_bytes(nrrd.read_bytes()[:-5000])
    with pytest.raises(SAMMed3DError, match="could not read .*corrupt"):
        load_volume(nrrd)
    empty_dir = tmp_path / "empty_series"
    empty_dir.mkdir()
    with pytest.raises(SAMMed3DError, match="no DICOM series"):
        load_volume(empty_dir)


def test_2d_and_single_slice(tmp_path):
    p = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32)).astype(np.float32), np.eye(4)), p)
    with pytest.raises(SAMMed3DError, match="2D image"):
        load_volume(p)
    p1 = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 1)).astype(np.float32), np.eye(4)), p1)
    with pytest.raises(SAMMed3DError, match="single slice"):
        load_volume(p1)


def test_4d(tmp_path):
    p = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10, 3)).astype(np.float32), np.eye(4)), p)
    with pytest.raises(SAMMed3DError, match=r"4D image with 3 volumes.*pick one volume"):
        load_volume(p)
    # A 4D file holding a single volume is just that volume.
    p1 = tmp_path / "four_one.nii.gz"
    data = np.random.default_rng(1).random((8, 9, 10, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), p1)
    np.testing.assert_array_equal(load_volume(p1).array, data[..., 0])
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 9, 10], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(SAMMed3DError, match="3 components per voxel"):
        load_volume(rgb)


def test_constant_image(tmp_path):
    p = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 9, 10), 7, np.int16), np.eye(4)), p)
    with pytest.raises(SAMMed3DError, match=r"constant \(all voxels = 7\): nothing to segment"):
        load_volume(p)
    with pytest.raises(SAMMed3DError, match="constant"):
        prepare_volume(Volume(np.zeros((8, 9, 10), np.float32), np.eye(4)))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_nan_and_inf_voxels(tmp_path, ext):
    data = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32) * 100 + 5
    finite_min = float(data.min())
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.nan
    data[0, 0, 0] = np.inf
    data[7, 8, 9] = -np.inf
    p = tmp_path / f"nan{ext}"
    if ext == ".nii.gz":  # ITK's NIfTI reader alone would turn these into 0
        nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(data.transpose(2, 1, 0)), str(p))
    with pytest.warns(RuntimeWarning, match="4 voxel"):
        vol = load_volume(p)
    assert np.all(np.isfinite(vol.array))
    for idx in [(1, 2, 3), (4, 4, 4), (0, 0, 0), (7, 8, 9)]:
        assert vol.array[idx] == pytest.approx(finite_min)
    # Arrays that did not come through load_volume (e.g. from Slicer) are handled in prepare.
    with pytest.warns(RuntimeWarning, match="4 voxel"):
        prep = prepare_volume(Volume(data, np.diag([1.5, 1.5, 1.5, 1])), modality="MR")
    assert np.all(np.isfinite(prep.array)) and prep.array.min() == pytest.approx(finite_min)
    all_nan = tmp_path / "all_nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), all_nan)
    with pytest.raises(SAMMed3DError, match="NaN or infinite"):
        load_volume(all_nan)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_slab_wise_preparation_equals_whole(loaded, name):
    """A volume too large to convert at once is prepared in slabs; the result is identical."""
    vol, whole = loaded[name]
    plane = int(np.prod(vol.shape)) // max(vol.shape)
    slabs = prepare_volume(vol, slab_voxels=plane * 3)  # a few source planes per slab
    assert slabs.shape == whole.shape
    np.testing.assert_allclose(slabs.array, whole.array, atol=1e-3)
    np.testing.assert_array_equal(slabs.affine, whole.affine)


def test_window_on_the_compute_device_equals_numpy(loaded):
    _, prep = loaded["oblique"]
    window = window_for_point(prep, prep.index_to_ras(np.array([[10.0, 20.0, 5.0]]))[0])
    tensor = extract_window_tensor(prep, window, "cpu")
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_array_equal(tensor.numpy(), extract_window(prep, window))
    assert prep.tensor("cpu") is prep.tensor("cpu"), "the prepared volume is moved once, then kept"


def test_window_placement_is_stable_on_grid_ties(loaded):
    """A click at a 3 mm voxel centre falls between two 1.5 mm voxels: rounding noise of the RAS
    coordinates must not move the window."""
    vol, prep = loaded["plain"]
    ras = vol.ijk_to_ras(np.array([[60.0, 50.0, 15.0]]))[0]
    starts = {window_for_point(prep, ras + noise).start for noise in (0.0, 1e-9, -1e-9, 1e-7, -1e-7)}
    assert len(starts) == 1
