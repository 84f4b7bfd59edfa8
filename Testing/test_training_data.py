"""Training data on the real sample scans: physical-space label alignment (the DICOM slab), the
nnU-Net conversion, the preprocessing cache, and samples that do not depend on workers or ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from SAMMed3DMoELib import geometry, windows
from SAMMed3DMoELib.evaluation import label_on_grid, load_case, read_dataset
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.volume_io import load_volume
from Training.data import (OTHER_TARGET_MIN_VOXELS, Augmentation, CropDataset, EpochSampler, Item, Preprocessing,
                           PreparedCases, augmentation_from_args, build_items, window_around)
from training_helpers import converted_datasets


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, data_dir):
    return converted_datasets(tmp_path_factory.getbasetemp(), data_dir)


def test_dicom_slab_labels_are_aligned_in_physical_space_not_by_index(data_dir, datasets):
    image = load_volume(data_dir / "ct_dicom")
    stored = load_volume(data_dir / "ct_dicom_seg.nii.gz")
    assert stored.shape == image.shape  # same array shape: an index-based loader would accept it
    aligned = label_on_grid(stored, image)
    # The segmentation's row axis runs the other way (LAS vs the series' LPS): aligned = flipped.
    assert np.array_equal(aligned, np.flip(stored.array, axis=1))
    names = {v["name"]: int(k) for k, v in json.loads((data_dir / "ct_dicom_seg_labels.json").read_text()).items()}
    hu = image.array.astype(np.float64)
    for organ in ("liver", "spleen"):  # soft tissue: tens of HU when aligned; air and fat by index
        assert 20 < hu[aligned == names[organ]].mean() < 200
        assert hu[stored.array == names[organ]].mean() < -50
    assert hu[aligned == names["vertebrae_T12"]].mean() > 150  # bone
    # The converted dataset stores the aligned label on the image's grid, and reads back the same.
    converted_image, converted_label = load_case(read_dataset(datasets["Dataset503_CTSlab"]).cases[0])
    assert np.allclose(converted_image.affine, image.affine) and np.array_equal(converted_label, aligned)


def test_conversion_keeps_names_modality_and_geometry(data_dir, datasets):
    mr = read_dataset(datasets["Dataset502_ExampleMR"])
    assert mr.modality == "MR" and "liver" in mr.labels.values()
    ct = read_dataset(datasets["Dataset501_ExampleCT"])
    assert ct.modality == "CT" and len(ct.labels) == 61
    image, label = load_case(ct.cases[0])
    original = load_volume(data_dir / "example_ct_seg.nii.gz")
    assert np.allclose(image.affine, original.affine) and np.array_equal(label, original.array)


def test_prepared_cases_are_computed_once_and_keyed_by_file_and_settings(tmp_path, datasets):
    info = read_dataset(datasets["Dataset501_ExampleCT"])
    pre = Preprocessing(3.0, 32)
    cases = PreparedCases([info], pre, tmp_path)
    first = cases.get(0)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = PreparedCases([info], pre, tmp_path).get(0)
    assert sorted(tmp_path.glob("*.pt")) == files and files[0].stat().st_mtime_ns == stamp  # read, not redone
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    stored = torch.load(files[0], weights_only=True)  # the prepared arrays, not the file names (cache v1)
    assert torch.equal(stored["image"], first["image"]) and torch.equal(stored["label"], first["label"])
    # It is the engine's own preprocessing.
    image, label = load_case(info.cases[0])
    prepared = geometry.prepare_volume(image, spacing=3.0, modality="CT")
    assert np.array_equal(first["image"].numpy(), prepared.array)
    assert np.array_equal(first["label"].numpy(), geometry.resample_label(label, image, prepared))
    PreparedCases([info], Preprocessing(4.0, 32), tmp_path).get(0)  # another spacing: another entry
    assert len(list(tmp_path.glob("*.pt"))) == 2


def _dataset(datasets, cache, **kwargs):
    pre = Preprocessing(3.0, 32)
    cases = PreparedCases([read_dataset(datasets["Dataset501_ExampleCT"])], pre, cache)
    items = build_items(cases, ["liver", "spleen", "aorta", "kidney_left"])
    return CropDataset(cases, items, pre, seed=3, iterations=4, **kwargs)


def test_samples_depend_on_seed_item_and_epoch_only(tmp_path, datasets):
    data = _dataset(datasets, tmp_path)
    a, b = data[(1, 0)], data[(1, 0)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], data[(1, 1)]["image"])  # a new crop every epoch
    assert a["image"].shape == (1, 32, 32, 32) and set(a["target"].unique().tolist()) <= {0.0, 1.0}
    assert a["target"].sum() > 0
    fixed = _dataset(datasets, tmp_path, fixed_crops=2)
    assert torch.equal(fixed[(1, 0)]["image"], fixed[(1, 2)]["image"])  # crop e mod 2
    assert not torch.equal(fixed[(1, 0)]["click_u"], fixed[(1, 2)]["click_u"])  # new clicks each epoch
    plain = _dataset(datasets, tmp_path, augment=Augmentation.none())[(0, 0)]
    centre = plain["target"][0, 16, 16, 16]
    assert centre == 1  # no jitter: the window is centred on a target voxel, like a session's first click


def test_workers_and_ranks_see_the_same_samples(tmp_path, datasets):
    data = _dataset(datasets, tmp_path)

    def batches(rank, world, workers):
        sampler = EpochSampler(len(data), rank, world, seed=5)
        sampler.set_position(epoch=1)
        return list(DataLoader(data, batch_size=1, sampler=sampler, num_workers=workers,
                               multiprocessing_context="fork" if workers and os.name == "posix" else None))

    alone = batches(0, 1, 0)
    with_workers = batches(0, 1, 2)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(alone, with_workers))
    rank0, rank1 = batches(0, 2, 0), batches(1, 2, 0)
    interleaved = [b for pair in zip(rank0, rank1) for b in pair]
    assert [int(b["item"]) for b in interleaved] == [int(b["item"]) for b in alone]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(interleaved, alone))
    sampler = EpochSampler(len(data), 0, 1, seed=5)
    sampler.set_position(epoch=1, skip=2)
    assert [i for i, _ in sampler] == [int(b["item"]) for b in alone][2:]


def test_crops_centre_on_any_target_voxel_of_the_prepared_grid(tmp_path, datasets):
    """The slab (20 slices of 2 mm) prepared at 3 mm has 14 slices (42 mm): its last slice's
    centre lies past the source image, yet the label reaches it. A crop centred there must work
    (window_for_point refuses that point), and elsewhere it is the session's own first window."""
    info = read_dataset(datasets["Dataset503_CTSlab"])
    cases = PreparedCases([info], Preprocessing(3.0, 64), tmp_path)
    prepared = cases.prepared_volume(0)
    label = cases.get(0)["label"].numpy()
    last = label.shape[2] - 1
    edge = np.argwhere(label[:, :, last] > 0)[0]
    centre = (int(edge[0]), int(edge[1]), last)
    with pytest.raises(SAMMed3DError, match="outside the image"):
        windows.window_for_point(prepared, prepared.index_to_ras(np.asarray(centre, float)), 64)
    assert window_around(centre, 64).start == (centre[0] - 32, centre[1] - 32, last - 32)
    inner = (int(edge[0]), int(edge[1]), last // 2)
    assert window_around(inner, 64) == windows.window_for_point(prepared, prepared.index_to_ras(np.asarray(inner, float)), 64)
    # Every item of the slab gives samples (the first validation run on the slab stopped here).
    data = CropDataset(cases, build_items(cases), Preprocessing(3.0, 64), seed=0, augment=Augmentation.none(),
                       iterations=1)
    for index in range(len(data)):
        for epoch in range(3):
            assert data[(index, epoch)]["target"].sum() > 0


def test_other_target_is_a_run_class_that_the_window_shows(tmp_path, datasets):
    """--other-target-prob: the target may be another of the run's classes in the same window
    (never a class outside the run, never one with fewer than OTHER_TARGET_MIN_VOXELS voxels
    there); the gate's label follows the target."""
    data = _dataset(datasets, tmp_path, augment=Augmentation(other_target_prob=1.0))
    liver, spleen, aorta = (Item(0, i, name, "d", "CT", 1000, expert=e)
                            for i, name, e in ((5, "liver", 0), (1, "spleen", 1), (52, "aorta", 2)))
    data._case_classes = {0: {item.label_id: item for item in (liver, spleen, aorta)}}
    crop = np.zeros((32, 32, 32), np.int16)
    crop[:10] = 5                                  # liver: shown
    crop[10:20] = 1                                # spleen: shown
    crop[20:21, :2, :OTHER_TARGET_MIN_VOXELS // 2 - 1] = 52  # aorta: too few voxels here
    crop[25:] = 2                                  # kidney_right: shown, but not a class of the run
    chosen = {data._target_in_window(liver, crop, seed) for seed in range(40)}
    assert chosen == {liver, spleen}
    assert data._target_in_window(aorta, np.zeros_like(crop), 0) == aorta  # nothing else shown
    plain = _dataset(datasets, tmp_path)
    assert {plain._target_in_window(liver, crop, seed) for seed in range(10)} == {liver}

    # On the real scan: the same windows and images, some targets changed, each a whole class.
    other = _dataset(datasets, tmp_path, augment=Augmentation(other_target_prob=1.0, flip_prob=0.0))
    centred = _dataset(datasets, tmp_path, augment=Augmentation(flip_prob=0.0))
    changed = 0
    for key in [(i, e) for i in range(len(other)) for e in range(3)]:
        a, b = centred[key], other[key]
        assert torch.equal(a["image"], b["image"])
        changed += not torch.equal(a["target"], b["target"])
        assert b["target"].sum() >= OTHER_TARGET_MIN_VOXELS or torch.equal(a["target"], b["target"])
    assert changed > 0


def test_other_target_probability_must_be_a_probability():
    import argparse

    args = argparse.Namespace(crop_jitter=8, flip_prob=0.5, intensity_prob=0.5, box_jitter=2.0, other_target_prob=1.5)
    with pytest.raises(SAMMed3DError, match="--other-target-prob must lie in \\[0, 1\\]"):
        augmentation_from_args(args)
