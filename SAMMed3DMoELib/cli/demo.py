"""``demo``: the README's first command, simulated clicks on an organ of the example CT."""

from __future__ import annotations

import json

from .. import metrics
from ..errors import SAMMed3DError
from ..sample_data import sample_file
from .console import _err
from .segment import cmd_segment

DEMO_MODEL = "demo"
"""The catalog name of the packaged demonstration model (``SAMMed3DMoELib/models/demo``)."""

DEMO_NOTE = (
    "note: the default model 'demo' is a small demonstration SAM-Med3D-MoE trained with this repository's "
    "Training scripts on one patient's scans (the TotalSegmentator example CT and MR, labels made by the "
    "TotalSegmentator model), and this scan is one of them: the result shows the whole chain working offline, "
    "not accuracy on new patients. It is not a clinical model. Use --model sam-med3d-turbo (internet) or "
    "another model for real work."
)


def cmd_demo(args) -> int:
    """``demo``: ``--clicks`` simulated clicks on an organ of the example CT (each at the most
    interior voxel of the largest error, as a user would click), Dice after each, then the same
    clicks through ``segment`` to write the mask and the preview."""
    from .. import volume_io
    from ..bundle import load_model
    from ..clicks import simulate
    from ..device import select_device, set_cpu_threads
    from ..session import Session
    from .models import _confirm_bundle_base, _resolve

    image, labels, names = (sample_file(name, args.data) for name in
                            ("example_ct.nii.gz", "example_ct_seg.nii.gz", "example_ct_seg_labels.json"))
    ids = {entry["name"]: int(key) for key, entry in json.loads(names.read_text()).items()}
    if args.target not in ids:
        raise SAMMed3DError(f"no organ named {args.target!r} in {names.name}; choose one of: {', '.join(sorted(ids))}")
    out_dir = args.out.expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise SAMMed3DError(f"--out {out_dir} is a file; give a folder for the mask and the preview")
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, preview_path = out_dir / f"{args.target}_mask.nii.gz", out_dir / f"{args.target}_preview.png"

    model_name = args.model or DEMO_MODEL
    if model_name == DEMO_MODEL:
        _err(DEMO_NOTE)
    model_path = _resolve(model_name, args)
    if model_path.is_dir():
        _confirm_bundle_base(model_path, args)
    set_cpu_threads(args.threads)
    device = select_device(args.device)
    model = load_model(model_path, device=device)
    volume = volume_io.load_volume(image)
    reference = volume_io.load_volume(labels).array == ids[args.target]

    session = Session(volume, model, device=device, modality="CT")
    prompts = []
    try:
        for n, (click, prediction) in enumerate(
                simulate(session, reference, args.clicks, mode="center", spacing=volume.spacing), start=1):
            prompts += ["--point-ijk" if click.positive else "--negative-ijk", ",".join(map(str, click.index))]
            _err(f"click {n}: {'positive' if click.positive else 'negative'} at voxel "
                 f"{','.join(map(str, click.index))}: Dice {metrics.dice(prediction, reference):.3f}")
    finally:
        session.close()

    argv = ["segment", str(image), "--model", model_name, "--out", str(mask_path), "--preview", str(preview_path),
            *prompts, "--device", args.device, "--overwrite", "--name", args.target]
    argv += ["--json"] if args.json else []
    from .parser import build_parser

    status = cmd_segment(build_parser().parse_args(argv), model=model)
    written = volume_io.load_volume(mask_path).array > 0
    _err(f"Dice against the reference {args.target} label (TotalSegmentator's, {labels.name}) after "
         f"{args.clicks} click{'s' if args.clicks > 1 else ''}: {metrics.dice(written, reference):.3f}"
         + (" (the demo model has seen this patient in training)" if model_name == DEMO_MODEL else ""))
    return status
