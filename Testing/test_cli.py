"""The ``sammed3d-moe`` command line, called in-process through ``cli.main`` (and once through a real
``python -m SAMMed3DMoELib`` subprocess), on the real example CT with tiny models saved to disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMMed3DMoELib import bundle, catalog, cli, hub, preview
from SAMMed3DMoELib.cli import models as cli_models
from SAMMed3DMoELib.geometry import Volume
from tiny_models import constant_mask_decoder, tiny_moe, tiny_sam

CLICK = (60, 50, 15)  # a voxel in the abdomen of example_ct_sm (122 x 101 x 30)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_path(data_dir) -> Path:
    return data_dir / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny models on disk: a random bundle, a 'constant' bundle whose general decoder and expert2
    say background everywhere and expert1 says object everywhere, and a tiny .pth checkpoint."""
    root = tmp_path_factory.mktemp("models")
    moe = tiny_moe()
    random_bundle = bundle.save_bundle(moe, root / "random")
    const = tiny_moe()
    constant_mask_decoder(const.base.mask_decoder, -10.0)
    constant_mask_decoder(const.experts["expert1"], 10.0)
    constant_mask_decoder(const.experts["expert2"], -10.0)
    const_bundle = bundle.save_bundle(const, root / "const")
    checkpoint = root / "tiny.pth"
    torch.save({"model_state_dict": tiny_sam(box_prompts=False).state_dict()}, checkpoint)
    return {"random": random_bundle, "const": const_bundle, "pth": checkpoint, "moe": moe}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def segment_args(ct_path, model, out, *extra):
    return ["segment", ct_path, "--model", model, "--out", out, "--device", "cpu", *extra]


def read_mask(path: Path) -> np.ndarray:
    """The mask as [i, j, k] (SimpleITK gives [k, j, i])."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def ras_of(ct_path: Path, ijk) -> list:
    affine = nib.load(str(ct_path)).affine
    return [float(v) for v in (affine @ np.array([*ijk, 1.0]))[:3]]


def red_pixels(image: np.ndarray) -> np.ndarray:
    """Overlay-coloured pixels: grey values have R == G == B; the overlay is strongly red."""
    rgb = image.astype(int)
    return (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)


# --------------------------------------------------------------------------------------------
# The entry point as a real process
# --------------------------------------------------------------------------------------------
def _this_checkout_env() -> dict:
    """The environment for a subprocess that must import this checkout's package (not another
    installed copy), run from another folder."""
    import os

    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def test_module_entry_point_help_and_bad_input_exit_code(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "SAMMed3DMoELib", "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120, env=_this_checkout_env())
    assert help_run.returncode == 0, help_run.stderr
    for command in ("segment", "download", "convert", "info", "catalog"):
        assert command in help_run.stdout
    status_lines = {" ".join(line.split()[:2]) for line in help_run.stdout.splitlines()}
    for code, meaning in [("0", "success"), ("2", "bad"), ("3", "a"), ("4", "out"), ("5", "declined:"),
                          ("130", "interrupted")]:
        assert f"{code} {meaning}" in status_lines, f"exit status {code} is not documented in --help"

    bad = subprocess.run(
        [sys.executable, "-m", "SAMMed3DMoELib", "segment", "no_such_scan.nii.gz", "--model", "x",
         "--point", "1,2,3", "--out", "mask.nii.gz"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=_this_checkout_env(),
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no_such_scan.nii.gz" in lines[0]
    assert "Traceback" not in bad.stderr and not (tmp_path / "mask.nii.gz").exists()


# --------------------------------------------------------------------------------------------
# segment: outputs on the input grid, JSON summary, experts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext, prompt", [(".nii.gz", "ijk"), (".nrrd", "ras"), (".seg.nrrd", "ras")])
def test_segment_writes_the_mask_on_exactly_the_input_grid(capsys, tmp_path, ct_path, models, ext, prompt):
    out = tmp_path / f"mask{ext}"
    point = ["--point-ijk", ",".join(map(str, CLICK))] if prompt == "ijk" else \
        ["--point", ", ".join(f"{v:.4f}" for v in ras_of(ct_path, CLICK))]
    summary = run_json(capsys, *segment_args(ct_path, models["const"], out, *point, "--expert", "expert1",
                                             "--max-windows", "1", "--name", "Liver"))

    image = sitk.ReadImage(str(ct_path))
    mask_image = sitk.ReadImage(str(out))
    assert mask_image.GetSize() == image.GetSize()
    assert np.allclose(mask_image.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask_image.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(mask_image.GetDirection(), image.GetDirection(), atol=1e-6)
    if ext == ".nii.gz":
        assert np.allclose(nib.load(str(out)).affine, nib.load(str(ct_path)).affine, atol=1e-4)
    if ext == ".seg.nrrd":
        assert mask_image.GetMetaData("Segment0_Name") == "Liver"

    mask = read_mask(out)
    assert mask[CLICK] == 1, "the clicked voxel must be inside the (whole-window) mask"
    assert summary["voxels"] == int(np.count_nonzero(mask)) > 0
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    assert summary["volume_ml"] == pytest.approx(summary["voxels"] * voxel_ml, rel=1e-6)
    assert summary["shape"] == list(image.GetSize())
    assert summary["windows_used"] == 1 and summary["decoders"] == ["expert1"]
    assert summary["output"] == str(out.resolve())


def test_seg_nrrd_opens_in_slicer_and_slicerio(capsys, tmp_path, ct_path, models):
    """The .seg.nrrd the CLI writes (through slicerio) is read back by slicerio and by 3D Slicer's
    own segmentation reader (vtkMRMLSegmentationStorageNode from the slicer-core wheel): one
    segment with its name, the same voxels, on the image's grid."""
    import slicer
    import slicerio

    out = tmp_path / "liver.seg.nrrd"
    summary = run_json(capsys, *segment_args(ct_path, models["const"], out, "--point-ijk", "60,50,15",
                                             "--expert", "expert1", "--max-windows", "1", "--name", "Liver"))
    assert summary["voxels"] > 0

    segmentation = slicerio.read_segmentation(str(out))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "Liver"
    voxels = slicerio.extract_segments(segmentation, [("Liver", 1)])["voxels"]  # [i, j, k]
    assert int(np.count_nonzero(voxels)) == summary["voxels"]
    image = sitk.ReadImage(str(ct_path))
    lps = np.asarray(segmentation["ijkToLPS"])
    assert np.allclose(lps[:3, 3], image.GetOrigin(), atol=1e-4)
    assert np.allclose(np.linalg.norm(lps[:3, :3], axis=0), image.GetSpacing())

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out))
    assert storage.ReadData(node) == 1
    read = node.GetSegmentation()
    assert read.GetNumberOfSegments() == 1 and read.GetNthSegment(0).GetName() == "Liver"
    labelmap = read.GetNthSegment(0).GetRepresentation("Binary labelmap")
    extent = labelmap.GetExtent()
    assert list(extent) == [v for pair in summary["bbox_ijk"] for v in pair]


