"""Write the repository's sample scans as datasets in the nnU-Net layout.

    python -m Training.convert_samples --out data

makes four datasets (one per scan, labels named from the ``*_labels.json`` files):

* ``Dataset501_ExampleCT``: ``example_ct`` + ``example_ct_seg`` (abdominal/thoracic CT, 61 classes);
* ``Dataset502_ExampleMR``: ``example_mr_sm`` + ``example_mr_seg`` (abdominal MR, 23 classes);
* ``Dataset503_CTSlab``: the DICOM series ``ct_dicom`` + ``ct_dicom_seg`` (31 classes); the
  segmentation is stored with its row axis flipped relative to the series, so it is resampled
  onto the series' grid in physical space (never matched by array index);
* ``Dataset504_ExampleCTsm``: ``example_ct_sm`` + ``example_seg`` (the first 30 slices of the same
  CT as Dataset501, a second labelling with 41 classes: it overlaps Dataset501).

Images and labels are written as NIfTI with the RAS affine of the source (nibabel), labels on
their image's grid, so any nnU-Net-layout reader sees them aligned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.evaluation import label_on_grid
from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.sample_data import SAMPLE_DATA_DIR, sample_file
from SAMMed3DMoELib.volume_io import load_volume

from .config import parse_args, run_script

SAMPLES = {
    "Dataset501_ExampleCT": ("example_ct.nii.gz", "example_ct_seg.nii.gz", "example_ct_seg_labels.json", "CT", "example_ct"),
    "Dataset502_ExampleMR": ("example_mr_sm.nii.gz", "example_mr_seg.nii.gz", "example_mr_seg_labels.json", "MR", "example_mr"),
    "Dataset503_CTSlab": ("ct_dicom", "ct_dicom_seg.nii.gz", "ct_dicom_seg_labels.json", "CT", "ct_slab"),
    "Dataset504_ExampleCTsm": ("example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_labels.json", "CT", "example_ct_sm"),
}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.nii.gz")
    nib.save(image, str(tmp))
    tmp.replace(path)


def write_case(dataset: Path, case_id: str, image: Volume, label: np.ndarray) -> None:
    """``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz`` (label on the image's grid)."""
    if label.shape != image.shape:
        raise SAMMed3DError(f"case {case_id}: the label {label.shape} is not on the image's grid {image.shape}")
    _save_nifti(image.array, image.affine, dataset / "imagesTr" / f"{case_id}_0000.nii.gz")
    dtype = np.uint8 if label.max() < 256 else np.int16
    _save_nifti(label.astype(dtype), image.affine, dataset / "labelsTr" / f"{case_id}.nii.gz")


def write_dataset_json(dataset: Path, labels: Dict[int, str], modality: str, num_training: int,
                       description: str = "") -> None:
    meta = {
        "channel_names": {"0": modality},
        "labels": {"background": 0, **{name: int(i) for i, name in sorted(labels.items())}},
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "name": dataset.name,
        "description": description,
    }
    (dataset / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def convert(out: Path, source: Path = SAMPLE_DATA_DIR, only: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Convert the sample scans under ``source`` into ``out``; returns {dataset name: folder}."""
    written = {}
    for name, (image_name, label_name, labels_name, modality, case_id) in SAMPLES.items():
        if only and name not in only:
            continue
        image = load_volume(sample_file(image_name, source))
        label = label_on_grid(load_volume(sample_file(label_name, source)), image)
        names = json.loads(sample_file(labels_name, source).read_text())
        labels = {int(k): v["name"] for k, v in names.items()}
        dataset = Path(out) / name
        write_case(dataset, case_id, image, label)
        write_dataset_json(dataset, labels, modality, 1,
                           f"TotalSegmentator example scan {image_name} with {label_name} (labels by TotalSegmentator, "
                           "not hand-drawn)")
        written[name] = dataset
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training.convert_samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON/YAML file with defaults for the options")
    p.add_argument("--out", type=Path, required=True, help="folder for the datasets")
    p.add_argument("--source", type=Path, default=SAMPLE_DATA_DIR, help="the sample scans folder")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(SAMPLES), help="convert only these datasets")
    args = parse_args(p, argv)
    for name, folder in convert(args.out, args.source, args.only).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    run_script(main)
