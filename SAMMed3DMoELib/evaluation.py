"""The evaluation protocol of SAM-Med3D-MoE, and the datasets it reads.

Datasets are folders in the nnU-Net layout (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json``), read by :func:`read_dataset`. A label is put on
its image's grid in physical (RAS) space by :func:`label_on_grid`, never by array index.

The protocol (the paper's, run through the same :class:`~SAMMed3DMoELib.session.Session` a user
clicks in): for every labelled class of a case and every model variant (the general model, an
expert alone, the mixture), the first click is drawn uniformly in the reference mask and each
later click uniformly in the error region of the current result (:mod:`.clicks`); Dice and the
normalised surface Dice (NSD, spacing-aware, tolerance in mm, :mod:`.metrics`) are recorded
after 1, 3, 5 and 10 clicks on the image's own grid, and once more for a box around the
reference. The first click of a class is the same for every variant.

:func:`summarize` averages the records per class, per dataset and per class group, and
:func:`write_report` writes them with the forgetting table of the paper's Table 1 (original
classes vs new classes, general vs expert vs mixture) as JSON and Markdown, plus a plot of Dice
against the number of clicks.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import geometry, metrics
from .clicks import simulate
from .errors import SAMMed3DError
from .files import atomic_write_bytes
from .geometry import Volume
from .moe import AUTO, GENERAL, SamMed3DMoE

__all__ = [
    "DatasetInfo", "CaseFiles", "read_dataset", "load_case", "label_on_grid", "Variant", "model_variants",
    "evaluate_case", "summarize", "default_groups", "forgetting_table", "write_report", "plot_dice_vs_clicks",
    "DEFAULT_CLICKS", "prompt_name",
]

DEFAULT_CLICKS = (1, 3, 5, 10)
BOX = "box"


# ============================================================================ datasets (nnU-Net)


@dataclass(frozen=True)
class CaseFiles:
    """One case of a dataset: its id, image file and label file."""

    case_id: str
    image: Path
    label: Path


@dataclass
class DatasetInfo:
    """A dataset in the nnU-Net layout: ``labels`` maps label id -> class name (no background),
    ``modality`` is "CT" or "MR" (nnU-Net's channel name; anything but CT is treated as MR)."""

    folder: Path
    name: str
    labels: Dict[int, str]
    modality: str
    cases: List[CaseFiles] = field(default_factory=list)


def read_dataset(folder) -> DatasetInfo:
    """Read ``dataset.json`` and list the cases of an nnU-Net dataset folder (v2 layout, and v1's
    ``modality`` / id->name ``labels`` too). Only single-channel images (``_0000``) are used."""
    folder = Path(os.fspath(folder)).expanduser()
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise SAMMed3DError(
            f"{folder} is not a dataset in the nnU-Net layout: it has no dataset.json. Give a folder with "
            "imagesTr/, labelsTr/ and dataset.json (Training/convert_samples.py writes one from the sample scans)."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise SAMMed3DError(f"{meta_path} could not be read as JSON ({exc}); fix or rewrite it.") from None
    labels = _dataset_labels(meta, meta_path)
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    if not isinstance(channels, dict) or not channels:
        raise SAMMed3DError(f"{meta_path}: 'channel_names' must map '0' to the modality, e.g. {{\"0\": \"CT\"}}.")
    if len(channels) != 1:
        raise SAMMed3DError(f"{meta_path}: {len(channels)} input channels; SAM-Med3D takes one image per case.")
    modality = "CT" if str(next(iter(channels.values()))).strip().upper() == "CT" else "MR"
    ending = str(meta.get("file_ending", ".nii.gz"))
    images, label_dir = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir() or not label_dir.is_dir():
        raise SAMMed3DError(f"{folder} needs the folders imagesTr/ and labelsTr/ (nnU-Net layout).")
    cases = []
    suffix = "_0000" + ending
    for image in sorted(images.iterdir()):
        if not image.name.endswith(suffix):
            continue
        case_id = image.name[: -len(suffix)]
        label = label_dir / (case_id + ending)
        if not label.is_file():
            raise SAMMed3DError(f"{image.name} has no label: {label} is missing (nnU-Net layout: labelsTr/<case>{ending}).")
        cases.append(CaseFiles(case_id, image, label))
    if not cases:
        raise SAMMed3DError(f"{images} holds no images named <case>{suffix}; nothing to train or evaluate on.")
    return DatasetInfo(folder, str(meta.get("name", folder.name)), labels, modality, cases)


def _dataset_labels(meta: Mapping, where: Path) -> Dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise SAMMed3DError(f"{where}: 'labels' must map class names to label ids, e.g. {{\"background\": 0, \"liver\": 1}}.")
    out: Dict[int, str] = {}
    for key, value in raw.items():
        name, ident = (key, value) if isinstance(value, int) else (value, key)  # v2: name -> id; v1: id -> name
        try:
            ident = int(ident)
        except (TypeError, ValueError):
            raise SAMMed3DError(f"{where}: label {key!r}: {value!r} is not a class name with an integer id "
                                "(regions with several ids are not supported).") from None
        if ident != 0:
            out[ident] = str(name)
    names = list(out.values())
    if len(set(names)) != len(names):
        raise SAMMed3DError(f"{where}: class names must be unique; found duplicates in {sorted(names)}.")
    return out


def label_on_grid(label: Volume, image: Volume) -> np.ndarray:
    """The label map ``label`` (its own array and affine) resampled onto ``image``'s voxel grid in
    physical space (nearest neighbour), so that a label stored with other axes, flips or
    spacing lands on the right voxels. Voxels of the image that the label does not cover are 0."""
    if label.array.dtype.kind not in "biu":
        rounded = np.rint(label.array)
        if not np.array_equal(rounded, label.array):
            raise SAMMed3DError("a label map must hold integer class ids; this one holds fractions.")
        label = Volume(rounded.astype(np.int32), label.affine)
    if label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4):
        return np.asarray(label.array)
    out = geometry.resample_label(label.array, label, image)
    covered = _covered(label, image)
    if not covered.any():
        raise SAMMed3DError(
            "the label does not overlap its image in physical space (check the label's header: origin, "
            "spacing and direction)."
        )
    out[~covered] = 0
    return out


def _covered(label: Volume, image: Volume) -> np.ndarray:
    """Which image voxels have their centre inside the label grid's extent."""
    to_label = np.linalg.inv(label.affine) @ image.affine
    inside = np.ones(image.shape, dtype=bool)
    amap = geometry.axis_map(to_label)
    if amap is not None:
        axes, scales, offsets = amap
        for a in range(3):
            c = scales[a] * np.arange(image.shape[a]) + offsets[a]
            ok = (c >= -0.5 - 1e-6) & (c <= label.shape[axes[a]] - 0.5 + 1e-6)
            shape = [1, 1, 1]
            shape[a] = -1
            inside &= ok.reshape(shape)
        return inside
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).reshape(-1, 3)
    c = geometry.apply_affine(to_label, idx.astype(np.float64))
    ok = np.all((c >= -0.5 - 1e-6) & (c <= np.asarray(label.shape) - 0.5 + 1e-6), axis=1)
    return ok.reshape(image.shape)


