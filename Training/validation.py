"""Prompting options shared by the scripts, and validation sharded over the ranks."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from SAMMed3DMoELib.errors import SAMMed3DError

from .data import CropDataset
from .distributed import DistContext, all_reduce_sum


def add_prompt_arguments(parser, *, iterations: int = 11, gate: bool = False) -> None:
    """``--iterations``, ``--box-prob`` and ``--val-clicks``; for the decoders also
    ``--mask-only-iterations`` (the gate scores prompts: each of its iterations has one)."""
    g = parser.add_argument_group("prompting (official recipe: 11 iterations, 2 of them mask-only)")
    g.add_argument("--iterations", type=int, default=iterations, help="prompt iterations per sample")
    if not gate:
        g.add_argument("--mask-only-iterations", type=int, default=2,
                       help="iterations without a click (the last, then random ones from 2..n-2)")
    g.add_argument("--box-prob", type=float, default=0.0,
                   help="probability that a step prompts with a box around the target (needs box prompts): the "
                        "box alone first, then the box with each click")
    g.add_argument("--val-clicks", type=int, default=3 if gate else 5,
                   help="validation score: mean Dice over clicks 1..N")


def require_box_prompts(box_prob: float, base) -> None:
    """Refuse ``--box-prob`` > 0 for a bundle whose base model (``SamMed3D``) has no box prompts."""
    if box_prob > 0 and not base.box_prompts:
        raise SAMMed3DError("--box-prob needs a base model with box prompts; this bundle's has none")


@torch.no_grad()
def validation_score(data: CropDataset, run_batch: Callable[[Dict[str, torch.Tensor]], List[List[float]]],
                     ctx: DistContext, batch_size: int, group_by: Optional[str] = None, groups: int = 1) -> float:
    """Mean of the per-click Dice values ``run_batch(batch) -> [click][sample]`` over the
    validation samples, each rank taking every world_size-th sample. With ``group_by`` (a batch
    key holding an integer in 0..groups-1, e.g. "expert") the mean is taken per group first and
    the score is the mean over the groups that occur, so that a small group counts as much as a
    large one."""
    shard = Subset(data, list(range(ctx.rank, len(data), ctx.world_size)))
    totals, counts = [0.0] * groups, [0.0] * groups
    for batch in DataLoader(shard, batch_size=max(1, batch_size), num_workers=0):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        keys = batch[group_by].tolist() if group_by else [0] * batch["image"].shape[0]
        for per_click in run_batch(batch):
            for key, dice in zip(keys, per_click):
                totals[key] += dice
                counts[key] += 1
    reduced = all_reduce_sum(ctx, totals + counts)
    totals, counts = reduced[:groups], reduced[groups:]
    means = [t / c for t, c in zip(totals, counts) if c > 0]
    return sum(means) / max(len(means), 1)
