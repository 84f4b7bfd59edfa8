"""The packaged demo model (SAMMed3DMoELib/models/demo): it loads offline with its checksums, it
really segments the example CT's spleen through the session and the paper's click protocol,
whatever the scan's axis order, the mixture keeps the general model's classes while its experts
improve the new ones, and a few-step run of the commands that made it ends in a loadable bundle.

The demo model was trained on these very scans (one patient, labels by TotalSegmentator): these
tests prove the chain works, not that the model generalises."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from click_following import click_following_score
from conftest import require_fixture
from SAMMed3DMoELib import bundle, clicks, evaluation, hub
from SAMMed3DMoELib.catalog import load_catalog
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.metrics import dice
from SAMMed3DMoELib.moe import AUTO, GENERAL
from SAMMed3DMoELib.session import Session
from SAMMed3DMoELib.volume_io import load_volume

MAX_BYTES = 25 * 2**20
SPLEEN_DICE_FLOOR = 0.8
"""The issue's target for the spleen after three clicks, each at the most interior voxel of the
largest error (as a user clicks). The shipped model reaches 0.84, 0.85, 0.86; the untrained
network reached 0.15, the first CPU-trained demo model 0.70 (Training/README.md, "The demo
model"). With the paper's uniform clicks the spleen varies more (README)."""
ORIGINAL = ["spleen", "kidney_left", "stomach", "vertebrae_L3"]
NEW = ["aorta", "spinal_cord", "inferior_vena_cava"]
MR = ["liver", "spleen", "kidney_right", "vertebrae"]


@pytest.fixture(scope="module")
def demo_folder():
    return require_fixture(load_catalog()["demo"].local_path)


@pytest.fixture(scope="module")
def demo(demo_folder):
    torch.set_num_threads(2)
    return bundle.load_bundle(demo_folder)


def _case(data_dir, image: str, labels: str, names: str):
    volume = load_volume(require_fixture(data_dir / image))
    label = evaluation.label_on_grid(load_volume(require_fixture(data_dir / labels)), volume)
    ids = {entry["name"]: int(key) for key, entry in json.loads((data_dir / names).read_text()).items()}
    return volume, label, ids


@pytest.fixture(scope="module")
def example_ct(data_dir):
    return _case(data_dir, "example_ct.nii.gz", "example_ct_seg.nii.gz", "example_ct_seg_labels.json")


@pytest.fixture(scope="module")
def example_mr(data_dir):
    return _case(data_dir, "example_mr_sm.nii.gz", "example_mr_seg.nii.gz", "example_mr_seg_labels.json")


def _dice_after_clicks(model, volume, label, ids, classes, expert, n_clicks=3, modality="CT"):
    """{class: Dice after n_clicks} by the evaluation protocol (seeded uniform clicks)."""
    variant = evaluation.Variant(expert, model, expert)
    records = evaluation.evaluate_case(volume, label, {ids[c]: c for c in classes}, [variant], clicks=(n_clicks,),
                                       box=False, seed=0, modality=modality)
    return {r["class"]: r["dice"] for r in records}


def test_demo_is_a_packaged_offline_bundle_with_verified_files(demo_folder, demo, tmp_path):
    assert hub.resolve_model("demo") == demo_folder  # from the catalog, no network
    config = bundle.read_bundle_config(demo_folder)
    files = [config["base"]["file"], config["gate"]["file"], *(e["file"] for e in config["experts"])]
    total = sum((demo_folder / rel).stat().st_size for rel in files)
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MB"
    from safetensors import safe_open

    for rel in files:
        with safe_open(str(demo_folder / rel), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, rel
    assert {v.dtype for v in demo.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert demo.expert_names == ["weak", "mr"] and demo.gate is not None
    assert load_catalog()["demo"].box_prompts is demo.box_prompts_trained is True  # the catalog says what the bundle does
    assert demo.expert_info["mr"].modality == "MR" and "aorta" in demo.expert_info["weak"].targets
    for info in demo.expert_info.values():
        assert "one patient" in info.description and "not clinical" in info.description
    assert demo.preprocessing["spacing_mm"] == 3.0 and demo.preprocessing["window"] == demo.base.img_size == 64
    assert demo.preprocessing["ct_clamp"] == [-1000.0, 1000.0]
    card = (demo_folder / "README.md").read_text()
    assert "not a clinical model" in card and "one patient" in card
    made = {p.stem for p in (demo_folder / "training").glob("*.json")}
    # the general model's stages in order: general, general_clicks, general_long, pretrain (general_polish)
    assert made == {"general", "general_clicks", "general_long", "pretrain", "expert_weak", "expert_mr", "gate"}
    assert demo.base.prompt_encoder.click_mark_radius == 4.0

    # Every file's SHA-256 is checked on load: an edited copy is refused by name.
    copy = tmp_path / "demo"
    shutil.copytree(demo_folder, copy)
    with open(copy / "experts" / "mr.safetensors", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(SAMMed3DError, match="mr.safetensors .* SHA-256"):
        bundle.load_bundle(copy)


def test_three_clicks_segment_the_spleen_of_the_example_ct(demo, example_ct):
    """What `sammed3d-moe demo` shows: three clicks, each at the most interior voxel of the
    largest error (as a user clicks), through the session with the gate choosing."""
    volume, label, ids = example_ct
    reference = label == ids["spleen"]
    session = Session(volume, demo, modality="CT")
    scores = [dice(prediction, reference) for _, prediction in
              clicks.simulate(session, reference, 3, mode="center", spacing=volume.spacing)]
    assert scores[-1] >= SPLEEN_DICE_FLOOR, scores


CLICK_FOLLOWING_FLOOR = 0.85
"""Share of clicks whose mask must land on the clicked structure. The shipped model: 42 of 42;
before its click-mark stage it segmented what lay at the window's centre: 5 of 42."""


def test_a_click_names_the_structure_it_is_on(demo, example_ct):
    """Windows centred on five structures (a session's window after a first click there); one
    click at the centre of each of ten structures in each window, decoded on that window's
    embedding, through the mixture: most masks land on the structure clicked."""
    volume, label, ids = example_ct
    hits, total = click_following_score(demo, volume, label, ids, expert=AUTO)
    assert total >= 30 and hits >= CLICK_FOLLOWING_FLOOR * total, (hits, total)


def _stored(volume: Volume, label: np.ndarray, change: str, folder):
    """The scan and its label written to NIfTI with flipped or permuted array axes (same
    physical image), read back as a user's file would be."""
    array, lab, affine = volume.array, label, volume.affine
    if change == "flipped":
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[0, 3], flip[2, 3] = array.shape[0] - 1, array.shape[2] - 1
        array, lab, affine = array[::-1, :, ::-1], lab[::-1, :, ::-1], affine @ flip
    else:  # new[p, q, r] = old[q, r, p]
        order = np.zeros((4, 4))
        order[0, 1] = order[1, 2] = order[2, 0] = order[3, 3] = 1.0
        array, lab, affine = array.transpose(2, 0, 1), lab.transpose(2, 0, 1), affine @ order
    paths = []
    for name, data in (("image", array), ("label", lab)):
        path = folder / f"{change}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
        paths.append(path)
    image = load_volume(paths[0])
    return image, evaluation.label_on_grid(load_volume(paths[1]), image)


def _replay(model, volume, reference, ras_clicks):
    """Dice after each of ``ras_clicks`` ((RAS mm, positive) pairs) on ``volume``."""
    session = Session(volume, model, modality="CT", expert=AUTO)
    scores = []
    for ras, positive in ras_clicks:
        session.add_point(ras, positive=positive)
        scores.append(dice(session.predict().full_mask(volume.shape), reference))
    return scores


@pytest.mark.parametrize("change", ["flipped", "permuted"])
def test_flipped_or_permuted_storage_gives_the_same_dice(demo, example_ct, change, tmp_path):
    """Three clicks simulated on the scan as shipped (each at the most interior voxel of the
    largest error), then the same physical clicks (RAS mm) on the same scan stored with flipped
    or permuted array axes: the same Dice within 0.05 after every click."""
    volume, label, ids = example_ct
    reference = label == ids["spleen"]
    session = Session(volume, demo, modality="CT", expert=AUTO)
    ras_clicks, expected = [], []
    for click, prediction in clicks.simulate(session, reference, 3, mode="center", spacing=volume.spacing):
        ras_clicks.append((volume.ijk_to_ras(np.asarray([click.index], float))[0], click.positive))
        expected.append(dice(prediction, reference))
    stored, stored_label = _stored(volume, label, change, tmp_path)
    assert stored.shape != volume.shape or not np.allclose(stored.affine, volume.affine)
    got = _replay(demo, stored, stored_label == ids["spleen"], ras_clicks)
    assert expected[-1] >= SPLEEN_DICE_FLOOR, expected
    assert np.abs(np.subtract(got, expected)).max() <= 0.05, (expected, got)


def test_the_mixture_keeps_the_original_classes_and_the_experts_learn_the_new_ones(demo, example_ct, example_mr):
    """Table 1 in miniature on a few fixed classes, three clicks, the shipped τ (0.5, chosen on
    the CT slab): the mixture stays within a few Dice points of the general model on its own
    classes; each expert alone, and the mixture, beat the general model on the new classes (held-
    out CT classes, the MR). Measured on these scans: original classes general 0.688, mixture
    0.688; held-out CT classes general 0.146, weak 0.540, mixture 0.343; MR general 0.213, mr
    0.524, mixture 0.534 (README, "The demo model", has the full tables)."""
    ct, ct_label, ct_ids = example_ct
    mr, mr_label, mr_ids = example_mr

    def mean(model_expert, volume, label, ids, classes, modality="CT"):
        scores = _dice_after_clicks(demo, volume, label, ids, classes, model_expert, modality=modality)
        return float(np.mean(list(scores.values())))

    assert demo.tau == 0.5
    general_original = mean(GENERAL, ct, ct_label, ct_ids, ORIGINAL)
    mixture_original = mean(AUTO, ct, ct_label, ct_ids, ORIGINAL)
    assert mixture_original >= general_original - 0.03, (general_original, mixture_original)
    general_new, weak_new = mean(GENERAL, ct, ct_label, ct_ids, NEW), mean("weak", ct, ct_label, ct_ids, NEW)
    assert weak_new >= general_new + 0.3, (general_new, weak_new)
    mixture_new = mean(AUTO, ct, ct_label, ct_ids, NEW)
    assert mixture_new >= general_new + 0.15, (general_new, mixture_new)
    general_mr = mean(GENERAL, mr, mr_label, mr_ids, MR, modality="MR")
    mr_mr = mean("mr", mr, mr_label, mr_ids, MR, modality="MR")
    assert mr_mr >= general_mr + 0.25, (general_mr, mr_mr)
    mixture_mr = mean(AUTO, mr, mr_label, mr_ids, MR, modality="MR")  # the gate sends MR prompts to "mr"
    assert mixture_mr >= general_mr + 0.25, (general_mr, mixture_mr)


def test_a_few_steps_of_the_demo_commands_make_a_loadable_bundle(tmp_path):
    """CI's version of `python -m Training.make_demo`: every stage (conversion, general model,
    both experts, gate and τ, float16 packaging, forgetting baseline, evaluation) with 2 steps
    and the tiny test model, into tmp_path; the result is a bundle like the shipped one."""
    from Training import make_demo

    assert make_demo.main(["--quick", "--work", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                           "--threads", "1"]) == 0
    folder = tmp_path / make_demo.PACKAGE
    moe = bundle.load_bundle(folder)
    assert moe.expert_names == ["weak", "mr"] and moe.gate is not None and moe.tau in (0.5, 0.7)
    assert moe.preprocessing["spacing_mm"] == 3.0
    from safetensors.torch import load_file

    assert load_file(str(folder / "base.safetensors"))["image_encoder.pos_embed"].dtype == torch.float16
    assert {p.stem for p in (folder / "training").glob("*.json")} == {
        "general", "general_clicks", "general_long", "pretrain", "expert_weak", "expert_mr", "gate"}
    assert moe.base.prompt_encoder.click_mark_radius == 4.0  # the click-mark stage's, kept by experts and gate
    for part in ("train_scans", "ct_slab"):
        results = tmp_path / "Training" / "demo_results" / part
        assert (results / "dice_vs_clicks.png").stat().st_size > 1000
        table = (results / "forgetting.md").read_text()
        assert "finetuned general" in table and "mixture τ=" in table and "mixture average" in table
    timings = json.loads((tmp_path / "runs" / "demo" / "timings.json").read_text())["seconds"]
    assert list(timings) == list(make_demo.STAGES)