def load_case(case: CaseFiles) -> Tuple[Volume, np.ndarray]:
    """The case's image and its label map on the image's grid (see :func:`label_on_grid`)."""
    from .volume_io import load_volume

    image = load_volume(case.image)
    label = load_volume(case.label)
    return image, label_on_grid(label, image)


# ============================================================================ the protocol


@dataclass
class Variant:
    """One way of running a model: ``expert`` is "general", "auto" (the mixture) or an expert's
    name; ``tau``/``selector`` override the model's for this variant (None: the model's)."""

    label: str
    model: SamMed3DMoE
    expert: str = AUTO
    tau: Optional[float] = None
    selector: Optional[str] = None


def model_variants(model: SamMed3DMoE, *, name: str = "", experts: bool = True, mixture: bool = True,
                   taus: Sequence[float] = (), selectors: Sequence[str] = ()) -> List[Variant]:
    """The paper's rows for one model: the general decoder, each expert alone, the mixture (at
    the model's τ and selector, then at each extra ``taus`` / ``selectors`` value)."""
    prefix = f"{name} " if name else ""
    out = [Variant(f"{prefix}general".strip(), model, GENERAL)]
    if experts:
        out += [Variant(f"{prefix}expert {e}", model, e) for e in model.expert_names]
    if mixture and model.expert_names and model.gate is not None:
        out.append(Variant(f"{prefix}mixture".strip(), model, AUTO))
        for tau in taus:
            if not math.isclose(float(tau), model.tau):
                out.append(Variant(f"{prefix}mixture τ={float(tau):g}", model, AUTO, tau=float(tau)))
        for selector in selectors:
            if selector != model.selector:
                out.append(Variant(f"{prefix}mixture {selector}", model, AUTO, selector=selector))
    return out


