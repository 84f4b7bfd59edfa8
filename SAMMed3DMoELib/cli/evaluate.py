"""``eval``: the paper's evaluation protocol on datasets in the nnU-Net layout (see
:mod:`SAMMed3DMoELib.evaluation`); also the engine of ``python -m Training.evaluate``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import SAMMed3DError
from .console import EXIT_OK, _err, _out


def _csv(text, cast=str) -> list:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [cast(v) for v in text]
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]


def add_eval_arguments(parser) -> None:
    parser.add_argument("-m", "--model", required=True, metavar="M",
                        help="bundle folder, checkpoint, catalog name or Hub repo to evaluate")
    parser.add_argument("--data", nargs="+", required=True, metavar="DATASET",
                        help="dataset folders in the nnU-Net layout (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for results.json, forgetting.json/.md and dice_vs_clicks.png")
    parser.add_argument("--classes", default=None, help="comma-separated class names to evaluate (default: all)")
    parser.add_argument("--exclude-classes", default=None, help="comma-separated class names to skip")
    parser.add_argument("--clicks", default="1,3,5,10", help="click counts to report (default 1,3,5,10)")
    parser.add_argument("--no-box", dest="box", action="store_false", help="skip the box prompt")
    parser.add_argument("--no-experts", dest="experts", action="store_false",
                        help="skip the rows of each expert alone")
    parser.add_argument("--taus", default=None, help="extra mixture rows at these τ values (ablation), e.g. 0.5,0.7")
    parser.add_argument("--selectors", default=None,
                        help="extra mixture rows with these selectors (paper, average, renormalized)")
    parser.add_argument("--extra-model", nargs="+", default=[], metavar="LABEL=PATH",
                        help="more models to compare, e.g. finetuned=bundles/finetuned (their general decoder)")
    parser.add_argument("--groups", type=Path, default=None,
                        help="JSON list of class groups [{\"name\", \"classes\"?, \"modality\"?, \"datasets\"?, "
                             "\"rest\"?}] (default: one 'new' group per expert, 'original' for the rest)")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--min-voxels", type=int, default=1, help="skip classes with fewer reference voxels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated clicks")
    parser.add_argument("--max-windows", type=int, default=8, help="windows a session may follow an object across")
    parser.add_argument("--title", default="Evaluation", help="title of forgetting.md")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for PyTorch")


def _load(spec: str, args, device):
    from ..bundle import load_model
    from .models import _confirm_bundle_base, _resolve

    path = _resolve(spec, args)
    if path.is_dir():
        _confirm_bundle_base(path, args)
    return load_model(path, device=device)


def run_evaluation(args, shard: Tuple[int, int] = (0, 1),
                   gather: Optional[Callable[[List[dict]], List[dict]]] = None, log: Callable[[str], None] = _err):
    """Evaluate as the options say; with ``shard=(rank, world)`` this process takes every
    world-th (case, class) pair and ``gather`` collects all records (on every rank). Returns
    ``(records, paths of the report)``; the report is written when ``shard[0] == 0``."""
    from .. import evaluation
    from ..device import select_device, set_cpu_threads

    device = select_device(args.device)
    set_cpu_threads(args.threads)
    clicks = _csv(args.clicks, int)
    model = _load(args.model, args, device)
    variants = evaluation.model_variants(model, experts=args.experts, taus=_csv(args.taus, float),
                                         selectors=_csv(args.selectors))
    for spec in args.extra_model or []:
        label, sep, path = str(spec).partition("=")
        if not sep or not label or not path:
            raise SAMMed3DError(f"--extra-model {spec!r}: write LABEL=PATH, e.g. finetuned=bundles/finetuned")
        variants += evaluation.model_variants(_load(path, args, device), name=label, experts=False, mixture=False)
    if args.groups is not None:
        try:
            groups = json.loads(Path(args.groups).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SAMMed3DError(f"--groups {args.groups}: {exc}") from None
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "name" in g for g in groups):
            raise SAMMed3DError(f"--groups {args.groups}: expected a JSON list of objects with a 'name'")
    else:
        groups = evaluation.default_groups(model)
    wanted, skipped = set(_csv(args.classes)), set(_csv(args.exclude_classes))
    rank, world = shard
    records: List[dict] = []
    unit = 0
    start = time.perf_counter()
    for folder in args.data:
        dataset = evaluation.read_dataset(folder)
        for case in dataset.cases:
            classes = {}
            for label_id, name in sorted(dataset.labels.items()):
                if (wanted and name not in wanted) or name in skipped:
                    continue
                if unit % world == rank:
                    classes[label_id] = name
                unit += 1
            if not classes:
                continue
            image, label = evaluation.load_case(case)
            found = evaluation.evaluate_case(
                image, label, classes, variants, dataset=dataset.name, case=case.case_id, modality=dataset.modality,
                clicks=clicks, box=args.box, seed=args.seed, tolerance_mm=args.tolerance_mm,
                max_windows=args.max_windows, device=device, min_voxels=args.min_voxels)
            records += found
            log(f"evaluated {dataset.name}/{case.case_id}: {len({r['class'] for r in found})} classes x "
                f"{len(variants)} variants ({time.perf_counter() - start:.0f} s)")
    if gather is not None:
        records = gather(records)
    paths = {}
    if rank == 0:
        notes = [f"model: {args.model}; datasets: {', '.join(str(d) for d in args.data)}; seed {args.seed}; "
                 f"clicks {clicks}{' + box' if args.box else ''}; NSD tolerance {args.tolerance_mm:g} mm"]
        paths = evaluation.write_report(records, args.out, groups, title=args.title, notes=notes,
                                        tolerance_mm=args.tolerance_mm)
    return records, paths


def cmd_eval(args) -> int:
    """``eval``: run the protocol and write the report."""
    records, paths = run_evaluation(args)
    _out(f"Wrote {len(records)} results: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def register(sub, parents: Sequence) -> None:
    """Add the ``eval`` subcommand to the command line's subparsers."""
    ev = sub.add_parser(
        "eval", parents=list(parents), allow_abbrev=False,
        help="evaluate a model with simulated clicks and a box (Dice, NSD, forgetting table)",
        description="The SAM-Med3D-MoE evaluation protocol: for each labelled class, 1/3/5/10 simulated clicks "
                    "(first uniform in the reference, then uniform in the error region) and a box, through the "
                    "interactive session; Dice and NSD per class, per dataset and per class group; the forgetting "
                    "table (general model, each expert alone, the mixture) as JSON and Markdown; a Dice-vs-clicks plot.",
        epilog="Example: sammed3d-moe eval --model bundles/demo --data data/Dataset501_ExampleCT --out eval/",
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
