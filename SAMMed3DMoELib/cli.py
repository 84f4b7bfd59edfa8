"""The ``sammed3d-moe`` command line (also ``python -m SAMMed3DMoELib``).

Subcommands::

    sammed3d-moe segment IMAGE --model M (--point R,A,S | --point-ijk I,J,K | --box ...) --out MASK
    sammed3d-moe download MODEL
    sammed3d-moe convert CHECKPOINT BUNDLE_DIR [--overwrite]
    sammed3d-moe info MODEL_OR_BUNDLE [--json]
    sammed3d-moe catalog [--json]

Exit status: 0 success; 2 bad input (any :class:`~SAMMed3DMoELib.errors.SAMMed3DError`, bad
arguments included), reported as ONE line ``error: <message>`` on stderr; 130 when interrupted
(Ctrl-C) or cancelled (a declined download); 1 for an unexpected failure (one line, or the full
traceback with ``--debug``).

Coordinates are RAS millimetres (the convention of 3D Slicer and nibabel: the coordinates grow
toward the patient's right, anterior and superior; ITK and DICOM use LPS, with the first two
negated), or voxel indices of IMAGE with ``--point-ijk``. Values may be separated by commas
and/or spaces; a value that starts with a minus sign may follow the option directly
(``--point -20,5,30``).

Heavy modules (torch, SimpleITK, huggingface_hub) are imported only by the commands that need
them, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import CancelledError, SAMMed3DError

PROG = "sammed3d-moe"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

"""Longest first: ``x.seg.nrrd`` is a Slicer segmentation, not a plain ``.nrrd``."""

LARGE_DOWNLOAD_BYTES = 20 * 2**20
"""Downloads at least this large (or of unknown size) ask for consent on a terminal."""

CT_DISPLAY_WINDOW = (-160.0, 240.0)
"""Soft-tissue window (level 40, width 400 HU) for CT previews."""

PREVIEW_LONGEST_MM_PX = 384
"""The image's longest physical extent spans this many preview pixels."""

OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.45
MARKER_RGB = (40, 255, 40)
LETTER_RGB = (255, 220, 0)

_COORDINATE_OPTIONS = ("--point", "--negative", "--point-ijk", "--negative-ijk", "--box")
_NUMBER_SPLIT = re.compile(r"[,;\s]+")


