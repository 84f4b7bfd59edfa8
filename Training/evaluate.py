"""Evaluate models with the paper's protocol (``sammed3d-moe eval`` with a config file and
torchrun): 1/3/5/10 simulated clicks and a box per class, Dice and NSD, the forgetting table
and a Dice-vs-clicks plot. Under ``torchrun`` the (case, class) pairs are shared among the ranks
and rank 0 writes the report.

    python -m Training.evaluate --model bundles/demo --data data/Dataset501_ExampleCT --out eval/demo
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from SAMMed3DMoELib.cli.evaluate import add_eval_arguments, run_evaluation

from .config import parse_args, run_script
from .distributed import all_gather_objects, init_distributed, shutdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON/YAML file with defaults for any option below")
    add_eval_arguments(p)
    p.set_defaults(catalog=None)
    p.add_argument("--yes", action="store_true", help="download a remote model without asking")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    ctx = init_distributed(args.device)
    try:
        if ctx.distributed:
            args.device = str(ctx.device)
        gather = (lambda records: [r for part in all_gather_objects(ctx, records) for r in part]) if ctx.distributed else None
        records, paths = run_evaluation(args, shard=(ctx.rank, ctx.world_size), gather=gather)
        if ctx.is_main:
            print(f"evaluate: {len(records)} results -> " + ", ".join(str(p) for p in paths.values()), flush=True)
        return 0
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    run_script(main)