def test_ras_and_ijk_prompts_agree_and_keep_their_order(capsys, tmp_path, ct_path, models):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    negative = (70, 48, 15)
    ijk = run_json(capsys, *segment_args(ct_path, models["random"], a, "--point-ijk", "60, 50, 15",
                                         "--negative-ijk", ",".join(map(str, negative)), "--max-windows", "2"))
    # RAS with spaces and a leading minus sign right after the option (argparse would take
    # '-28,...' for an option without the CLI's help).
    left = ras_of(ct_path, (50, 50, 15))
    assert left[0] < 0
    # Full precision: a click at an original voxel centre of this 3 mm scan lies exactly on a
    # boundary of the 1.5 mm prepared grid, so rounding could move the model's window by a voxel.
    ras = run_json(capsys, *segment_args(
        ct_path, models["random"], b, "--point", "(" + " ".join(repr(v) for v in ras_of(ct_path, CLICK)) + ")",
        "--negative", ", ".join(repr(v) for v in ras_of(ct_path, negative)), "--max-windows", "2"))
    assert np.array_equal(read_mask(a), read_mask(b))
    assert ijk["voxels"] == ras["voxels"]
    assert [p["positive"] for p in ijk["prompts"]] == [True, False]
    assert np.allclose(ijk["prompts"][1]["ras"], ras_of(ct_path, negative))

    negative_first = run_json(capsys, *segment_args(ct_path, models["random"], tmp_path / "c.nii.gz", "--point",
                                                    ",".join(repr(v) for v in left), "--max-windows", "1"))
    assert np.allclose(negative_first["prompts"][0]["ras"], left)


