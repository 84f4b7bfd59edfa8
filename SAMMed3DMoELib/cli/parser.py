"""The command line's arguments: one parser, coordinates parsed and checked as they are read."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import List, Sequence, Tuple

from .. import __version__
from ..errors import SAMMed3DError
from ..sample_data import SAMPLE_DATA_DIR
from . import evaluate as eval_command
from .demo import cmd_demo
from .models import cmd_catalog, cmd_convert, cmd_download, cmd_info
from .segment import cmd_segment

PROG = "sammed3d-moe"

EXIT_STATUS_HELP = """exit status (one line on stderr; the traceback only with --debug):
  0    success
  1    unexpected failure (a bug: run again with --debug and report the traceback)
  2    bad input: a file, an argument, a prompt or a model that cannot be used,
       or a checkpoint that carries code
  3    a download failed or was refused: no network, offline mode (HF_HUB_OFFLINE),
       not on the Hub, access refused, checksum mismatch
  4    out of memory (GPU or CPU)
  5    declined: the user answered no when asked before a download
  130  interrupted (Ctrl-C) or cancelled"""

_COORDINATE_OPTIONS = ("--point", "--negative", "--point-ijk", "--negative-ijk", "--box")
_NUMBER_SPLIT = re.compile(r"[,;\s]+")


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
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="segment an organ of the example CT with simulated clicks and compare with its reference label",
        description="Simulated clicks on an organ of the TotalSegmentator example CT (Resources/SampleData): the "
                    "first at the organ's most interior voxel, each later one at the most interior voxel of the "
                    "largest error (positive on a miss, negative on a spill), as a user would click. Segmented "
                    "with --model (default: 'demo', the small demonstration model shipped in the package, which "
                    "works offline; it was trained on this patient's scans and is not a clinical model); writes "
                    "the mask and a preview to --out and prints Dice against the reference label after each click.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                      help="folder for the mask and the preview (default: demo-output)")
    demo.add_argument("--data", type=Path, default=SAMPLE_DATA_DIR, metavar="DIR",
                      help="the example data folder (default: the repository's Resources/SampleData/totalsegmentator-example)")
    demo.add_argument("--model", "-m", default=None, metavar="M",
                      help="weights to use: catalog name, Hub repo, .pth or bundle (default: demo, the packaged "
                           "demonstration model trained on one patient's scans; not a clinical model)")
    demo.add_argument("--target", default="spleen",
                      help="organ name from example_ct_seg_labels.json (default: spleen)")
    demo.add_argument("--clicks", type=_positive_int, default=3, metavar="N", help="simulated clicks (default: 3)")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    demo.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for PyTorch")
    demo.add_argument("--json", action="store_true", help="print a machine-readable summary (JSON) on stdout")
    demo.set_defaults(func=cmd_demo)
    # ---------------------------------------------------------------- eval
    eval_command.register(sub, parents=[common, catalog_opt, consent])

    return parser

