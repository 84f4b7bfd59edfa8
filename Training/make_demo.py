"""Build the packaged demo model (``SAMMed3DMoELib/models/demo``) from the sample scans with the
project's own scripts, stage by stage, seeded, and time each stage.

    python -m Training.make_demo --threads 2                  # everything (see Training/README.md for times)
    python -m Training.make_demo --threads 2 --stages evaluate  # one stage again
    python -m Training.make_demo --quick --work /tmp/demo     # a few steps of every stage (CI)

Each stage is one of the commands in Training/README.md ("The demo model") with its config file
``Training/configs/demo_*.json``: the sample scans as nnU-Net datasets; a general model on the
CT's "original" classes; the same model fine-tuned with its clicks marked in the mask prompt
and targets drawn among the classes a window shows (so that it follows the click); the same
recipe trained longer in batches of 18 (``general_long``, then ``general_polish``: 8 minutes on
one GPU, hours on a CPU); an expert for held-out CT classes and one for the MR scan; the gate and
τ (chosen on the CT slab); the bundle written in float16 into the package; the forgetting
baseline (the general model fine-tuned on the new classes); the evaluation (Table 1 of the
paper in miniature, τ and selector ablations, Dice-vs-clicks plots) of the packaged bundle.
Paths in the configs are relative to ``--work`` (default: the current folder, the repository
root). A stage starts over: its run folder is removed first. Wall times go to
``runs/demo/timings.json``.

It is a demonstration trained on one patient's scans (labels by TotalSegmentator), not a
clinical model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from SAMMed3DMoELib.errors import SAMMed3DError

from .config import parse_args, run_script

CONFIGS = Path(__file__).resolve().parent / "configs"
PACKAGE = Path("SAMMed3DMoELib") / "models" / "demo"
BUNDLE = Path("bundles") / "demo"
GENERAL = Path("bundles") / "demo-general"
CLICKS = Path("bundles") / "demo-clicks"
LONG = Path("bundles") / "demo-long"
STAGES = ("convert", "general", "general_clicks", "general_long", "general_polish", "expert_weak", "expert_mr", "gate",
          "package", "finetuned", "evaluate")

QUICK = {
    # A few steps of the same commands with the 32³ test model: proves the chain, not the model.
    "general": ["--steps", "2", "--model-size", "tiny", "--batch-size", "2", "--iterations", "2", "--val-every", "0",
                "--num-workers", "0"],
    "general_clicks": ["--steps", "2", "--batch-size", "2", "--iterations", "2", "--val-every", "0", "--num-workers", "0"],
    "general_long": ["--steps", "2", "--batch-size", "2", "--iterations", "2", "--num-workers", "0"],
    "general_polish": ["--steps", "2", "--schedule-steps", "3", "--batch-size", "2", "--iterations", "2",
                       "--num-workers", "0"],
    "expert_weak": ["--steps", "2", "--crops-per-item", "1", "--iterations", "2", "--num-workers", "0"],
    "expert_mr": ["--steps", "2", "--crops-per-item", "1", "--iterations", "2", "--num-workers", "0"],
    "gate": ["--steps", "2", "--crops-per-item", "1", "--iterations", "2", "--taus", "0.5,0.7", "--tau-clicks", "1",
             "--num-workers", "0"],
    "finetuned": ["--steps", "2", "--iterations", "2", "--num-workers", "0"],
    "evaluate": ["--classes", "spleen,aorta,liver", "--clicks", "1", "--max-windows", "1"],
}

TRAINING_STAGES = ("general", "general_clicks", "general_long", "general_polish", "expert_weak", "expert_mr", "gate",
                   "finetuned")
GENERAL_STAGE_CONFIGS = {"general": "demo_general.json", "general_clicks": "demo_general_clicks.json",
                         "general_long": "demo_general_long.json", "general_polish": "demo_general_polish.json"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.make_demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON/YAML file with defaults for any option below")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in this order: "
                   + ", ".join(STAGES))
    p.add_argument("--work", type=Path, default=Path("."),
                   help="folder the configs' relative paths (data/, runs/, bundles/, the package and the results) "
                        "are taken from")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch in every stage")
    p.add_argument("--device", default=None, help="auto, cpu or cuda for every stage (default: each config's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache for every training stage")
    p.add_argument("--quick", action="store_true",
                   help="2 steps of every training stage with the tiny test model, 3 classes and 1 click in the "
                        "evaluation (CI); never write this into the package")
    return p


def _config(name: str) -> str:
    return str(CONFIGS / name)


def stage_commands(stage: str) -> List[Tuple[Callable[[Optional[Sequence[str]]], int], List[str]]]:
    """The (script main, argv) pairs of a stage, before the run-wide options are added."""
    from . import convert_samples, evaluate, finetune_expert, pretrain, train_gate

    if stage == "convert":
        return [(convert_samples.main, ["--out", "data"])]
    if stage in GENERAL_STAGE_CONFIGS:
        return [(pretrain.main, ["--config", _config(GENERAL_STAGE_CONFIGS[stage])])]
    if stage in ("expert_weak", "expert_mr"):
        name = stage.split("_")[1]
        return [(finetune_expert.main, ["--config", _config(f"demo_expert_{name}.json"),
                                        "--experts", _config("demo_experts.json")])]
    if stage == "gate":
        return [(train_gate.main, ["--config", _config("demo_gate.json")])]
    if stage == "finetuned":
        return [(pretrain.main, ["--config", _config("demo_finetuned.json")])]
    if stage == "evaluate":
        return [(evaluate.main, ["--config", _config("demo_eval_train.json")]),
                (evaluate.main, ["--config", _config("demo_eval_slab.json")])]
    raise SAMMed3DError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")


def package(source: Path = BUNDLE, target: Path = PACKAGE) -> Path:
    """The trained bundle in float16 (half the size; loading converts back to float32) in the
    package, with how each part was made (``training/*.json``) and a model card (README.md)."""
    from SAMMed3DMoELib import bundle

    moe = bundle.load_bundle(source, device="cpu")
    if moe.gate is None or not moe.expert_names:
        raise SAMMed3DError(f"{source} has no gate or no experts yet: run the stages before 'package'")
    if target.exists():
        shutil.rmtree(target)
    bundle.save_bundle(moe, target, preprocessing=moe.preprocessing, dtype="float16")
    (target / "training").mkdir()
    made = {path.name: path for path in sorted((source / "training").glob("*.json"))}
    for name, earlier in (("general", GENERAL), ("general_clicks", CLICKS), ("general_long", LONG)):
        if (earlier / "training" / "pretrain.json").exists():  # the general model's earlier stages
            made[f"{name}.json"] = earlier / "training" / "pretrain.json"
    for name, path in made.items():
        (target / "training" / name).write_text(_portable(path.read_text(encoding="utf-8")), encoding="utf-8")
    card = (CONFIGS / "demo_model_card.md").read_text(encoding="utf-8")
    (target / "README.md").write_text(card, encoding="utf-8")
    return target


def _portable(provenance: str) -> str:
    """A provenance record without this machine's paths (it is committed): paths under the
    working folder or the repository (the config files) become relative, the preprocessing
    cache (a local detail) is dropped."""
    record = json.loads(provenance)
    record.pop("cache_dir", None)
    text = json.dumps(record, indent=1) + "\n"
    for folder in (Path.cwd(), CONFIGS.parents[1]):
        text = text.replace(json.dumps(str(folder) + os.sep)[1:-1], "")
    return text


def _clean(stage: str) -> None:
    """Remove what a stage writes, so it starts over (no resume from an older run)."""
    folders = {"general": ["runs/demo-general", str(GENERAL)],
               "general_clicks": ["runs/demo-general-clicks", str(CLICKS)],
               "general_long": ["runs/demo-general-long", str(LONG)],
               "general_polish": ["runs/demo-general-polish", str(BUNDLE)], "expert_weak": ["runs/demo-weak"],
               "expert_mr": ["runs/demo-mr"], "gate": ["runs/demo-gate"],
               "finetuned": ["runs/demo-finetuned", "bundles/demo-finetuned"]}
    for folder in folders.get(stage, []):
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _inside(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    stages = [s.strip() for s in str(args.stages).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SAMMed3DError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    timings: Dict[str, float] = {}
    with _inside(Path(args.work).expanduser()):
        timings_path = Path("runs/demo/timings.json")
        if timings_path.exists():
            timings.update(json.loads(timings_path.read_text()).get("seconds", {}))
        for stage in stages:
            start = time.perf_counter()
            print(f"make_demo: stage {stage}", flush=True)
            _clean(stage)
            if stage == "package":
                package()
            for script, stage_argv in ([] if stage == "package" else stage_commands(stage)):
                extra = list(QUICK.get(stage, [])) if args.quick else []
                if stage != "convert":
                    extra += ["--threads", str(args.threads)] if args.threads else []
                    extra += ["--device", args.device] if args.device else []
                if stage in TRAINING_STAGES and args.cache_dir is not None:
                    extra += ["--cache-dir", str(args.cache_dir)]
                status = script(stage_argv + extra)
                if status:
                    raise SAMMed3DError(f"stage {stage} failed (exit status {status})")
            timings[stage] = round(time.perf_counter() - start, 1)
            print(f"make_demo: stage {stage} took {timings[stage]:.0f} s", flush=True)
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps({"seconds": timings, "threads": args.threads, "quick": args.quick},
                                               indent=1) + "\n")
    print("make_demo: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)