def test_expert_general_name_and_auto(capsys, tmp_path, ct_path, models):
    click = ["--point-ijk", ",".join(map(str, CLICK)), "--max-windows", "1"]
    general = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "g.nii.gz", *click,
                                             "--expert", "general"))
    expert1 = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "e1.nii.gz", *click,
                                             "--expert", "expert1"))
    expert2 = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "e2.nii.gz", *click,
                                             "--expert", "expert2"))
    assert general["voxels"] == 0 and general["decoders"] == ["general"]
    assert expert1["voxels"] > 0 and expert1["decoders"] == ["expert1"]
    assert expert2["voxels"] == 0
    auto = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "auto.nii.gz", *click))
    assert auto["decoders"][0] == "general"
    assert set(auto["gate_scores"]) == {"general", "expert1", "expert2"}
    assert sum(auto["gate_scores"].values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(auto["weights"].values()) == pytest.approx(1.0, abs=1e-3)


def test_human_summary(capsys, tmp_path, ct_path, models):
    code, out, err = run(capsys, *segment_args(ct_path, models["const"], tmp_path / "m.nii.gz", "--point-ijk",
                                               "60,50,15", "--expert", "expert1", "--max-windows", "1"))
    assert code == 0, err
    voxels = int(np.count_nonzero(read_mask(tmp_path / "m.nii.gz")))
    assert f"{voxels} voxels" in out and " mL" in out
    assert "windows used: 1" in out and "Timings (ms)" in out and "expert1" in out


def test_refuses_to_overwrite_unless_asked(capsys, tmp_path, ct_path, models):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"the user's precious data")
    args = segment_args(ct_path, models["random"], out, "--point-ijk", "60,50,15", "--max-windows", "1")
    code, _, err = run(capsys, *args)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"the user's precious data"

    preview = tmp_path / "p.png"
    preview.write_bytes(b"old preview")
    code, _, err = run(capsys, *segment_args(ct_path, models["random"], tmp_path / "new.nii.gz", "--point-ijk",
                                             "60,50,15", "--preview", preview))
    assert code == 2 and "already exists" in err and preview.read_bytes() == b"old preview"
    assert not (tmp_path / "new.nii.gz").exists()

    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert read_mask(out).shape == tuple(sitk.ReadImage(str(ct_path)).GetSize())
    code, _, err = run(capsys, *segment_args(ct_path, models["random"], ct_path, "--point-ijk", "60,50,15",
                                             "--overwrite"))
    assert code == 2 and "input image itself" in err


# --------------------------------------------------------------------------------------------
# --preview
# --------------------------------------------------------------------------------------------
def test_preview_png_has_three_panels_with_the_overlay(capsys, tmp_path, ct_path, models):
    from PIL import Image

    png = tmp_path / "preview.png"
    summary = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "m.nii.gz", "--point-ijk",
                                             "60,50,15", "--expert", "expert1", "--max-windows", "1",
                                             "--preview", png))
    image = np.asarray(Image.open(png).convert("RGB"))
    height, width = image.shape[:2]
    assert [width, height] == summary["preview"]["size"]
    panels = {p["name"]: p for p in summary["preview"]["panels"]}
    assert list(panels) == ["axial", "coronal", "sagittal"]
    widths = {n: p["box"][2] - p["box"][0] for n, p in panels.items()}
    heights = {n: p["box"][3] - p["box"][1] for n, p in panels.items()}
    assert sum(widths.values()) < width and max(heights.values()) < height
    assert 200 <= width <= 2000 and 100 <= height <= 1000

    # Aspect ratio from the voxel spacing: R, A and S extents in mm, one pixel = same mm both ways.
    nii = nib.load(str(ct_path))
    extent = np.asarray(nii.shape) * np.asarray(nii.header.get_zooms())  # RAS-ordered file
    assert widths["axial"] == widths["coronal"]  # both span R-L
    assert abs(widths["sagittal"] - heights["axial"]) <= 1  # both span A-P
    assert heights["coronal"] == heights["sagittal"]  # both span S-I
    assert widths["axial"] / heights["axial"] == pytest.approx(extent[0] / extent[1], rel=0.02)
    assert widths["coronal"] / heights["coronal"] == pytest.approx(extent[0] / extent[2], rel=0.03)

    mask = read_mask(tmp_path / "m.nii.gz")
    for name, panel in panels.items():
        x0, y0, x1, y1 = panel["box"]
        tile = image[y0:y1, x0:x1]
        assert tile.std() > 10, f"{name}: the image should show anatomy"
        assert red_pixels(tile).any(), f"{name}: the non-empty mask must show as a coloured overlay"
    assert mask[CLICK[0], CLICK[1], :].any()

    # An empty mask: no overlay colour anywhere.
    empty_png = tmp_path / "empty.png"
    empty = run_json(capsys, *segment_args(ct_path, models["const"], tmp_path / "e.nii.gz", "--point-ijk",
                                           "60,50,15", "--expert", "general", "--max-windows", "1",
                                           "--preview", empty_png))
    assert empty["voxels"] == 0
    assert not red_pixels(np.asarray(Image.open(empty_png).convert("RGB"))).any()


