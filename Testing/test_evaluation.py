"""The evaluation protocol (SAMMed3DMoELib.evaluation, `sammed3d-moe eval`, Training.evaluate)
on the real example CT with tiny random bundles: the records, the forgetting table, the plot,
the config file, and sharding across ranks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from SAMMed3DMoELib import bundle, cli
from SAMMed3DMoELib.cli.evaluate import run_evaluation
from SAMMed3DMoELib.model import GatingNetwork
from Training import evaluate as training_evaluate
from training_helpers import converted_datasets, tiny_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    base = tmp_path_factory.getbasetemp()
    data = converted_datasets(base, data_dir)["Dataset501_ExampleCT"]
    folder = tiny_bundle(base / "eval-bundle", {"vessels": (["aorta"], "CT")})
    moe = bundle.load_bundle(folder)
    torch.manual_seed(0)
    moe.gate = GatingNetwork(48, 1, num_heads=4, mlp_dim=32, hidden_dim=16)
    bundle.save_bundle(moe, folder, preprocessing=moe.preprocessing)
    other = tiny_bundle(base / "eval-other", seed=1)
    return data, folder, other


def test_eval_writes_the_forgetting_table_and_the_plot(setup, tmp_path, capsys):
    data, folder, other = setup
    out = tmp_path / "eval"
    status = cli.main(["eval", "--model", str(folder), "--data", str(data), "--classes", "liver,aorta",
                       "--clicks", "1,3", "--taus", "0.7", "--extra-model", f"finetuned={other}", "--out", str(out),
                       "--threads", "1"])
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    variants = ["general", "expert vessels", "mixture", "mixture τ=0.7", "finetuned general"]
    assert results["summary"]["variants"] == variants
    assert results["summary"]["prompts"] == ["1 click", "3 clicks", "box"]
    assert len(records) == 2 * len(variants) * 3
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0 for r in records)
    assert {r["class"] for r in records} == {"liver", "aorta"} and {r["modality"] for r in records} == {"CT"}
    table = json.loads((out / "forgetting.json").read_text())
    assert set(table["per_group"]) == {"new (vessels)", "original"}  # aorta is the expert's, liver original
    assert table["per_group"]["new (vessels)"]["mixture"]["box"]["n"] == 1
    md = (out / "forgetting.md").read_text()
    assert "| model | new (vessels): 1 click |" in md and "| finetuned general |" in md and "NSD" in md
    with Image.open(out / "dice_vs_clicks.png") as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 100


def test_config_file_and_sharding_across_ranks(setup, tmp_path):
    data, folder, _ = setup
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"model": str(folder), "data": [str(data)], "classes": "spleen,aorta,kidney_left",
                                  "clicks": "1,2", "box": False, "out": str(tmp_path / "whole"), "threads": 1}))
    assert training_evaluate.main(["--config", str(config)]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["records"]
    args = training_evaluate.build_parser()
    shards = []
    for rank in (0, 1):
        parsed = training_evaluate.parse_args(args, ["--config", str(config), "--out", str(tmp_path / f"shard{rank}")])
        records, _ = run_evaluation(parsed, shard=(rank, 2))
        shards.append(records)
    assert shards[0] and shards[1]
    assert not {r["class"] for r in shards[0]} & {r["class"] for r in shards[1]}  # each class on one rank
    key = lambda r: (r["class"], r["variant"], r["prompt"])  # noqa: E731
    assert sorted((key(r), r["dice"]) for r in shards[0] + shards[1]) == sorted((key(r), r["dice"]) for r in whole)
    assert not (tmp_path / "shard1").exists()  # only rank 0 writes the report


def test_scores_on_the_masks_bounding_box_equal_the_whole_grid(data_dir):
    """Evaluation computes Dice and NSD on the bounding box of prediction and reference (plus a
    voxel): the values must be those of the whole grid."""
    import numpy as np

    from SAMMed3DMoELib import metrics
    from SAMMed3DMoELib.evaluation import _scores
    from SAMMed3DMoELib.volume_io import load_volume

    label = load_volume(data_dir / "example_ct_seg.nii.gz")
    ref = label.array == 1  # spleen
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    pred[5, 5, 5] = True  # a stray voxel far away
    whole = (metrics.dice(pred, ref), metrics.surface_dice(pred, ref, label.spacing, 3.0))
    assert _scores(pred, ref, label.spacing, 3.0) == whole and 0.3 < whole[0] < 0.95
