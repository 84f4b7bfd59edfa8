"""Train the gate of a mixture bundle (SAM-Med3D-MoE §2.2-2.3): encoders and experts frozen,
cross-entropy on the right expert (general for classes no expert owns) plus DiceCE on the fused
mask; optionally also the top-1 expert of each prompt; then τ chosen on validation data. Writes
the gate, τ and the run's options into the bundle.

    python -m Training.train_gate --bundle bundles/demo --data data/Dataset501_ExampleCT data/Dataset502_ExampleMR \\
        --val-data data/Dataset503_CTSlab --steps 300 --out runs/gate

An item's expert is the first expert of the bundle whose targets hold its class name and whose
modality is the case's (or "any"). See Training/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from SAMMed3DMoELib import bundle
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.model import GatingNetwork
from SAMMed3DMoELib.moe import GENERAL, SamMed3DMoE

from . import checkpoints
from .config import as_list, jsonable, parse_args, run_script
from .data import (Augmentation, CropDataset, Item, Preprocessing, add_data_arguments, augmentation_from_args,
                   describe_items, load_split)
from .distributed import DistContext
from .embedding_cache import EmbeddingCache
from .finetune_expert import freeze_unreached
from .interactive import GateTraining, balanced_decoder_weights, click_dice, plan_for_step
from .loop import RunSettings, Task, add_loop_arguments, run, training_run
from .models import write_provenance
from .validation import add_prompt_arguments, require_box_prompts, validation_score

DEFAULT_TAUS = "0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.train_gate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON/YAML file with defaults for any option below")
    g = p.add_argument_group("gate")
    g.add_argument("--bundle", type=Path, required=True, help="bundle with experts; the gate and τ are written into it")
    g.add_argument("--new-gate", action="store_true", help="start from a new gate even if the bundle has one")
    g.add_argument("--gate-heads", type=int, default=8, help="attention heads of a new gate")
    g.add_argument("--gate-mlp-dim", type=int, default=1024, help="MLP width of a new gate")
    g.add_argument("--gate-hidden-dim", type=int, default=256, help="hidden width of a new gate's classifier")
    g.add_argument("--update-top1-expert", action="store_true",
                   help="also train each prompt's top-1 expert (paper: lr 1e-4), through the fused mask")
    g.add_argument("--expert-lr", type=float, default=1e-4, help="learning rate of the experts (--update-top1-expert)")
    g.add_argument("--ce-weight", type=float, default=1.0, help="weight of the gate's cross-entropy")
    g.add_argument("--dice-weight", type=float, default=1.0, help="weight of the fused mask's DiceCE")
    g.add_argument("--no-balance-decoders", dest="balance_decoders", action="store_false",
                   help="weight the cross-entropy by item counts as they come (default: each decoder's items weigh "
                        "as much in total as another's, and validation and τ use the mean over decoders)")
    g.add_argument("--taus", default=DEFAULT_TAUS, help="τ values tried on the validation data (paper: 0.5 beat 0.7)")
    g.add_argument("--tau-clicks", type=int, default=3, help="τ is scored by the mean Dice over clicks 1..N")
    g.add_argument("--crops-per-item", type=int, default=4, help="fixed crops per (case, class), each encoded once")
    g.add_argument("--no-embedding-cache", dest="embedding_cache", action="store_false",
                   help="encode every crop at every step (slower; same results)")
    add_data_arguments(p, flips=False)
    add_prompt_arguments(p, iterations=5, gate=True)
    add_loop_arguments(p, steps=300, lr=1e-4)
    return p


def expert_label(moe: SamMed3DMoE, name: str, modality: str) -> int:
    """1 + the index of the first expert owning class ``name`` in ``modality``, else 0 (general)."""
    for index, expert in enumerate(moe.expert_names):
        info = moe.expert_info[expert]
        if name in info.targets and str(info.modality).upper() in ("ANY", "", modality.upper()):
            return index + 1
    return 0


def label_items(moe: SamMed3DMoE, items: Sequence[Item]) -> List[Item]:
    return [dataclasses.replace(item, expert=expert_label(moe, item.name, item.modality)) for item in items]


class GateTask(Task):
    name = "gate"

    def __init__(self, moe: SamMed3DMoE, args, cache: EmbeddingCache, items: Sequence[Item], val_data=None) -> None:
        moe.requires_grad_(False)
        moe.gate.requires_grad_(True)
        self.top1 = bool(args.update_top1_expert)
        if self.top1:
            for decoder in moe.experts.values():
                decoder.requires_grad_(True)
                freeze_unreached(decoder)
        self.moe, self.args, self.cache, self.val_data = moe, args, cache, val_data
        self.val_cache = EmbeddingCache(moe.base.image_encoder, enabled=cache.enabled)
        self.decoders = 1 + len(moe.expert_names)
        weights = balanced_decoder_weights([i.expert for i in items], self.decoders) if args.balance_decoders else None
        self.module = GateTraining(moe, args.ce_weight, args.dice_weight, weights)

    def param_groups(self) -> List[dict]:
        experts = [p for d in self.moe.experts.values() for p in d.parameters() if p.requires_grad]
        return [{"name": "gate", "lr": self.args.lr, "params": list(self.moe.gate.parameters())},
                {"name": "experts", "lr": self.args.expert_lr, "params": experts}]

    def train_step(self, module, batch, step):
        embeddings = self.cache(batch["image"], batch["item"], batch["variant"])
        box = plan_for_step(self.args.seed, step, self.args.iterations, 0, self.args.box_prob).box
        return module(batch["image"], batch["target"], batch["expert"], batch["click_u"], self.args.iterations,
                      embeddings, batch["box_jitter"] if box else None)

    def _keys(self, key: str) -> bool:
        return key.startswith("gate.") or (self.top1 and key.startswith("experts."))

    def trainable_state(self):
        return {k: v for k, v in self.moe.state_dict().items() if self._keys(k)}

    def load_trainable_state(self, state):
        missing, unexpected = self.moe.load_state_dict(state, strict=False)
        wrong = [k for k in missing if self._keys(k)] + list(unexpected)
        if wrong:
            raise SAMMed3DError(f"the gate checkpoint does not fit this bundle (keys {wrong[:4]}...)")

    def mixture_score(self, ctx: DistContext, clicks: int) -> Optional[float]:
        if self.val_data is None:
            return None
        moe = self.moe

        def run_batch(batch):
            emb = self.val_cache(batch["image"], batch["item"], batch["variant"])
            return click_dice(lambda e, pts, box, low: moe.predict(e, pts, box, low).logits, emb, batch["target"],
                              batch["click_u"], clicks, moe.base.prompt_encoder.mask_input_size)

        # the gate decides per prompt set: one at a time; balanced: the mean over the decoders' items
        return validation_score(self.val_data, run_batch, ctx, 1, group_by="expert" if self.args.balance_decoders else None,
                                groups=self.decoders)

    def validate(self, ctx: DistContext):
        return self.mixture_score(ctx, self.args.val_clicks)

    def routing_accuracy(self, data: CropDataset, cache: EmbeddingCache) -> Dict[str, float]:
        """Fraction of first clicks the gate sends to the item's own decoder (argmax of the
        scores): ``{"all": ..., decoder name: ...}`` per decoder that has items."""
        from SAMMed3DMoELib.clicks import sample_clicks

        moe = self.moe
        names = [GENERAL] + moe.expert_names
        right, seen = [0] * len(names), [0] * len(names)
        with torch.no_grad():
            for index in range(len(data)):
                sample = data[index]
                image, target = sample["image"][None], sample["target"][None]
                emb = cache(image, sample["item"][None], sample["variant"][None])
                points = sample_clicks(torch.zeros_like(target) > 0, target > 0, sample["click_u"][:1])
                sparse, _ = moe.base.prompt_encoder(points=points)
                scores = moe.gate_scores(emb, sparse, SamMed3DMoE.prompt_mask(points, None, sparse))
                label = int(sample["expert"])
                right[label] += int(scores[0].argmax()) == label
                seen[label] += 1
        out = {"all": sum(right) / max(1, sum(seen))}
        out.update({name: r / n for name, r, n in zip(names, right, seen) if n})
        return out


def choose_tau(task: GateTask, ctx: DistContext, taus: Sequence[float], clicks: int) -> Dict[str, float]:
    """Mean mixture Dice on the validation data for each τ; sets the best (ties: nearest 0.5)."""
    scores = {}
    for tau in taus:
        task.moe.tau = float(tau)
        scores[f"{float(tau):g}"] = task.mixture_score(ctx, clicks)
    best = max(taus, key=lambda t: (round(scores[f"{float(t):g}"], 6), -abs(float(t) - 0.5)))
    task.moe.tau = float(best)
    return scores


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    with training_run(args) as ctx:
        settings = RunSettings.from_args(args)
        moe = bundle.load_bundle(args.bundle, device="cpu")
        if not moe.expert_names:
            raise SAMMed3DError(f"{args.bundle} has no experts: fine-tune one (Training.finetune_expert) before the gate")
        require_box_prompts(args.box_prob, moe.base)
        if moe.gate is None or args.new_gate:
            moe.gate = GatingNetwork(moe.base.config["prompt_embed_dim"], len(moe.expert_names), args.gate_heads,
                                     args.gate_mlp_dim, args.gate_hidden_dim)
        pre = Preprocessing.from_bundle(moe.preprocessing)
        classes = as_list(args.classes)
        cases, items = load_split(args.data, pre, args.cache_dir, ctx, classes=classes,
                                  exclude=as_list(args.exclude_classes), modality=args.modality,
                                  min_voxels=args.min_voxels)
        items = label_items(moe, items)
        dataset = CropDataset(cases, items, pre, seed=args.seed, augment=augmentation_from_args(args),
                              fixed_crops=args.crops_per_item, iterations=args.iterations)
        val_data = None
        if args.val_data:
            val_classes = as_list(args.val_classes) if args.val_classes is not None else classes
            val_cases, val_items = load_split(args.val_data, pre, args.cache_dir, ctx, classes=val_classes,
                                              modality=args.modality, min_voxels=args.min_voxels)
            val_data = CropDataset(val_cases, label_items(moe, val_items), pre, seed=args.seed,
                                   augment=Augmentation.none(), fixed_crops=1, iterations=max(args.val_clicks, args.tau_clicks),
                                   stream=1)
        cache = EmbeddingCache(moe.base.image_encoder, enabled=args.embedding_cache)
        task = GateTask(moe, args, cache, items, val_data)
        counts = {name: sum(i.expert == k for i in items) for k, name in enumerate([GENERAL] + moe.expert_names)}
        options = {**jsonable(args), "preprocessing": pre.as_bundle(), "items": describe_items(items),
                   "items_per_decoder": counts}
        if ctx.is_main:
            print(f"train_gate: {len(items)} items per decoder {counts}; {ctx.world_size} process(es) on {ctx.device}",
                  flush=True)
        start = time.perf_counter()
        state = run(task, dataset, settings, ctx, options)
        if state["stopped"]:
            return 0
        source = settings.out / ("best.pt" if state["best_step"] is not None else "latest.pt")
        task.load_trainable_state(checkpoints.load_checkpoint(source)["model"])
        moe.eval()
        taus = as_list(args.taus, float)
        tau_scores = choose_tau(task, ctx, taus, args.tau_clicks) if val_data is not None else {}
        if val_data is None and ctx.is_main:
            print("train_gate: no --val-data, so τ stays at the bundle's value", flush=True)
        if ctx.is_main:
            accuracy = task.routing_accuracy(val_data or dataset, task.val_cache if val_data else cache)
            bundle.save_bundle(moe, args.bundle, preprocessing=moe.preprocessing)
            write_provenance(args.bundle, "gate", {
                **options, "weights_from": source.name, "best_score": state["best"], "best_step": state["best_step"],
                "steps": state["step"], "tau": moe.tau, "tau_scores": tau_scores, "routing_accuracy": accuracy,
                "seconds": round(time.perf_counter() - start, 1),
                "embedding_cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses}})
            per_decoder = ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items() if k != "all")
            print(f"train_gate: gate ({source.name}) and τ={moe.tau:g} written to {args.bundle}; routing accuracy "
                  f"{accuracy['all']:.2f} ({per_decoder}) on the {'validation' if val_data else 'training'} crops",
                  flush=True)
        return 0


if __name__ == "__main__":
    run_script(main)