def _synthetic(flip_to_lps: bool):
    """A 40 x 30 x 20 volume (2 x 2 x 3 mm) with a bright cube at the patient's right, anterior,
    superior corner region; optionally stored with the first two axes reversed (LPS-like order)."""
    array = np.zeros((40, 30, 20), dtype=np.float32)
    array += np.linspace(0, 50, 20)[None, None, :]
    array[30:36, 20:26, 12:16] = 1000.0
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-40.0, -30.0, -30.0]
    if flip_to_lps:
        array = array[::-1, ::-1, :].copy()
        flipped = affine.copy()
        flipped[:3, 3] = affine[:3, :3] @ np.array([39.0, 29.0, 0.0]) + affine[:3, 3]
        flipped[:, 0] *= -1
        flipped[:, 1] *= -1
        flipped[3, :] = [0, 0, 0, 1]
        affine = flipped
    mask = array > 500
    return Volume(array, affine), mask


def test_preview_orientation_is_radiological_and_independent_of_storage_order():
    ras_volume, ras_mask = _synthetic(False)
    lps_volume, lps_mask = _synthetic(True)
    centre = ras_volume.ijk_to_ras(np.array([[33.0, 23.0, 14.0]]))[0]
    assert np.allclose(lps_volume.ijk_to_ras(np.array([[39 - 33.0, 29 - 23.0, 14.0]]))[0], centre)
    image_a, panels_a = preview.render_preview(ras_volume, ras_mask, centre, ct=False)
    image_b, panels_b = preview.render_preview(lps_volume, lps_mask, centre, ct=False)
    assert panels_a == panels_b
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))

    rgb = np.asarray(image_a)
    for panel in panels_a:
        x0, y0, x1, y1 = panel["box"]
        red = red_pixels(rgb[y0:y1, x0:x1])
        ys, xs = np.nonzero(red)
        assert xs.size, panel["name"]
        # The cube is at the right (+R), anterior (+A), superior (+S) side. Axial and coronal show
        # the patient's right on the viewer's left; sagittal shows anterior on the left; A (axial)
        # and S (coronal, sagittal) are up.
        assert xs.mean() < (x1 - x0) / 2, f"{panel['name']}: object should be on the viewer's left"
        assert ys.mean() < (y1 - y0) / 2, f"{panel['name']}: object should be in the upper half"
    widths = {p["name"]: p["box"][2] - p["box"][0] for p in panels_a}
    heights = {p["name"]: p["box"][3] - p["box"][1] for p in panels_a}
    assert widths["axial"] / heights["axial"] == pytest.approx(80 / 60, rel=0.02)
    assert widths["sagittal"] / heights["sagittal"] == pytest.approx(60 / 60, rel=0.02)


# --------------------------------------------------------------------------------------------
# Bad input: exit 2 and one line
# --------------------------------------------------------------------------------------------
def _bad_case(name: str, tmp_path: Path, ct_path: Path, models: dict):
    click = ["--point-ijk", "60,50,15"]
    if name == "missing image":
        return segment_args(tmp_path / "nowhere.nii.gz", models["random"], tmp_path / "o.nii.gz", *click), "not found"
    if name == "corrupt image":
        bad = tmp_path / "corrupt.nii.gz"
        bad.write_bytes(b"this is not an image at all" * 10)
        return segment_args(bad, models["random"], tmp_path / "o.nii.gz", *click), "could not read"
    if name == "2D image":
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20)).astype(np.float32), np.eye(4)), flat)
        return segment_args(flat, models["random"], tmp_path / "o.nii.gz", "--point-ijk", "1,1,0"), "2D"
    args = segment_args(ct_path, models["random"], tmp_path / "o.nii.gz")
    cases = {
        "point outside the volume": (["--point", "1000,1000,1000"], "outside the image"),
        "ijk outside the volume": (["--point-ijk", "60,50,30"], "outside the image"),
        "only negative points": (["--negative-ijk", "60,50,15"], "only negative"),
        "no prompt": ([], "no prompt"),
        "zero-extent box": (["--box", "0,150,120,0,180,160"], "zero extent"),
        "two numbers": (["--point", "1,2"], "expected 3 numbers"),
        "letters": (["--point", "a,b,c"], "not a number"),
        "nan": (["--point", "nan,1,2"], "finite"),
        "box with 5 numbers": (["--box", "1,2,3,4,5"], "expected 6 numbers"),
        "unknown expert": ([*click, "--expert", "liver"], "no expert named 'liver'"),
        "bad device": ([*click, "--device", "tpu"], "device"),
        "bad thread count": ([*click, "--threads", "0"], "at least 1"),
        "unknown option": ([*click, "--frobnicate"], "unrecognized"),
    }
    if name in cases:
        extra, match = cases[name]
        return [*args, *extra], match
    if name == "unknown output extension":
        return segment_args(ct_path, models["random"], tmp_path / "o.png", *click), "extension"
    if name == "output folder missing":
        return segment_args(ct_path, models["random"], tmp_path / "no" / "o.nii.gz", *click), "does not exist"
    if name == "truncated checkpoint":
        data = models["pth"].read_bytes()
        half = tmp_path / "half.pth"
        half.write_bytes(data[: len(data) // 2])
        return segment_args(ct_path, half, tmp_path / "o.nii.gz", *click), "damaged"
    if name == "truncated bundle file":
        import shutil

        copy = Path(shutil.copytree(models["random"], tmp_path / "bundle"))
        base = copy / "base.safetensors"
        base.write_bytes(base.read_bytes()[:1000])
        return segment_args(ct_path, copy, tmp_path / "o.nii.gz", *click), "SHA-256"
    if name == "model of another architecture":
        other = tmp_path / "other.pth"
        torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).state_dict(), other)
        return segment_args(ct_path, other, tmp_path / "o.nii.gz", *click), "another architecture"
    if name == "tiny checkpoint (not the official size)":
        return segment_args(ct_path, models["pth"], tmp_path / "o.nii.gz", *click), "does not fit"
    if name == "unknown model":
        return segment_args(ct_path, "no-such-model", tmp_path / "o.nii.gz", *click), "no-such-model"
    raise AssertionError(name)