# ============================================================================================
# Argument parsing
# ============================================================================================
class _UsageError(SAMMed3DError):
    """A command line that argparse could not parse."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a parse error raises (main prints it as one line and exits with 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _numbers(text: str, count: int, what: str, example: str) -> Tuple[float, ...]:
    """``count`` finite numbers from 'a,b,c' / 'a b c' / '(a, b, c)'; argparse type helper."""
    cleaned = str(text).strip().strip("()[]").strip()
    parts = [p for p in _NUMBER_SPLIT.split(cleaned) if p]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} in {text!r} is not a number; give {count} numbers {what}, e.g. {example}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"{text!r} contains {part!r}; coordinates must be finite numbers ({what}, e.g. {example})"
            )
        values.append(value)
    if len(values) != count:
        raise argparse.ArgumentTypeError(
            f"expected {count} numbers {what}, got {len(values)} in {text!r}; e.g. {example}"
        )
    return tuple(values)


def _ras(text: str) -> Tuple[float, ...]:
    return _numbers(text, 3, "R,A,S (mm)", "12.5,-30,40")


def _ijk(text: str) -> Tuple[float, ...]:
    return _numbers(text, 3, "i,j,k (voxel indices of IMAGE)", "60,50,15")


def _box(text: str) -> Tuple[float, ...]:
    return _numbers(text, 6, "R,A,S,R,A,S (two opposite corners, mm)", "-20,-40,10,30,10,60")


def _positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _modality(text: str) -> str:
    value = str(text).strip()
    if value.lower() == "auto":
        return "auto"
    if value.upper() in ("CT", "MR", "MRI"):
        return value.upper()[:2]
    raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, CT, MR")


class _PromptAction(argparse.Action):
    """Collects --point/--negative/--point-ijk/--negative-ijk/--box into one ordered list, so the
    clicks are replayed in the order they were given."""

    def __init__(self, option_strings, dest, kind: str = "ras", positive: bool = True, **kwargs):
        self.kind = kind
        self.positive = positive
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = list(getattr(namespace, self.dest, None) or [])
        prompts.append({"kind": self.kind, "positive": self.positive, "values": tuple(values),
                        "option": option_string})
        setattr(namespace, self.dest, prompts)


def _glue_negative_values(argv: Sequence[str]) -> List[str]:
    """``--point -20,5,30`` -> ``--point=-20,5,30``: argparse would take '-20,5,30' for an option."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        if token in _COORDINATE_OPTIONS and i + 1 < len(argv) and re.match(r"^\s*-\s*[\d.]", argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and debug logging")
    catalog_opt = _Parser(add_help=False)
    catalog_opt.add_argument("--catalog", metavar="FILE", type=Path,
                             help="model catalog JSON to use instead of the packaged one (e.g. for a mirror)")
    consent = _Parser(add_help=False)
    consent.add_argument("-y", "--yes", action="store_true",
                         help="download without asking (non-interactive runs never ask)")

    parser = _Parser(
        prog=PROG, allow_abbrev=False,
        description="SAM-Med3D-MoE: interactive 3D medical image segmentation from points or a box.",
        epilog="Exit status: 0 ok, 2 bad input, 130 interrupted/cancelled, 1 unexpected failure.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # ---------------------------------------------------------------- segment
    seg = sub.add_parser(
        "segment", parents=[common, catalog_opt, consent], allow_abbrev=False,
        help="segment one object in a 3D image from points and/or a box",
        description=(
            "Segment one object in IMAGE (NIfTI, NRRD, MetaImage, or a DICOM series folder) and write "
            "the mask on exactly IMAGE's voxel grid. Prompts are RAS millimetres (as shown by 3D Slicer) "
            "or voxel indices of IMAGE; they are used in the order given."
        ),
        epilog=(
            "Example: sammed3d-moe segment ct.nii.gz --model sam-med3d-turbo --point 25,-10,40 "
            "--negative 40,-10,40 --out liver.seg.nrrd --preview liver.png"
        ),
    )
    seg.add_argument("image", metavar="IMAGE", help="3D image file or DICOM series folder")
    seg.add_argument("-m", "--model", required=True, metavar="M",
                     help="catalog name (see 'catalog'), Hub repo 'owner/name' (bundle) or "
                          "'owner/name/file.pth', a local .pth/.safetensors checkpoint, or a bundle folder")
    seg.add_argument("-o", "--out", required=True, metavar="MASK", type=Path,
                     help="output mask: .nii.gz, .nii, .nrrd, or .seg.nrrd (3D Slicer segmentation)")
    prompts = seg.add_argument_group("prompts (repeatable; at least one positive point or a box)")
    prompts.add_argument("--point", dest="prompts", action=_PromptAction, kind="ras", positive=True, type=_ras,
                         metavar="R,A,S", help="object (positive) click in RAS mm")
    prompts.add_argument("--negative", dest="prompts", action=_PromptAction, kind="ras", positive=False,
                         type=_ras, metavar="R,A,S", help="background (negative) click in RAS mm")
    prompts.add_argument("--point-ijk", dest="prompts", action=_PromptAction, kind="ijk", positive=True,
                         type=_ijk, metavar="I,J,K", help="positive click as voxel indices of IMAGE")
    prompts.add_argument("--negative-ijk", dest="prompts", action=_PromptAction, kind="ijk", positive=False,
                         type=_ijk, metavar="I,J,K", help="negative click as voxel indices of IMAGE")
    prompts.add_argument("--box", dest="prompts", action=_PromptAction, kind="box", positive=True, type=_box,
                         metavar="R,A,S,R,A,S", help="box around the object: two opposite corners in RAS mm")
    seg.add_argument("--expert", default="auto", metavar="auto|general|NAME",
                     help="auto: the gate picks (default); general: base model only; NAME: that expert only")
    seg.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    seg.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for PyTorch")
    seg.add_argument("--protocol", choices=("newest", "accumulate"), default="newest",
                     help="click replay: newest = SAM-Med3D's training protocol (default); accumulate = all "
                          "clicks at every step")
    seg.add_argument("--max-windows", type=_positive_int, default=8, metavar="N",
                     help="follow an object across at most N model windows (default 8)")
    seg.add_argument("--modality", type=_modality, default="auto", metavar="auto|CT|MR",
                     help="image modality (default auto: CT if the intensities look like Hounsfield units)")
    seg.add_argument("--preview", type=Path, metavar="PNG",
                     help="also write a PNG: axial, coronal and sagittal planes with the mask overlaid")
    seg.add_argument("--name", default="Segment_1", metavar="SEGMENT_NAME",
                     help="segment name stored in a .seg.nrrd (default Segment_1)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("--json", action="store_true", help="print a machine-readable summary (JSON) on stdout")
    seg.set_defaults(func=cmd_segment, prompts=None)

    # ---------------------------------------------------------------- download
    dl = sub.add_parser(
        "download", parents=[common, catalog_opt, consent], allow_abbrev=False,
        help="download a model into the Hugging Face cache and print its local path",
        description="Download a catalog model, a Hub bundle repo 'owner/name' or a Hub file "
                    "'owner/name/file.pth' (with progress and checksum verification) and print the local path.",
    )
    dl.add_argument("model", metavar="MODEL")
    dl.set_defaults(func=cmd_download)

    # ---------------------------------------------------------------- convert
    cv = sub.add_parser(
        "convert", parents=[common, catalog_opt, consent], allow_abbrev=False,
        help="convert an official SAM-Med3D checkpoint into a bundle folder",
        description="Convert an official SAM-Med3D checkpoint (.pth, or a catalog name) into a bundle folder "
                    "(base model only; experts are added by training).",
    )
    cv.add_argument("checkpoint", metavar="CHECKPOINT")
    cv.add_argument("bundle", metavar="BUNDLE_DIR", type=Path)
    cv.add_argument("--overwrite", action="store_true", help="replace a bundle already in BUNDLE_DIR")
    cv.set_defaults(func=cmd_convert)

    # ---------------------------------------------------------------- info
    inf = sub.add_parser(
        "info", parents=[common, catalog_opt, consent], allow_abbrev=False,
        help="describe a checkpoint or bundle (architecture, experts, gate, checksums)",
        description="Describe what a checkpoint or bundle holds: architecture, box prompts, parameter count, "
                    "experts, gate, tau, selector, preprocessing, and whether the checksums verify.",
    )
    inf.add_argument("model", metavar="MODEL_OR_BUNDLE")
    inf.add_argument("--json", action="store_true", help="print JSON on stdout")
    inf.set_defaults(func=cmd_info)

    # ---------------------------------------------------------------- catalog
    cat = sub.add_parser("catalog", parents=[common, catalog_opt], allow_abbrev=False,
                         help="list the known models", description="List the models known by name, with sizes.")
    cat.add_argument("--json", action="store_true", help="print JSON on stdout")
    cat.set_defaults(func=cmd_catalog)
    # ---------------------------------------------------------------- demo
    demo = sub.add_parser(
        "demo", parents=[common, catalog_opt, consent], allow_abbrev=False,
        help="segment an organ of the example CT with one click and compare with its reference label",
        description="One click at the centre of an organ of the TotalSegmentator example CT "
                    "(shared/data), segmented with --model (default: an UNTRAINED full-size network, "
                    "which proves the pipeline runs but does not segment anything meaningful); writes "
                    "the mask and a preview to --out and prints Dice against the reference label.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                      help="folder for the mask and the preview (default: demo-output)")
    demo.add_argument("--data", type=Path, default=Path("../shared/data/totalsegmentator-example"),
                      metavar="DIR", help="the example data folder (default: ../shared/data/totalsegmentator-example)")
    demo.add_argument("--model", "-m", default=None, metavar="M",
                      help="weights to use: catalog name, Hub repo, .pth or bundle (default: untrained)")
    demo.add_argument("--target", default="spleen", help="organ name from example_seg_labels.json (default: spleen)")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    demo.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for PyTorch")
    demo.add_argument("--json", action="store_true", help="print a machine-readable summary (JSON) on stdout")
    demo.set_defaults(func=cmd_demo)

    return parser


# ============================================================================================
# Console helpers
# ============================================================================================
def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _stdin_is_terminal() -> bool:
    try:
        return bool(sys.stdin is not None and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return False


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "warning" if record.levelno >= logging.WARNING else record.levelname.lower()
            _err(f"{level}: {_one_line(record.getMessage())}")
        except Exception:  # pragma: no cover - never fail because of a log line
            self.handleError(record)


@contextmanager
def _console(debug: bool):
    """Library warnings and log warnings as one 'warning: ...' line each on stderr."""
    logger = logging.getLogger("SAMMed3DMoELib")
    handler = _WarningHandler(logging.DEBUG if debug else logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    if debug:
        logger.setLevel(logging.DEBUG)
    with warnings.catch_warnings():
        if not debug:
            def show(message, category, filename, lineno, file=None, line=None):
                _err(f"warning: {_one_line(message)}")

            warnings.showwarning = show
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


class _Stages:
    """A tqdm bar over the named steps of a command (stderr, terminals only) that also records
    how long each step took."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.timings_ms: Dict[str, float] = {}
        self._bar = tqdm(total=total, file=sys.stderr, leave=False, disable=not _stderr_is_terminal(),
                         bar_format="{desc} [{n_fmt}/{total_fmt} steps, {elapsed}]")

    @contextmanager
    def step(self, label: str, key: str):
        self._bar.set_description_str(label)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[key] = round((time.perf_counter() - start) * 1e3, 2)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _format_bytes(size: Optional[float]) -> str:
    if size is None:
        return "size unknown"
    size = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} TB"  # pragma: no cover


# ============================================================================================
# Models: resolve, ask before large downloads, load
# ============================================================================================
def _catalog(args) -> Optional[dict]:
    from . import hub

    path = getattr(args, "catalog", None)
    return hub.load_catalog(path) if path is not None else None


def _remote_target(spec: str, catalog: Optional[dict]) -> Optional[Tuple[str, Optional[str], Optional[str], str]]:
    """(repo_id, filename or None for a whole bundle repo, revision, description) when
    ``spec`` will be fetched from the Hub; None for local paths."""
    from . import hub

    target = hub.remote_target(spec, catalog)
    if target is None:
        return None
    repo_id, filename, revision = target
    entries = hub.load_catalog() if catalog is None else catalog
    if spec in entries:
        what = f"catalog model '{spec}' ({repo_id}" + (f"/{filename})" if filename else ")")
    elif filename:
        what = f"'{spec}' from the Hub"
    else:
        what = f"bundle repository '{spec}' from the Hub"
    return repo_id, filename, revision, what


def _confirm_download(repo_id: str, filename: Optional[str], revision: Optional[str], what: str, args) -> None:
    """If the file (or bundle repo) is not cached yet: show its size and, on a terminal without
    --yes, ask before a large download. Raises CancelledError when the user declines."""
    from . import hub

    size: Optional[int] = None
    if filename is not None:
        if hub.cached_file(repo_id, filename, revision=revision) is not None:
            return
        try:
            size = hub.remote_file_info(repo_id, filename, revision=revision).size
        except SAMMed3DError:
            return  # offline / unreachable / missing: the download step explains (or uses a cache)
    elif hub.cached_file(repo_id, "config.json", revision=revision) is not None:
        return
    size_text = _format_bytes(size)
    if getattr(args, "yes", False) or (size is not None and size < LARGE_DOWNLOAD_BYTES):
        _err(f"downloading {what} ({size_text})")
        return
    if not _stdin_is_terminal():
        _err(f"downloading {what} ({size_text}) without asking: the input is not a terminal "
             "(pass --yes to silence this note)")
        return
    sys.stderr.write(f"{what} is not downloaded yet ({size_text}). Download it now? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise CancelledError(f"download of {what} declined; nothing was downloaded (pass --yes to download "
                             "without asking)")


def _resolve(spec: str, args) -> Path:
    """The local path of a model spec, asking before a large download."""
    from . import hub

    catalog = _catalog(args)
    entries = hub.load_catalog() if catalog is None else catalog
    local = Path(spec).expanduser()
    if spec not in entries and local.exists():
        # Local files go straight to weights.load_model, which also reads .ckpt files and
        # explains a folder without config.json.
        return local.resolve()
    target = _remote_target(spec, catalog)
    if target is not None:
        _confirm_download(*target, args)
    return Path(hub.resolve_model(spec, catalog=catalog))


def _bundle_hub_base(folder: Path) -> Optional[dict]:
    """The Hub pointer of a bundle whose base model lives on the Hub, else None."""
    from . import weights

    config = weights.read_bundle_config(folder)
    return config["base"].get("hub")


def _confirm_bundle_base(folder: Path, args) -> Optional[dict]:
    pointer = _bundle_hub_base(folder)
    if pointer is not None:
        what = f"the base model of bundle {folder.name} ({pointer['repo_id']}/{pointer['filename']})"
        _confirm_download(pointer["repo_id"], pointer["filename"], pointer["revision"], what, args)
    return pointer


# ============================================================================================
# segment
# ============================================================================================
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


def _volume_extent_text(volume) -> str:
    import numpy as np

    n = np.asarray(volume.shape, dtype=float)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    ras = volume.ijk_to_ras(corners)
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("RAS", lo, hi)) + " mm"


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _prompts_in_ras(volume, prompts: List[dict]) -> List[dict]:
    """Prompts as RAS mm, checked against the image (before any model is loaded)."""
    import numpy as np

    shape = np.asarray(volume.shape)
    out = []
    boxes = 0
    for p in prompts:
        option = p["option"]
        if p["kind"] == "box":
            boxes += 1
            if boxes > 1:
                raise SAMMed3DError("give at most one --box (a second box would replace the first)")
            lo = np.minimum(p["values"][:3], p["values"][3:])
            hi = np.maximum(p["values"][:3], p["values"][3:])
            if np.any(hi - lo <= 0):
                raise SAMMed3DError(
                    f"--box {_fmt(p['values'])} has zero extent along {'RAS'[int(np.argmin(hi - lo))]}; give two "
                    "opposite corners that differ in all three coordinates"
                )
            out.append({"type": "box", "ras_min": [float(v) for v in lo], "ras_max": [float(v) for v in hi]})
            continue
        if p["kind"] == "ijk":
            ijk = np.asarray(p["values"], dtype=float)
            if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
                raise SAMMed3DError(
                    f"{option} {_fmt(p['values'])} lies outside the image: voxel indices must lie within "
                    f"0..{shape[0] - 1}, 0..{shape[1] - 1}, 0..{shape[2] - 1} (shape {'x'.join(map(str, shape))})"
                )
            ras = volume.ijk_to_ras(ijk.reshape(1, 3))[0]
        else:
            ras = np.asarray(p["values"], dtype=float)
            ijk = volume.ras_to_ijk(ras.reshape(1, 3))[0]
            if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
                raise SAMMed3DError(
                    f"{option} {_fmt(p['values'])} (RAS mm) lies outside the image, which spans "
                    f"{_volume_extent_text(volume)}; check the signs (RAS, not the LPS of ITK/DICOM: negate "
                    "the first two) or give voxel indices with --point-ijk"
                )
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

    from . import volume_io, weights
    from .device import describe_device, select_device, set_cpu_threads
    from .moe import AUTO, GENERAL
    from .session import Session

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
                model = weights.load_model(model_path, device=device)
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


# ============================================================================================
# Preview PNG
# ============================================================================================
def render_preview(volume, mask, centre_ras, *, ct: bool, prompts: Sequence[dict] = ()):
    """A PIL image with the axial, coronal and sagittal planes through ``centre_ras`` (RAS mm), the
    mask as a semi-transparent overlay with its outline, and a list describing each panel.

    Display convention (3D Slicer's, the radiological one): axial and coronal show the patient's
    right on the viewer's left; axial has anterior up, coronal and sagittal superior up; sagittal
    has anterior on the left. The volume is first brought to the closest RAS axis order (axes
    permuted and flipped only, so an oblique scan is shown along its own axes), and each panel is
    scaled so that one pixel is the same number of millimetres in both directions.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from . import geometry

    P, axes, flips = geometry.canonical_transform(volume.affine, volume.shape)

    def canonical(array):
        a = np.transpose(np.asarray(array), axes)
        for axis in range(3):
            if flips[axis]:
                a = np.flip(a, axis)
        return a

    image = canonical(volume.array)
    labels = canonical(mask).astype(bool)
    affine = volume.affine @ P
    inverse = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = np.asarray(image.shape)
    centre_index = inverse[:3, :3] @ np.asarray(centre_ras, dtype=float) + inverse[:3, 3]
    slice_index = np.clip(np.floor(centre_index + 0.5), 0, shape - 1).astype(int)

    if ct:
        low, high = CT_DISPLAY_WINDOW
    else:
        flat = np.asarray(volume.array).reshape(-1)
        sample = flat[:: max(1, flat.size // 2_000_000)].astype(np.float64)
        low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if not high > low:
        high = low + 1.0

    scale = PREVIEW_LONGEST_MM_PX / float(np.max(shape * spacing))  # pixels per mm
    letters = {2: ("R", "L", "A", "P"), 1: ("R", "L", "S", "I"), 0: ("A", "P", "S", "I")}
    specs = [("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)]  # (name, fixed, col, row)
    font = ImageFont.load_default()
    margin, header = 8, 20

    def to_panel(index, col_axis, row_axis, width, height):
        """Canonical (fractional) index -> panel pixel (x, y); columns and rows run reversed."""
        x = (shape[col_axis] - 0.5 - index[col_axis]) * width / shape[col_axis]
        y = (shape[row_axis] - 0.5 - index[row_axis]) * height / shape[row_axis]
        return x, y

    tiles = []
    for name, fixed, col_axis, row_axis in specs:
        plane = np.take(image, slice_index[fixed], axis=fixed).astype(np.float64)
        plane_mask = np.take(labels, slice_index[fixed], axis=fixed)
        plane = plane.T[::-1, ::-1]  # rows: row_axis high -> low; columns: col_axis high -> low
        plane_mask = plane_mask.T[::-1, ::-1]
        width = max(1, int(round(shape[col_axis] * spacing[col_axis] * scale)))
        height = max(1, int(round(shape[row_axis] * spacing[row_axis] * scale)))
        gray = np.clip((plane - low) / (high - low), 0.0, 1.0) * 255.0
        gray_img = Image.fromarray(np.ascontiguousarray(gray.astype(np.uint8)), mode="L").resize(
            (width, height), Image.BILINEAR)
        mask_img = Image.fromarray(np.ascontiguousarray(plane_mask.astype(np.uint8) * 255), mode="L").resize(
            (width, height), Image.NEAREST)
        rgb = np.repeat(np.asarray(gray_img, dtype=np.float64)[:, :, None], 3, axis=2)
        inside = np.asarray(mask_img) > 127
        colour = np.asarray(OVERLAY_RGB, dtype=np.float64)
        rgb[inside] = (1.0 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colour
        padded = np.pad(inside, 1, mode="constant")
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rgb[inside & ~interior] = colour
        tile = Image.fromarray(np.ascontiguousarray(rgb.round().astype(np.uint8)), mode="RGB")
        draw = ImageDraw.Draw(tile)
        # prompt marks: the centre as a cross, a box as its outline
        cx, cy = to_panel(centre_index, col_axis, row_axis, width, height)
        arm = max(4, min(width, height) // 30)
        draw.line([(cx - arm, cy), (cx + arm, cy)], fill=MARKER_RGB)
        draw.line([(cx, cy - arm), (cx, cy + arm)], fill=MARKER_RGB)
        for p in prompts:
            if p.get("type") == "box":
                corners = np.array([[a, b, c] for a in (p["ras_min"][0], p["ras_max"][0])
                                    for b in (p["ras_min"][1], p["ras_max"][1])
                                    for c in (p["ras_min"][2], p["ras_max"][2])])
                idx = corners @ inverse[:3, :3].T + inverse[:3, 3]
                pts = [to_panel(i, col_axis, row_axis, width, height) for i in idx]
                xs, ys = [q[0] for q in pts], [q[1] for q in pts]
                draw.rectangle([min(xs), min(ys), max(xs), max(ys)], outline=MARKER_RGB)
        left, right, top, bottom = letters[fixed]
        for xy, letter in (((3, height / 2 - 5), left), ((width - 10, height / 2 - 5), right),
                           ((width / 2 - 3, 2), top), ((width / 2 - 3, height - 13), bottom)):
            _outlined_text(draw, xy, letter, font)
        plane_ras = affine[:3, :3] @ slice_index + affine[:3, 3]
        axis_letter = "RAS"[fixed]
        title = f"{name.capitalize()}  {axis_letter} {plane_ras[fixed]:.1f} mm"
        tiles.append((name, tile, title, int(slice_index[fixed]), int(np.count_nonzero(plane_mask))))

    total_width = margin + sum(t[1].width + margin for t in tiles)
    total_height = header + max(t[1].height for t in tiles) + margin
    canvas = Image.new("RGB", (total_width, total_height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    panels = []
    x = margin
    for name, tile, title, index, count in tiles:
        canvas.paste(tile, (x, header))
        draw.text((x, 4), title, fill=(255, 255, 255), font=font)
        panels.append({"name": name, "box": [x, header, x + tile.width, header + tile.height],
                       "slice_index": index, "mask_pixels_in_slice": count, "mm_per_pixel": round(1.0 / scale, 6)})
        x += tile.width + margin
    return canvas, panels


def _outlined_text(draw, xy, text: str, font) -> None:
    """Yellow text with a dark outline, readable on bright and dark image parts alike."""
    try:
        draw.text(xy, text, fill=LETTER_RGB, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    except (TypeError, ValueError):  # bitmap fonts without stroke support
        draw.text(xy, text, fill=LETTER_RGB, font=font)


def write_preview(path: Path, volume, mask, centre_ras, *, ct: bool, prompts: Sequence[dict] = ()) -> dict:
    """Render the preview and write it as a PNG (atomically); returns {path, size, panels}."""
    canvas, panels = render_preview(volume, mask, centre_ras, ct=ct, prompts=prompts)
    tmp = _temporary_sibling(path, ".png")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise SAMMed3DError(f"could not write the preview {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": os.path.abspath(path), "size": [canvas.width, canvas.height], "panels": panels}


# ============================================================================================
# download, convert
# ============================================================================================
def cmd_demo(args) -> int:
    """``demo``: one click at an organ's centre on the example CT, then Dice against its label."""
    import numpy as np

    from . import volume_io
    from .model import build_sam_med3d
    from .moe import SamMed3DMoE

    data = args.data.expanduser()
    image, labels, names = (data / "example_ct_sm.nii.gz", data / "example_seg.nii.gz",
                            data / "example_seg_labels.json")
    for path in (image, labels, names):
        if not path.exists():
            raise SAMMed3DError(f"the example data file {path} was not found; pass --data with the folder "
                                "that holds example_ct_sm.nii.gz, example_seg.nii.gz and example_seg_labels.json")
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
    status = cmd_segment(build_parser().parse_args(argv), model=model)
    import SimpleITK as sitk

    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))).transpose(2, 1, 0) > 0  # [k,j,i] -> [i,j,k]
    dice = 2.0 * np.count_nonzero(predicted & reference) / max(1, predicted.sum() + reference.sum())
    _err(f"Dice against the reference {args.target} label: {dice:.3f}"
         + (" (untrained weights: expected to be low)" if args.model is None else ""))
    return status


def cmd_download(args) -> int:
    from . import hub

    spec = str(args.model).strip()
    path = _resolve(spec, args)
    if path.is_dir():
        pointer = _confirm_bundle_base(path, args)
        if pointer is not None:  # fetch the base too, so the bundle works offline
            hub.download_file(pointer["repo_id"], pointer["filename"], revision=pointer["revision"],
                              sha256=pointer["sha256"])
    _out(str(path))
    return EXIT_OK


def cmd_convert(args) -> int:
    from . import weights

    spec = str(args.checkpoint).strip()
    source = Path(spec).expanduser()
    if not source.exists():
        source = _resolve(spec, args)
    if source.is_dir():
        raise SAMMed3DError(f"{source} is a folder (a bundle?); convert takes a checkpoint file (.pth/.pt/.ckpt)")
    stages = _Stages(total=1)
    try:
        with stages.step("converting", "convert"):
            folder = weights.convert_checkpoint(source, args.bundle, overwrite=args.overwrite)
    finally:
        stages.close()
    _err(f"converted {source.name} into a bundle (base model only) in {stages.timings_ms['convert'] / 1e3:.1f} s")
    _out(str(folder))
    return EXIT_OK


# ============================================================================================
# info
# ============================================================================================
def _meta_parameter_count(module_factory) -> int:
    import torch

    with torch.device("meta"):
        module = module_factory()
    return int(sum(p.numel() for p in module.parameters()))


def _architecture(model_config: dict) -> Tuple[str, bool]:
    from .model import VIT_B_ORI

    diffs = {k: model_config[k] for k in VIT_B_ORI if _as_tuple(model_config.get(k)) != _as_tuple(VIT_B_ORI[k])}
    if not diffs:
        return "SAM-Med3D ViT-B 'ori' (the official size)", True
    shown = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in diffs.items())
    return f"SAM-Med3D of a custom size ({shown})", False


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _catalog_matches(sha256: str, filename: str, catalog: Optional[dict]) -> Tuple[Optional[str], Optional[str]]:
    """(catalog name whose checksum matches, catalog name with the same file name but another checksum)."""
    from . import hub

    entries = hub.load_catalog() if catalog is None else catalog
    match = next((e.name for e in entries.values() if e.sha256 == sha256), None)
    other = next((e.name for e in entries.values() if e.filename and Path(e.filename).name == filename
                  and e.sha256 and e.sha256 != sha256), None)
    return match, other


def _bundle_info(folder: Path) -> dict:
    from . import hub, weights
    from .model import build_mask_decoder, build_sam_med3d
    from .moe import GatingNetwork

    config = weights.read_bundle_config(folder)
    model_config = dict(config["base"]["model_config"])
    box_prompts = bool(model_config.pop("box_prompts"))
    architecture, official = _architecture(model_config)
    files = []

    def check(rel: str, expected: str, what: str) -> bool:
        actual = weights.file_sha256(folder.joinpath(*rel.split("/")))
        files.append({"file": rel, "what": what, "sha256": actual, "expected_sha256": expected,
                      "verified": actual == expected})
        return actual == expected

    base_entry: Dict[str, Any]
    if "file" in config["base"]:
        check(config["base"]["file"], config["base"]["sha256"], "base model")
        base_entry = {"file": config["base"]["file"]}
    else:
        pointer = config["base"]["hub"]
        cached = hub.cached_file(pointer["repo_id"], pointer["filename"], revision=pointer["revision"])
        base_entry = {"hub": pointer, "cached_path": str(cached) if cached else None}
        if cached is not None and pointer["sha256"]:
            actual = weights.file_sha256(cached)
            files.append({"file": f"{pointer['repo_id']}/{pointer['filename']}", "what": "base model (Hub)",
                          "sha256": actual, "expected_sha256": pointer["sha256"],
                          "verified": actual == pointer["sha256"]})
    base_params = _meta_parameter_count(lambda: build_sam_med3d(box_prompts=box_prompts, **model_config))
    decoder_params = _meta_parameter_count(lambda: build_mask_decoder(config["base"]["model_config"]))
    experts = []
    for e in config["experts"]:
        ok = check(e["file"], e["sha256"], f"expert '{e['name']}'")
        experts.append({"name": e["name"], "targets": e["targets"], "modality": e["modality"],
                        "description": e["description"], "file": e["file"], "parameters": decoder_params,
                        "sha256_verified": ok})
    gate = None
    gate_params = 0
    if config["gate"] is not None:
        ok = check(config["gate"]["file"], config["gate"]["sha256"], "gate")
        gate_params = _meta_parameter_count(lambda: GatingNetwork(**config["gate"]["config"]))
        gate = {"config": config["gate"]["config"], "file": config["gate"]["file"], "parameters": gate_params,
                "sha256_verified": ok}
    verified = all(f["verified"] for f in files) if files else None
    return {
        "kind": "bundle",
        "path": str(folder),
        "format_version": config["format_version"],
        "architecture": architecture,
        "official_architecture": official,
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_config.items()},
        "box_prompts": box_prompts,
        "base": base_entry,
        "parameters": {"base": base_params, "experts": decoder_params * len(experts), "gate": gate_params,
                       "total": base_params + decoder_params * len(experts) + gate_params},
        "experts": experts,
        "gate": gate,
        "tau": config["tau"],
        "selector": config["selector"],
        "preprocessing": config["preprocessing"],
        "files": files,
        "sha256_verified": verified,
        "sha256_note": ("every file matches the SHA-256 recorded in config.json" if verified
                        else "NOT verified: at least one file differs from config.json" if verified is False
                        else "nothing to verify locally (the base is on the Hub and not downloaded yet)"),
    }


def _checkpoint_info(path: Path, catalog: Optional[dict]) -> dict:
    import torch

    from . import weights
    from .model import build_sam_med3d

    stages = _Stages(total=2)
    try:
        with stages.step("reading the checkpoint", "read"):
            state = weights.load_state_dict_file(path)
        with stages.step("computing the SHA-256", "sha256"):
            sha = weights.file_sha256(path)
    finally:
        stages.close()
    box_prompts = weights.BOX_KEY in state
    with torch.device("meta"):
        official_model = build_sam_med3d(box_prompts=box_prompts)
    reference = official_model.state_dict()
    buffers = {name for name, _ in official_model.named_buffers()}
    # Learnable parameters: every stored tensor except the fixed buffers (the prompt encoder's
    # random Fourier-feature matrix), as model.parameters() would count them.
    parameters = int(sum(t.numel() for k, t in state.items() if k not in buffers))
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    mismatched = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    official = not (missing or unexpected or mismatched)
    if official:
        architecture = "SAM-Med3D ViT-B 'ori' (the official size)"
        problem = None
    else:
        problem = (f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mis-shaped "
                   "tensor(s) compared with the official architecture")
        pos = state.get("image_encoder.pos_embed")
        if not any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in state):
            architecture = "not SAM-Med3D (another architecture)"
        elif pos is not None and pos.dim() == 4:
            architecture = "a 2D SAM checkpoint (SAM, MedSAM or SAM-Med2D), not SAM-Med3D"
        elif pos is not None and tuple(pos.shape) != tuple(reference["image_encoder.pos_embed"].shape):
            architecture = f"SAM-Med3D of another size (position embedding {list(pos.shape)})"
        else:
            architecture = "SAM-Med3D-like, but not the official architecture"
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    match, other = _catalog_matches(sha, path.name, catalog)
    if match:
        note = f"matches the published checksum of catalog model '{match}'"
    elif other:
        note = (f"DIFFERS from the published checksum of catalog model '{other}' (same file name): not the "
                "published file")
    else:
        note = "no published checksum known for this file: not verified"
    return {
        "kind": "checkpoint",
        "path": str(path),
        "file_size": path.stat().st_size,
        "architecture": architecture,
        "official_architecture": official,
        "loadable": official,
        "problem": problem,
        "box_prompts": box_prompts,
        "tensors": len(state),
        "dtypes": dtypes,
        "parameters": {"base": parameters, "experts": 0, "gate": 0, "total": parameters},
        "experts": [],
        "gate": None,
        "tau": None,
        "selector": None,
        "preprocessing": dict(weights.DEFAULT_PREPROCESSING),
        "sha256": sha,
        "sha256_verified": bool(match),
        "sha256_note": note,
        "catalog_match": match,
    }


def cmd_info(args) -> int:
    spec = str(args.model).strip()
    local = Path(spec).expanduser()
    if local.is_file() and local.name == "config.json":
        local = local.parent
    path = local.resolve() if local.exists() else _resolve(spec, args)
    if path.is_dir():
        info = _bundle_info(path)
    else:
        from .weights import CHECKPOINT_SUFFIXES

        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise SAMMed3DError(f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a bundle folder")
        info = _checkpoint_info(path, _catalog(args))
    if args.json:
        _out(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return EXIT_OK


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _print_info(info: dict) -> None:
    if info["kind"] == "bundle":
        _out(f"Bundle {info['path']} (format version {info['format_version']})")
    else:
        _out(f"Checkpoint {info['path']} ({_format_bytes(info['file_size'])}, {info['tensors']} tensors, "
             f"{'/'.join(info['dtypes'])})")
    _out(f"  Architecture: {info['architecture']}")
    if info.get("problem"):
        _out(f"  Cannot be loaded as SAM-Med3D: {info['problem']}")
    _out(f"  Box prompts: {'yes' if info['box_prompts'] else 'no'}")
    p = info["parameters"]
    parts = f"base {_millions(p['base'])}"
    if p["experts"]:
        parts += f", experts {_millions(p['experts'])}"
    if p["gate"]:
        parts += f", gate {_millions(p['gate'])}"
    _out(f"  Parameters: {p['total']:,} ({parts})")
    if info["kind"] == "bundle":
        base = info["base"]
        if "hub" in base:
            h = base["hub"]
            _out(f"  Base model: on the Hub, {h['repo_id']}/{h['filename']} "
                 f"({'cached' if base['cached_path'] else 'not downloaded yet'})")
        if info["experts"]:
            _out(f"  Experts ({len(info['experts'])}):")
            for e in info["experts"]:
                targets = ", ".join(e["targets"]) or "-"
                extra = f"; {e['description']}" if e["description"] else ""
                _out(f"    {e['name']}: targets {targets}; modality {e['modality']}{extra}")
        else:
            _out("  Experts: none (the general model only)")
        if info["gate"] is not None:
            cfg = ", ".join(f"{k} {v}" for k, v in info["gate"]["config"].items())
            _out(f"  Gate: yes ({cfg})")
            _out(f"  Selector: {info['selector']}, tau {info['tau']:g}")
        else:
            _out(f"  Gate: none (selector {info['selector']} and tau {info['tau']:g} are unused)")
    pre = info["preprocessing"]
    _out(f"  Preprocessing: spacing {pre.get('spacing_mm')} mm, window {pre.get('window')}, CT clamp "
         f"{pre.get('ct_clamp')}, normalisation {pre.get('normalization')}")
    if info["kind"] == "checkpoint":
        _out(f"  SHA-256: {info['sha256']} ({info['sha256_note']})")
    else:
        _out(f"  SHA-256: {info['sha256_note']}")
        for f in info["files"]:
            if not f["verified"]:
                _out(f"    {f['file']}: {f['sha256']} but config.json records {f['expected_sha256']}")


# ============================================================================================
# catalog
# ============================================================================================
def cmd_catalog(args) -> int:
    from . import hub

    catalog = _catalog(args)
    entries = hub.load_catalog() if catalog is None else catalog
    rows = []
    for e in entries.values():
        cached = None
        if e.filename:
            cached = hub.cached_file(e.repo_id, e.filename, revision=e.revision) is not None
        rows.append({"name": e.name, "kind": e.kind, "repo_id": e.repo_id, "filename": e.filename,
                     "revision": e.revision, "size_mb": e.size_mb, "box_prompts": e.box_prompts,
                     "sha256": e.sha256, "cached": cached, "description": e.description})
    if args.json:
        _out(json.dumps({"models": rows}, indent=2))
        return EXIT_OK
    width = max([len(r["name"]) for r in rows] + [4])
    _out(f"{'NAME':<{width}}  {'SIZE':>9}  {'BOX':<3}  {'CACHED':<6}  SOURCE")
    for r in rows:
        size = f"{r['size_mb']:g} MB" if r["size_mb"] is not None else "unknown"
        cached = "yes" if r["cached"] else ("no" if r["cached"] is False else "?")
        source = r["repo_id"] + (f"/{r['filename']}" if r["filename"] else " (bundle)")
        _out(f"{r['name']:<{width}}  {size:>9}  {'yes' if r['box_prompts'] else 'no':<3}  {cached:<6}  {source}")
        if r["description"]:
            _out(f"{'':<{width}}  {r['description']}")
    return EXIT_OK


# ============================================================================================
# main
# ============================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(_glue_negative_values(argv))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    except _UsageError as exc:
        _err(f"error: {_one_line(exc)}")
        return EXIT_BAD_INPUT
    debug = debug or bool(getattr(args, "debug", False))
    with _console(debug):
        try:
            return int(args.func(args) or EXIT_OK)
        except CancelledError as exc:
            _err(f"cancelled: {_one_line(exc)}")
            return EXIT_INTERRUPTED
        except SAMMed3DError as exc:
            if debug:
                import traceback

                traceback.print_exc(file=sys.stderr)
            _err(f"error: {_one_line(exc)}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if debug:
                raise
            _err(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)")
            return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
