"""``segment``: one image, prompts from the command line, a mask on the image's grid."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

from ..errors import SAMMed3DError
from ..preview import write_preview
from .console import EXIT_OK, _out, _Stages
from .models import _confirm_bundle_base, _resolve


def _check_output(path: Path, what: str, overwrite: bool, image: Path) -> None:
    path = path.expanduser()
    if path.is_dir():
        raise SAMMed3DError(f"the {what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise SAMMed3DError(f"cannot write the {what} {path}: the folder {path.parent} does not exist; create it")
    if path.exists():
        try:
            same = image.exists() and os.path.samefile(path, image)
        except OSError:
            same = False
        if same:
            raise SAMMed3DError(f"the {what} {path} is the input image itself; choose another file name")
        if not overwrite:
            raise SAMMed3DError(f"the {what} {path} already exists; choose another name or pass --overwrite "
                                "to replace it")


def _temporary_sibling(path: Path, ext: str) -> Path:
    base = path.name[: len(path.name) - len(ext)]
    return path.with_name(f".{base}.partial-{os.getpid()}{ext}")


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _prompts_in_ras(volume, prompts: List[dict]) -> List[dict]:
    """Prompts as RAS mm, checked against the image (before any model is loaded) by the library's
    prompt rules (SAMMed3DMoELib.prompts)."""
    from .. import prompts as rules

    out = []
    boxes = 0
    for p in prompts:
        what = f"{p['option']} {_fmt(p['values'])}"
        if p["kind"] == "box":
            boxes += 1
            if boxes > 1:
                raise SAMMed3DError("give at most one --box (a second box would replace the first)")
            box = rules.box_from_corners(volume, p["values"][:3], p["values"][3:], what)
            out.append({"type": "box", "ras_min": list(box.ras_min), "ras_max": list(box.ras_max)})
            continue
        if p["kind"] == "ijk":
            ras = rules.ijk_on_volume(volume, p["values"], what)
        else:
            ras = rules.as_xyz(p["values"], what)
            rules.point_on_volume(volume, ras, f"{what} (RAS mm)", hint=" or give voxel indices with --point-ijk")
        out.append({"type": "point", "positive": bool(p["positive"]), "ras": [float(v) for v in ras]})
    if not out:
        raise SAMMed3DError("no prompt given: add at least one --point (or --point-ijk) on the object, or a --box")
    if not any(p["type"] == "box" or p["positive"] for p in out):
        raise SAMMed3DError(
            "only negative (background) points were given; add a positive --point (or --point-ijk) on the "
            "object, or a --box"
        )
    return out


def _preview_centre(prompts: List[dict]):
    """Where the preview planes cross: the box centre if there is a box (that is where the model
    looks), else the first positive point."""
    import numpy as np

    for p in prompts:
        if p["type"] == "box":
            return (np.asarray(p["ras_min"]) + np.asarray(p["ras_max"])) / 2.0
    return np.asarray(next(p["ras"] for p in prompts if p["type"] == "point" and p["positive"]))


def cmd_segment(args, model=None) -> int:
    """``segment``; ``model`` (a SamMed3DMoE) replaces ``--model`` when given (used by ``demo``)."""
    import numpy as np

    from .. import volume_io
    from ..bundle import load_model
    from ..device import describe_device, select_device, set_cpu_threads
    from ..moe import AUTO, GENERAL
    from ..session import Session

    total_start = time.perf_counter()
    image_path = Path(args.image).expanduser()
    out_path = args.out.expanduser()
    mask_ext = volume_io.mask_file_extension(out_path)
    _check_output(out_path, "output mask", args.overwrite, image_path)
    if args.preview is not None:
        preview_path = args.preview.expanduser()
        if not preview_path.name.lower().endswith(".png") or len(preview_path.name) <= 4:
            raise SAMMed3DError(f"the preview {preview_path} must be a .png file")
        _check_output(preview_path, "preview", args.overwrite, image_path)
        if preview_path.resolve() == out_path.resolve():
            raise SAMMed3DError("--preview and --out name the same file")
    if not args.prompts:
        raise SAMMed3DError("no prompt given: add at least one --point (or --point-ijk) on the object, or a --box")
    if str(args.expert).strip() == "":
        raise SAMMed3DError("--expert is empty; use auto, general or an expert's name")
    device = select_device(args.device)
    threads = set_cpu_threads(args.threads)

    stages = _Stages(total=5 + (args.preview is not None))
    try:
        with stages.step("reading the image", "load_image"):
            volume = volume_io.load_volume(image_path)
        prompts = _prompts_in_ras(volume, args.prompts)

        with stages.step("loading the model", "load_model"):
            model_path = None
            if model is None:
                model_path = _resolve(args.model, args)
                if model_path.is_dir():
                    _confirm_bundle_base(model_path, args)
                model = load_model(model_path, device=device)
        expert = str(args.expert).strip()
        if expert.lower() in (AUTO, GENERAL):
            expert = expert.lower()
        elif expert not in model.expert_names:
            raise SAMMed3DError(
                f"the model has no expert named {expert!r}; use auto, general or one of: "
                f"{', '.join(model.expert_names) or '(this model has no experts)'}"
            )

        with stages.step("preparing the volume", "prepare"):
            session = Session(volume, model, device=device, modality=args.modality, protocol=args.protocol,
                              expert=expert, max_windows=args.max_windows)
            for p in prompts:
                if p["type"] == "box":
                    session.set_box(p["ras_min"], p["ras_max"])
                else:
                    session.add_point(p["ras"], positive=p["positive"])
        with stages.step("segmenting", "predict"):
            result = session.predict()
            mask = result.full_mask(volume.shape)
        with stages.step("writing the mask", "save"):
            tmp = _temporary_sibling(out_path, mask_ext)
            try:
                volume_io.save_mask(mask, volume, tmp, name=args.name)
                os.replace(tmp, out_path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        preview_info = None
        if args.preview is not None:
            with stages.step("drawing the preview", "preview"):
                preview_info = write_preview(args.preview.expanduser(), volume, mask, _preview_centre(prompts),
                                             ct=session.prepared.is_ct, prompts=prompts)
    finally:
        stages.close()

    voxels = int(np.count_nonzero(mask))
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    timings = {"load_image": stages.timings_ms.get("load_image"), "load_model": stages.timings_ms.get("load_model")}
    timings.update({k: float(v) for k, v in result.timings_ms.items()})
    timings["prepare"] = timings.get("prepare") or stages.timings_ms.get("prepare")
    timings["save"] = stages.timings_ms.get("save")
    if preview_info is not None:
        timings["preview"] = stages.timings_ms.get("preview")
    timings["total"] = round((time.perf_counter() - total_start) * 1e3, 2)
    summary = {
        "image": os.path.abspath(image_path),
        "output": os.path.abspath(out_path),
        "model": args.model,
        "model_path": None if model_path is None else str(model_path),
        "device": describe_device(session.device),
        "threads": threads,
        "expert": expert,
        "shape": list(volume.shape),
        "spacing_mm": [round(float(s), 6) for s in volume.spacing],
        "modality": "CT" if session.prepared.is_ct else "MR/other",
        "voxels": voxels,
        "volume_ml": round(voxels * voxel_ml, 4),
        "bbox_ijk": _bbox(mask),
        "windows_used": len(result.windows),
        "windows": [list(w) for w in result.windows],
        "decoders": list(result.decoders),
        "weights": {k: round(float(v), 4) for k, v in result.weights.items()},
        "gate_scores": None if result.scores is None else {k: round(float(v), 4) for k, v in result.scores.items()},
        "prompts": prompts,
        "timings_ms": timings,
        "notes": list(result.notes),
        "preview": preview_info,
    }
    if args.json:
        _out(json.dumps(summary, indent=2))
    else:
        _print_segment_summary(summary)
    return EXIT_OK


def _bbox(mask) -> Optional[List[List[int]]]:
    import numpy as np

    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.nonzero(mask.any(axis=other))[0]
        out.append([int(hit[0]), int(hit[-1])])
    return out


def _print_segment_summary(s: dict) -> None:
    _out(f"Wrote {s['output']}: {s['voxels']} voxels, {s['volume_ml']:.2f} mL "
         f"(grid {'x'.join(map(str, s['shape']))}, spacing {'x'.join(f'{v:g}' for v in s['spacing_mm'])} mm)")
    if s["voxels"] == 0:
        _out("  The mask is empty: try another point, more points, or a box.")
    _out(f"  Model {s['model']} on {s['device']}; windows used: {s['windows_used']}; expert setting: {s['expert']}")
    decoders = ", ".join(f"{k} {v:.2f}" for k, v in s["weights"].items())
    line = f"  Decoders (weights): {decoders}"
    if s["gate_scores"] is not None:
        line += "; gate scores: " + ", ".join(f"{k} {v:.2f}" for k, v in s["gate_scores"].items())
    _out(line)
    shown = ("load_model", "prepare", "encode", "decode", "map_back", "save", "preview", "total")
    _out("  Timings (ms): " + ", ".join(f"{k.replace('_', ' ')} {s['timings_ms'][k]:.0f}"
                                        for k in shown if s["timings_ms"].get(k) is not None))
    if s["preview"] is not None:
        _out(f"  Preview: {s['preview']['path']}")
    for note in s["notes"]:
        _out(f"  Note: {note}")