BAD_CASES = [
    "missing image", "corrupt image", "2D image", "point outside the volume", "ijk outside the volume",
    "only negative points", "no prompt", "zero-extent box", "two numbers", "letters", "nan", "box with 5 numbers",
    "unknown expert", "bad device", "bad thread count", "unknown option", "unknown output extension",
    "output folder missing", "truncated checkpoint", "truncated bundle file", "model of another architecture",
    "tiny checkpoint (not the official size)", "unknown model",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, ct_path, models, case):
    argv, match = _bad_case(case, tmp_path, ct_path, models)
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match.lower() in lines[0].lower()
    assert "Traceback" not in err and out == ""
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))


def test_unexpected_errors_exit_1_or_show_the_traceback_with_debug(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something internal broke")

    monkeypatch.setattr(cli_models, "load_catalog", boom)
    code, _, err = run(capsys, "catalog")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError" in lines[0] and "--debug" in lines[0]
    with pytest.raises(RuntimeError, match="something internal broke"):
        cli.main(["catalog", "--debug"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_models, "load_catalog", interrupted)
    code, _, err = run(capsys, "catalog")
    assert code == 130 and "interrupted" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "segment", "--help")
    assert code == 0
    for option in ("--point-ijk", "--negative", "--box", "--expert", "--preview", "--overwrite", "--json"):
        assert option in out


# --------------------------------------------------------------------------------------------
# info, convert, catalog
# --------------------------------------------------------------------------------------------
def test_info_on_a_bundle_and_a_checkpoint(capsys, tmp_path, models):
    info = run_json(capsys, "info", models["random"])
    moe = models["moe"]
    assert info["kind"] == "bundle" and info["box_prompts"] is True
    assert info["official_architecture"] is False and "custom size" in info["architecture"]
    assert info["parameters"]["total"] == sum(p.numel() for p in moe.parameters())
    assert info["parameters"]["base"] == sum(p.numel() for p in moe.base.parameters())
    assert [(e["name"], e["targets"], e["modality"]) for e in info["experts"]] == \
        [(n, moe.expert_info[n].targets, moe.expert_info[n].modality) for n in moe.expert_names]
    assert info["gate"]["config"]["num_experts"] == 2
    assert info["tau"] == pytest.approx(moe.tau) and info["selector"] == moe.selector
    assert info["preprocessing"]["window"] == moe.base.img_size
    assert info["sha256_verified"] is True and all(f["verified"] for f in info["files"])

    code, out, err = run(capsys, "info", models["random"])
    assert code == 0, err
    assert "expert1" in out and "organ0" in out and "Gate: yes" in out and "verified" not in err

    # A changed expert file is reported, not hidden.
    import shutil

    copy = Path(shutil.copytree(models["random"], tmp_path / "edited"))
    target = copy / "experts" / "expert2.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    edited = run_json(capsys, "info", copy)
    assert edited["sha256_verified"] is False
    assert [e["sha256_verified"] for e in edited["experts"]] == [True, False]

    checkpoint = run_json(capsys, "info", models["pth"])
    state = torch.load(models["pth"], weights_only=True)["model_state_dict"]
    assert checkpoint["kind"] == "checkpoint" and checkpoint["box_prompts"] is False
    assert checkpoint["parameters"]["total"] == sum(p.numel() for p in tiny_sam(box_prompts=False).parameters())
    assert checkpoint["tensors"] == len(state)
    assert checkpoint["official_architecture"] is False and checkpoint["loadable"] is False
    assert checkpoint["sha256"] == hashlib.sha256(models["pth"].read_bytes()).hexdigest()
    assert checkpoint["sha256_verified"] is False and checkpoint["experts"] == []


def test_convert_of_a_tiny_checkpoint_is_refused_with_the_reason(capsys, tmp_path, models):
    code, out, err = run(capsys, "convert", models["pth"], tmp_path / "bundle")
    assert code == 2 and "does not fit" in err and out == ""
    assert not (tmp_path / "bundle" / "config.json").exists()


@pytest.mark.slow
def test_convert_full_size_reference_checkpoint_then_info(capsys, tmp_path):
    from reference_weights import reference_state_dict

    from SAMMed3DMoELib.model import build_sam_med3d

    state = reference_state_dict(False, torch.float32)
    checkpoint = tmp_path / "reference.pth"
    torch.save({"model_state_dict": state, "epoch": 1}, checkpoint)
    del state
    with torch.device("meta"):
        total = sum(p.numel() for p in build_sam_med3d(box_prompts=False).parameters())

    code, out, err = run(capsys, "convert", checkpoint, tmp_path / "bundle")
    assert code == 0, err
    folder = Path(out.strip())
    assert folder == tmp_path / "bundle" and (folder / "config.json").is_file()

    info = run_json(capsys, "info", folder)
    assert info["official_architecture"] is True and info["box_prompts"] is False
    assert info["parameters"]["total"] == info["parameters"]["base"] == total
    assert info["experts"] == [] and info["gate"] is None and info["sha256_verified"] is True
    assert info["preprocessing"]["window"] == 128

    ckpt = run_json(capsys, "info", checkpoint)
    assert ckpt["official_architecture"] is True and ckpt["loadable"] is True
    assert ckpt["parameters"]["total"] == total

    code, _, err = run(capsys, "convert", checkpoint, folder)
    assert code == 2 and "--overwrite" in err


def test_catalog_lists_the_official_model_with_its_size(capsys):
    code, out, err = run(capsys, "catalog")
    assert code == 0, err
    turbo = next(line for line in out.splitlines() if line.startswith("sam-med3d-turbo "))
    assert "402 MB" in turbo
    listing = run_json(capsys, "catalog")
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["sam-med3d-turbo"]["size_mb"] == 402
    assert set(by_name) == set(catalog.load_catalog())


# --------------------------------------------------------------------------------------------
# Against the local Hub stand-in: download, segment with a catalog name, consent
# --------------------------------------------------------------------------------------------
def _serve(hub_server, tmp_path, models) -> tuple[Path, bytes]:
    """Put the tiny checkpoint and the random bundle on the stand-in Hub; write a catalog for both."""
    data = models["pth"].read_bytes()
    hub_server.add_file("test-org/models", "tiny.pth", data)
    for path in sorted(Path(models["random"]).rglob("*")):
        if path.is_file():
            hub_server.add_file("test-org/tiny-bundle", path.relative_to(models["random"]).as_posix(),
                                path.read_bytes())
    catalog = {"format": 1, "models": [
        {"name": "tiny-ckpt", "kind": "checkpoint", "repo_id": "test-org/models", "filename": "tiny.pth",
         "revision": None, "sha256": hashlib.sha256(data).hexdigest(), "size_mb": round(len(data) / 1e6, 1),
         "box_prompts": False, "description": "tiny test checkpoint"},
        {"name": "tiny-bundle", "kind": "bundle", "repo_id": "test-org/tiny-bundle", "filename": None,
         "revision": None, "sha256": None, "size_mb": None, "box_prompts": True, "description": "tiny test bundle"},
    ]}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    return path, data


def test_download_and_segment_with_a_catalog_model_from_the_hub(capsys, tmp_path, ct_path, models, hub_server):
    catalog, data = _serve(hub_server, tmp_path, models)

    code, out, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog)
    assert code == 0, err
    local = Path(out.strip())
    assert local.read_bytes() == data and local.name == "tiny.pth"
    assert "downloading" in err and f"{len(data) / 1e6:.1f} MB" in err  # the size, before the download

    code, out, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog)
    assert code == 0 and Path(out.strip()) == local and "downloading" not in err  # cached: no note

    code, out, err = run(capsys, "download", "test-org/models/tiny.pth")
    assert code == 0 and Path(out.strip()).read_bytes() == data

    summary = run_json(capsys, *segment_args(ct_path, "tiny-bundle", tmp_path / "m.nii.gz", "--catalog", catalog,
                                             "--point-ijk", "60,50,15", "--max-windows", "1"))
    assert Path(summary["model_path"]).is_relative_to(Path(hub_server_cache()))
    assert summary["voxels"] == int(np.count_nonzero(read_mask(tmp_path / "m.nii.gz")))
    direct = run_json(capsys, *segment_args(ct_path, models["random"], tmp_path / "d.nii.gz", "--point-ijk",
                                            "60,50,15", "--max-windows", "1"))
    assert direct["voxels"] == summary["voxels"] and direct["gate_scores"] == summary["gate_scores"]

    listing = run_json(capsys, "catalog", "--catalog", catalog)
    assert [m["name"] for m in listing["models"]] == ["tiny-ckpt", "tiny-bundle"]
    assert listing["models"][0]["cached"] is True

    info = run_json(capsys, "info", "tiny-ckpt", "--catalog", catalog)
    assert info["catalog_match"] == "tiny-ckpt" and info["sha256_verified"] is True

    code, _, err = run(capsys, *segment_args(ct_path, "tiny-ckpt", tmp_path / "x.nii.gz", "--catalog", catalog,
                                             "--point-ijk", "60,50,15"))
    assert code == 2 and "does not fit" in err


