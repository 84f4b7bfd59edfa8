"""Score bundles on the example CT as BENCHMARKS.md's "GPU runs" table does: does a click name
the structure, and Dice after the demo's clicks. General decoder only, on the CPU.

    python Testing/benchmarks/score_click_following.py SAMMed3DMoELib/models/demo runs/other/bundle

"click -> structure": windows centred on each of five structures; in each, one click at the
centre of every structure of ten that it shows (``Testing/click_following.py``); counted when
the mask lies mostly on the clicked structure. Then the spleen's Dice after clicks 1-3 and four
organs' after 3 clicks, each click at the most interior voxel of the largest error (the
protocol of ``sammed3d-moe demo``). Labels by TotalSegmentator, one patient: a comparison of
models on their training scan, not an accuracy figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (1, 2)]  # Testing/ and the repository root

from click_following import click_following_score  # noqa: E402
from SAMMed3DMoELib import bundle, clicks, evaluation  # noqa: E402
from SAMMed3DMoELib.metrics import dice  # noqa: E402
from SAMMed3DMoELib.moe import GENERAL  # noqa: E402
from SAMMed3DMoELib.sample_data import SAMPLE_DATA_DIR  # noqa: E402
from SAMMed3DMoELib.session import Session  # noqa: E402
from SAMMed3DMoELib.volume_io import load_volume  # noqa: E402

ORGANS = ["liver", "kidney_left", "stomach", "colon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = load_volume(SAMPLE_DATA_DIR / "example_ct.nii.gz")
    label = evaluation.label_on_grid(load_volume(SAMPLE_DATA_DIR / "example_ct_seg.nii.gz"), volume)
    names = json.loads((SAMPLE_DATA_DIR / "example_ct_seg_labels.json").read_text())
    ids = {entry["name"]: int(key) for key, entry in names.items()}

    def dice_after_clicks(model, name, n):
        reference = label == ids[name]
        session = Session(volume, model, modality="CT", expert=GENERAL)
        steps = clicks.simulate(session, reference, n, mode="center", spacing=volume.spacing)
        return [dice(prediction, reference) for _, prediction in steps]

    print("| model | click → structure | spleen 1/2/3 clicks | " + " | ".join(ORGANS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in ORGANS) + " |")
    for folder in args.bundles:
        model = bundle.load_bundle(folder)
        hits, total = click_following_score(model, volume, label, ids)
        spleen = " / ".join(f"{d:.2f}" for d in dice_after_clicks(model, "spleen", 3))
        organs = " | ".join(f"{dice_after_clicks(model, name, 3)[-1]:.2f}" for name in ORGANS)
        print(f"| {folder} | {hits}/{total} | {spleen} | {organs} |", flush=True)


if __name__ == "__main__":
    main()