def prompt_name(clicks: Optional[int]) -> str:
    """'1 click', '3 clicks', ... or 'box' (``clicks`` None)."""
    if clicks is None:
        return BOX
    return f"{clicks} click" + ("" if clicks == 1 else "s")


def _class_seed(seed: int, case: str, class_name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(case.encode()), zlib.crc32(class_name.encode())])


def _box_corners_ras(image: Volume, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The RAS box spanned by the outer faces of the mask's extreme voxels."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ras = image.ijk_to_ras(corners)
    return ras.min(0), ras.max(0)


def _scores(mask: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> Tuple[float, float]:
    """Dice and NSD of two masks, computed on the bounding box of both plus one voxel: the same
    values as on the whole grid (every surface voxel lies inside), far cheaper on a large scan."""
    both = mask | ref
    index = np.argwhere(both)
    lo = np.maximum(index.min(0) - 1, 0)
    hi = np.minimum(index.max(0) + 2, both.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return metrics.dice(mask[box], ref[box]), metrics.surface_dice(mask[box], ref[box], spacing, tolerance_mm)


def evaluate_case(
    image: Volume,
    label: np.ndarray,
    classes: Mapping[int, str],
    variants: Sequence[Variant],
    *,
    dataset: str = "",
    case: str = "",
    modality: str = "auto",
    clicks: Sequence[int] = DEFAULT_CLICKS,
    box: bool = True,
    seed: int = 0,
    tolerance_mm: float = 2.0,
    max_windows: int = 8,
    device=None,
    min_voxels: int = 1,
    on_record: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """Run the protocol on one case: ``label`` is the label map on ``image``'s grid, ``classes``
    the label ids to evaluate and their names. Returns one record per (class, variant, prompt):
    ``{dataset, case, class, modality, variant, prompt, clicks, dice, nsd, voxels}``."""
    from .session import Session

    clicks = sorted({int(c) for c in clicks})
    if not clicks and not box:
        raise SAMMed3DError("nothing to evaluate: give at least one click count or the box prompt")
    if clicks and clicks[0] < 1:
        raise SAMMed3DError(f"click counts must be at least 1, got {clicks}")
    label = np.asarray(label)
    if label.shape != image.shape:
        raise SAMMed3DError(f"the label {label.shape} must be on the image's grid {image.shape} (use label_on_grid)")
    mod = str(modality).upper() if str(modality).lower() != "auto" else ("CT" if geometry.is_ct(image) else "MR")
    references = {}
    for class_id, name in classes.items():
        ref = label == int(class_id)
        if int(ref.sum()) >= max(1, int(min_voxels)):
            references[name] = ref
    records: List[dict] = []
    groups: Dict[tuple, List[Variant]] = defaultdict(list)
    for variant in variants:
        groups[(id(variant.model), variant.tau, variant.selector)].append(variant)
    for group in groups.values():
        session = Session(image, group[0].model, device=device, modality=mod, protocol="newest",
                          max_windows=max_windows)
        try:
            session.tau = group[0].tau  # per session (None: the model's own): the model is never changed
            session.selector = group[0].selector
            for variant in group:
                session.expert = variant.expert
                for name, ref in references.items():
                    base = dict(dataset=dataset, case=case, **{"class": name}, modality=mod, variant=variant.label,
                                voxels=int(ref.sum()))

                    def record(mask: np.ndarray, n_clicks: Optional[int]) -> None:
                        dice, nsd = _scores(mask, ref, image.spacing, tolerance_mm)
                        entry = dict(base, prompt=prompt_name(n_clicks), clicks=n_clicks, dice=dice, nsd=nsd)
                        records.append(entry)
                        if on_record is not None:
                            on_record(entry)

                    if clicks:
                        rng = _class_seed(seed, case, name)
                        for k, (_, prediction) in enumerate(simulate(session, ref, clicks[-1], rng), start=1):
                            if k in clicks:
                                record(prediction, k)
                    if box:
                        session.reset()
                        session.set_box(*_box_corners_ras(image, ref))
                        record(session.predict().full_mask(image.shape), None)
        finally:
            session.close()
    return records


# ============================================================================ summaries


def _mean(values: Iterable[float]) -> Optional[float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else None


def default_groups(model: Optional[SamMed3DMoE]) -> List[dict]:
    """Class groups of the forgetting table: one "new (<expert>)" group per expert (its target
    classes, in its modality unless "any") and "original" for every other record."""
    groups = []
    if model is not None:
        for name in model.expert_names:
            info = model.expert_info[name]
            group = {"name": f"new ({name})", "classes": list(info.targets)}
            if str(info.modality).lower() not in ("any", ""):
                group["modality"] = str(info.modality).upper()
            groups.append(group)
    groups.append({"name": "original", "rest": True})
    return groups


def _group_of(record: Mapping, groups: Sequence[Mapping]) -> Optional[str]:
    for group in groups:
        if group.get("rest"):
            continue
        if "classes" in group and record["class"] not in group["classes"]:
            continue
        if "modality" in group and str(group["modality"]).upper() != record["modality"]:
            continue
        if "datasets" in group and record["dataset"] not in group["datasets"]:
            continue
        return str(group["name"])
    rest = [g for g in groups if g.get("rest")]
    return str(rest[0]["name"]) if rest else None


def _prompt_order(records: Sequence[Mapping]) -> List[str]:
    counts = sorted({r["clicks"] for r in records if r["clicks"] is not None})
    return [prompt_name(c) for c in counts] + ([BOX] if any(r["clicks"] is None for r in records) else [])


def _variant_order(records: Sequence[Mapping]) -> List[str]:
    return list(dict.fromkeys(r["variant"] for r in records))


def summarize(records: Sequence[Mapping], groups: Sequence[Mapping]) -> dict:
    """Mean Dice and NSD per class, per dataset and per group, for every variant and prompt.

    Returns ``{"prompts", "variants", "groups", "per_group", "per_dataset", "per_class"}``;
    each table maps ``key -> variant -> prompt -> {"dice", "nsd", "n"}``."""
    def table(key_of) -> dict:
        cells: Dict[str, Dict[str, Dict[str, List[Mapping]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in records:
            key = key_of(r)
            if key is not None:
                cells[key][r["variant"]][r["prompt"]].append(r)
        return {k: {v: {p: {"dice": _mean(x["dice"] for x in rs), "nsd": _mean(x["nsd"] for x in rs), "n": len(rs)}
                        for p, rs in ps.items()} for v, ps in vs.items()} for k, vs in cells.items()}

    return {
        "prompts": _prompt_order(records),
        "variants": _variant_order(records),
        "groups": [dict(g) for g in groups],
        "per_group": table(lambda r: _group_of(r, groups)),
        "per_dataset": table(lambda r: r["dataset"]),
        "per_class": table(lambda r: f"{r['class']} ({r['modality']})"),
    }


def forgetting_table(summary: Mapping, metric: str = "dice") -> str:
    """The paper's Table 1 as Markdown: one row per variant, for each group the mean ``metric``
    after each prompt (classes of the group averaged)."""
    prompts, variants = summary["prompts"], summary["variants"]
    groups = [g["name"] for g in summary["groups"] if g["name"] in summary["per_group"]]
    header = "| model | " + " | ".join(f"{g}: {p}" for g in groups for p in prompts) + " |"
    lines = [header, "|" + " --- |" * (1 + len(groups) * len(prompts))]
    for v in variants:
        cells = []
        for g in groups:
            for p in prompts:
                value = summary["per_group"].get(g, {}).get(v, {}).get(p, {}).get(metric)
                cells.append("–" if value is None else f"{value:.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _detail_table(table: Mapping, prompts: Sequence[str], variants: Sequence[str], title: str) -> str:
    lines = [f"| {title} | model | " + " | ".join(prompts) + " |", "|" + " --- |" * (2 + len(prompts))]
    for key in sorted(table):
        for v in variants:
            if v not in table[key]:
                continue
            cells = []
            for p in prompts:
                cell = table[key][v].get(p)
                cells.append("–" if cell is None or cell["dice"] is None else f"{cell['dice']:.3f} / {cell['nsd']:.3f}")
            lines.append(f"| {key} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(records: Sequence[Mapping], out_dir, groups: Sequence[Mapping], *, title: str = "Evaluation",
                 notes: Sequence[str] = (), tolerance_mm: float = 2.0) -> Dict[str, Path]:
    """Write ``results.json`` (every record and the summary), ``forgetting.json``,
    ``forgetting.md`` (Table 1 in Dice and NSD, per dataset and per class) and
    ``dice_vs_clicks.png`` into ``out_dir``; returns their paths."""
    out = Path(os.fspath(out_dir)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise SAMMed3DError("no evaluation results to report: no class had a reference mask (check --classes)")
    summary = summarize(records, groups)
    paths = {"results": out / "results.json", "forgetting_json": out / "forgetting.json",
             "forgetting_md": out / "forgetting.md", "plot": out / "dice_vs_clicks.png"}
    _write_json(paths["results"], {"records": list(records), "summary": summary})
    _write_json(paths["forgetting_json"], {"prompts": summary["prompts"], "variants": summary["variants"],
                                           "groups": summary["groups"], "per_group": summary["per_group"],
                                           "tolerance_mm": tolerance_mm})
    md = [f"# {title}", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["## Forgetting table: mean Dice", "", forgetting_table(summary, "dice"), "",
           f"## Forgetting table: mean NSD (tolerance {tolerance_mm:g} mm)", "", forgetting_table(summary, "nsd"), "",
           "## Per dataset (Dice / NSD)", "",
           _detail_table(summary["per_dataset"], summary["prompts"], summary["variants"], "dataset"), "",
           "## Per class (Dice / NSD)", "",
           _detail_table(summary["per_class"], summary["prompts"], summary["variants"], "class"), ""]
    atomic_write_bytes(paths["forgetting_md"], "\n".join(md).encode("utf-8"))
    plot_dice_vs_clicks(summary, paths["plot"])
    return paths


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def plot_dice_vs_clicks(summary: Mapping, path) -> Path:
    """A PNG with one panel per class group: mean Dice against the number of clicks, one line per
    variant (matplotlib when installed, else drawn with Pillow)."""
    path = Path(os.fspath(path))
    groups = [g["name"] for g in summary["groups"] if g["name"] in summary["per_group"]]
    series = {}
    for g in groups:
        for v in summary["variants"]:
            cells = summary["per_group"][g].get(v, {})
            pts = sorted((int(p.split()[0]), c["dice"]) for p, c in cells.items() if p != BOX and c["dice"] is not None)
            if pts:
                series[(g, v)] = pts
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pillow(groups, summary["variants"], series, path)
        return path
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.6), squeeze=False)
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    for ax, g in zip(axes[0], groups):
        ax.set_xticks(ticks)
        for v in summary["variants"]:
            if (g, v) in series:
                xs, ys = zip(*series[(g, v)])
                ax.plot(xs, ys, marker="o", label=v)
        ax.set_title(g)
        ax.set_xlabel("clicks")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Dice")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _plot_with_pillow(groups, variants, series, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 360, 300, 40
    canvas = Image.new("RGB", (w * max(1, len(groups)), h + 20 * len(variants)), "white")
    draw = ImageDraw.Draw(canvas)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    xs_all = sorted({x for pts in series.values() for x, _ in pts}) or [1]
    x_max = max(xs_all)
    for gi, g in enumerate(groups):
        ox = gi * w
        draw.rectangle([ox + pad, pad, ox + w - 10, h - pad], outline="black")
        draw.text((ox + pad, 10), g, fill="black")
        for vi, v in enumerate(variants):
            pts = series.get((g, v))
            if not pts:
                continue
            xy = [(ox + pad + (x / x_max) * (w - 10 - pad - pad // 2), h - pad - y * (h - 2 * pad)) for x, y in pts]
            draw.line(xy, fill=colours[vi % len(colours)], width=2)
    for vi, v in enumerate(variants):
        draw.text((10, h + 20 * vi), f"— {v}", fill=colours[vi % len(colours)])
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