def hub_server_cache() -> str:
    import os

    return os.environ["HF_HUB_CACHE"]


class _Terminal:
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer


def test_large_download_asks_first_on_a_terminal(capsys, tmp_path, models, hub_server, monkeypatch):
    catalog, data = _serve(hub_server, tmp_path, models)
    monkeypatch.setattr(cli_models, "LARGE_DOWNLOAD_BYTES", 1000)

    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))  # a stand-in for a person at a terminal
    code, out, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog)
    assert code == 5 and out == ""  # declined consent: its own exit status, not 130
    assert "Download it now?" in err and f"{len(data) / 1e6:.1f} MB" in err
    assert "[y/N] declined: download of catalog model 'tiny-ckpt'" in err and "Traceback" not in err
    assert hub.cached_file("test-org/models", "tiny.pth") is None
    assert not hub_server.gets("tiny.pth"), "nothing may be downloaded before the user agrees"

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog)
    assert code == 0 and Path(out.strip()).read_bytes() == data

    # --yes never asks (the terminal would answer "no").
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = run(capsys, "download", "test-org/tiny-bundle", "--yes")
    assert code == 0 and "Download it now?" not in err
    assert (Path(out.strip()) / "config.json").is_file()


def test_bundle_whose_base_is_on_the_hub(capsys, tmp_path, ct_path, models, hub_server):
    moe = models["moe"]
    checkpoint = tmp_path / "base.pth"
    torch.save({"model_state_dict": moe.base.state_dict()}, checkpoint)
    hub_server.add_file("test-org/base", "base.pth", checkpoint.read_bytes())
    pointer = {"repo_id": "test-org/base", "filename": "base.pth", "revision": None,
               "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    folder = bundle.save_bundle(moe, tmp_path / "pointer", base_pointer=pointer)

    before = run_json(capsys, "info", folder)
    assert before["base"]["hub"]["repo_id"] == "test-org/base" and before["base"]["cached_path"] is None
    assert before["sha256_verified"] is True and len(before["files"]) == 3  # 2 experts + gate

    code, out, err = run(capsys, "download", folder)  # makes the bundle usable offline
    assert code == 0 and Path(out.strip()) == folder.resolve()
    assert "downloading" in err and f"{checkpoint.stat().st_size / 1e6:.1f} MB" in err
    after = run_json(capsys, "info", folder)
    assert Path(after["base"]["cached_path"]).read_bytes() == checkpoint.read_bytes()
    assert after["sha256_verified"] is True and len(after["files"]) == 4

    summary = run_json(capsys, *segment_args(ct_path, folder, tmp_path / "m.nii.gz", "--point-ijk", "60,50,15",
                                             "--max-windows", "1"))
    direct = run_json(capsys, *segment_args(ct_path, models["random"], tmp_path / "d.nii.gz", "--point-ijk",
                                            "60,50,15", "--max-windows", "1"))
    assert summary["voxels"] == direct["voxels"] and summary["gate_scores"] == direct["gate_scores"]


def test_demo_clicks_the_organ_and_reports_dice(capsys, tmp_path, data_dir):
    """The README's main command: the packaged demo model, three simulated clicks on the spleen
    of the example CT, the mask on the CT's grid, the preview, Dice after each click."""
    status = cli.main(["demo", "--data", str(data_dir), "--out", str(tmp_path), "--json", "--threads", "2"])
    assert status == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "not a clinical model" in captured.err.replace("\n", " ")
    assert [line.split(":")[0] for line in captured.err.splitlines() if line.startswith("click ")] == \
        ["click 1", "click 2", "click 3"]
    final = [line for line in captured.err.splitlines() if "Dice against the reference spleen label" in line]
    assert len(final) == 1 and "after 3 clicks" in final[0]
    labels = np.asarray(nib.load(data_dir / "example_ct_seg.nii.gz").dataobj)
    first = summary["prompts"][0]
    assert len(summary["prompts"]) == 3 and first["positive"]
    ijk = np.round(np.linalg.inv(nib.load(data_dir / "example_ct.nii.gz").affine)
                   @ np.r_[first["ras"], 1.0])[:3].astype(int)
    assert labels[tuple(ijk)] == 1, "the demo's first click lies inside the spleen"
    mask = nib.load(tmp_path / "spleen_mask.nii.gz")
    assert mask.shape == labels.shape and int(np.count_nonzero(mask.get_fdata())) == summary["voxels"]
    assert summary["model"] == "demo" and summary["expert"] == "auto"
    assert (tmp_path / "spleen_preview.png").stat().st_size > 10_000
    assert cli.main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "sample data file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Exit statuses a script can act on (2 is covered by test_bad_input_exits_2_with_one_line)
# --------------------------------------------------------------------------------------------
def _one_error_line(err: str, prefix: str = "error: ") -> str:
    """The one error line, the last on stderr (notes such as 'downloading ...' may come before it)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith(prefix)] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def test_download_failures_exit_3(capsys, tmp_path, models, hub_server, monkeypatch):
    """Real HTTP against the local Hub stand-in: not on the Hub, a wrong checksum, offline mode and
    no network each exit 3 with one line, and leave nothing in the cache."""
    catalog, data = _serve(hub_server, tmp_path, models)

    code, _, err = run(capsys, "download", "test-org/models/missing.pth")
    assert code == 3 and "missing.pth" in _one_error_line(err)

    bad = json.loads(catalog.read_text())
    bad["models"][0]["sha256"] = "0" * 64
    wrong_sha = tmp_path / "wrong-sha.json"
    wrong_sha.write_text(json.dumps(bad))
    code, _, err = run(capsys, "download", "tiny-ckpt", "--catalog", wrong_sha, "--yes")
    assert code == 3 and "SHA-256" in _one_error_line(err)
    assert hub.cached_file("test-org/models", "tiny.pth") is None

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog)
    assert code == 3 and "Offline mode is on" in _one_error_line(err)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    hub_server.stop()  # the network is gone
    code, _, err = run(capsys, "download", "tiny-ckpt", "--catalog", catalog, "--yes")
    assert code == 3 and "Cannot reach" in _one_error_line(err)
    assert hub.cached_file("test-org/models", "tiny.pth") is None


def test_out_of_memory_exits_4(capsys, tmp_path, ct_path, models):
    """Fault injection into a real run: the CLI segments with a real tiny bundle from disk, and a
    forward pre-hook registered with PyTorch raises a real torch.OutOfMemoryError when the image
    encoder runs (no machine here can run out of GPU memory on purpose)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from SAMMed3DMoELib.model.image_encoder import ImageEncoderViT3D

    def exhaust(module, inputs):
        if isinstance(module, ImageEncoderViT3D):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    handle = register_module_forward_pre_hook(exhaust)
    try:
        code, out, err = run(capsys, *segment_args(ct_path, models["random"], tmp_path / "m.nii.gz",
                                                   "--point-ijk", "60,50,15", "--max-windows", "1"))
    finally:
        handle.remove()
    assert code == 4 and out == ""
    assert "memory" in _one_error_line(err)
    assert not (tmp_path / "m.nii.gz").exists()


def test_memory_error_outside_the_model_exits_4(capsys, monkeypatch):
    """Python's MemoryError escaping a command (here from the catalog reader, a fault injected into
    json, which the CLI does not own) is reported as out of memory too."""
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(json, "loads", no_memory)
    code, _, err = run(capsys, "catalog")
    assert code == 4 and "out of memory" in _one_error_line(err)


def test_checkpoint_that_carries_code_exits_2_naming_it(capsys, tmp_path, ct_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, evil)
    for argv in (segment_args(ct_path, evil, tmp_path / "o.nii.gz", "--point-ijk", "60,50,15"), ["info", evil]):
        code, out, err = run(capsys, *argv)
        line = _one_error_line(err)
        assert code == 2 and out == ""
        assert "evil.pth carries code" in line and "builtins.eval" in line and "nothing in it ran" in line
        assert "weights_only" not in line and "damaged" not in line and "again" not in line
    assert not marker.exists()
