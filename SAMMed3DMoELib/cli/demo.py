"""``demo``: the README's first command, one click on an organ of the sample CT."""

from __future__ import annotations

import json

from .. import metrics
from ..errors import SAMMed3DError
from ..sample_data import sample_file
from .console import _err
from .segment import cmd_segment


def cmd_demo(args) -> int:
    """``demo``: one click at an organ's centre on the example CT, then Dice against its label."""
    import numpy as np

    from .. import volume_io
    from ..model import build_sam_med3d
    from ..moe import SamMed3DMoE

    image, labels, names = (sample_file(name, args.data) for name in
                            ("example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_labels.json"))
    ids = {entry["name"]: int(key) for key, entry in json.loads(names.read_text()).items()}
    if args.target not in ids:
        raise SAMMed3DError(f"no organ named {args.target!r} in {names.name}; choose one of: {', '.join(sorted(ids))}")
    reference = volume_io.load_volume(labels).array == ids[args.target]
    inside = np.argwhere(reference)
    click = inside[np.argmin(np.linalg.norm(inside - inside.mean(0), axis=1))]  # organ voxel nearest its centroid

    out_dir = args.out.expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, preview_path = out_dir / f"{args.target}_mask.nii.gz", out_dir / f"{args.target}_preview.png"
    argv = ["segment", str(image), "--model", args.model or "untrained", "--out", str(mask_path),
            "--preview", str(preview_path), "--point-ijk", ",".join(str(int(v)) for v in click),
            "--device", args.device, "--overwrite", "--name", args.target]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--json"] if args.json else []
    argv += ["--yes"] if args.yes else []
    argv += ["--catalog", str(args.catalog)] if getattr(args, "catalog", None) else []
    model = None
    if args.model is None:
        _err("note: no --model given, so the demo uses an UNTRAINED full-size SAM-Med3D (fixed random "
             "weights): it shows the pipeline end to end, not a meaningful segmentation. Use "
             "--model sam-med3d-turbo (internet) or a local sam_med3d_turbo.pth for real results.")
        import torch

        torch.manual_seed(0)
        model = SamMed3DMoE(build_sam_med3d())
        argv += ["--max-windows", "1"]  # random weights spill over every window face
    from .parser import build_parser

    status = cmd_segment(build_parser().parse_args(argv), model=model)
    import SimpleITK as sitk

    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))).transpose(2, 1, 0) > 0  # [k,j,i] -> [i,j,k]
    dice = metrics.dice(predicted, reference)
    _err(f"Dice against the reference {args.target} label: {dice:.3f}"
         + (" (untrained weights: expected to be low)" if args.model is None else ""))
    return status

