"""Train or continue training SAM-Med3D (all parts or chosen parts, any size) with the official
recipe: iterative click simulation, DiceCE, AdamW with per-part learning rates.

    python -m Training.pretrain --data data/Dataset501_ExampleCT --classes liver,spleen \\
        --model-size tiny --spacing 3 --steps 200 --out runs/general --export bundles/demo

Under ``torchrun --nproc_per_node N`` each process takes its share of every batch (DDP).
See Training/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from SAMMed3DMoELib.errors import SAMMed3DError

from . import checkpoints
from .config import as_list, jsonable, parse_args, run_script
from .data import (Augmentation, CropDataset, Preprocessing, add_data_arguments, augmentation_from_args,
                   describe_items, load_split)
from .distributed import DistContext
from .interactive import InteractiveSegmentation, click_dice, plan_for_step
from .loop import RunSettings, Task, add_loop_arguments, run, training_run
from .models import export_bundle, load_start, model_size
from .validation import add_prompt_arguments, validation_score

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON/YAML file with defaults for any option below")
    add_data_arguments(p)
    m = p.add_argument_group("model")
    m.add_argument("--init", default=None,
                   help="start from a bundle folder, an official checkpoint or a pretrain checkpoint (default: random)")
    m.add_argument("--model-size", default="base",
                   help="for random starts: tiny, small, base (ViT-B, official) or a JSON object of size keywords")
    m.add_argument("--click-mark-radius", type=float, default=None,
                   help="also mark each click in the mask prompt, a ball of this radius in window voxels (0: off, as "
                        "the official networks; default: the --init model's, else 0); the bundle records it")
    m.add_argument("--no-box-prompts", dest="box_prompts", action="store_false",
                   help="build the model without box prompt embeddings (random starts)")
    m.add_argument("--spacing", type=float, default=None,
                   help="voxel size in mm of the prepared grid (default: the --init bundle's, else 1.5)")
    m.add_argument("--ct-clamp", default=None, help="CT clamp in HU as LOW,HIGH, or 'none' (default -1000,1000)")
    m.add_argument("--parts", default=",".join(PARTS), help="parts to train (others frozen): " + ", ".join(PARTS))
    m.add_argument("--lr-image-encoder", type=float, default=None, help="default: --lr")
    m.add_argument("--lr-prompt-encoder", type=float, default=None, help="default: 0.1 x --lr (official)")
    m.add_argument("--lr-mask-decoder", type=float, default=None, help="default: 0.1 x --lr (official)")
    m.add_argument("--export", type=Path, default=None, help="bundle folder for the best (else last) weights")
    add_prompt_arguments(p)
    add_loop_arguments(p, steps=1000, lr=8e-4)
    return p


def resolve_preprocessing(args, start_pre: Optional[Preprocessing], img_size: int) -> Preprocessing:
    base = start_pre or Preprocessing()
    spacing = args.spacing if args.spacing is not None else base.spacing_mm
    clamp = base.ct_clamp
    if args.ct_clamp is not None:
        clamp = None if str(args.ct_clamp).lower() == "none" else tuple(as_list(args.ct_clamp, float))
        if clamp is not None and (len(clamp) != 2 or clamp[0] >= clamp[1]):
            raise SAMMed3DError(f"--ct-clamp must be LOW,HIGH with LOW < HIGH, or none; got {args.ct_clamp!r}")
    return Preprocessing(float(spacing), int(img_size), clamp)


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, model, parts: Sequence[str], lrs: Dict[str, float], args, val_data=None) -> None:
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise SAMMed3DError(f"--parts takes some of {', '.join(PARTS)}; got {','.join(parts) or 'nothing'}")
        if args.box_prob > 0 and not model.box_prompts:
            raise SAMMed3DError("--box-prob needs a model with box prompts; this one has none (start a new model "
                                "without --no-box-prompts, or use --box-prob 0)")
        self.model = model
        for name in PARTS:
            getattr(model, name).requires_grad_(name in parts)
        # Never reached by the loss (single-mask output, no IoU loss): frozen, so weight decay
        # does not erode them.
        model.mask_decoder.iou_prediction_head.requires_grad_(False)
        for mlp in model.mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)
        if args.box_prob <= 0 and model.box_prompts:
            for emb in model.prompt_encoder.point_embeddings[2:]:
                emb.requires_grad_(False)
        self.parts, self.lrs, self.args = list(parts), lrs, args
        self.module = InteractiveSegmentation(model)
        self.val_data = val_data

    def param_groups(self) -> List[dict]:
        return [{"name": name, "lr": self.lrs[name],
                 "params": [p for p in getattr(self.model, name).parameters() if p.requires_grad]} for name in self.parts]

    def train_step(self, module, batch, step):
        a = self.args
        plan = plan_for_step(a.seed, step, a.iterations, a.mask_only_iterations, a.box_prob)
        return module(batch["image"], batch["target"], batch["click_u"], batch["box_jitter"], plan)

    def trainable_state(self):
        return self.model.state_dict()

    def load_trainable_state(self, state):
        self.model.load_state_dict(state, strict=True)

    def validate(self, ctx: DistContext):
        if self.val_data is None:
            return None
        model = self.model

        def run_batch(batch):
            emb = model.image_encoder(batch["image"])
            return click_dice(lambda e, pts, box, low: model.decode(e, pts, box, low)[0], emb, batch["target"],
                              batch["click_u"], self.args.val_clicks, model.prompt_encoder.mask_input_size)

        return validation_score(self.val_data, run_batch, ctx, self.args.batch_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    with training_run(args) as ctx:
        settings = RunSettings.from_args(args)
        size = model_size(args.model_size)
        model, start_pre, origin, start_box_trained = load_start(args.init, size, args.box_prompts, args.seed)
        if args.click_mark_radius is not None:
            if args.click_mark_radius < 0:
                raise SAMMed3DError(f"--click-mark-radius must be >= 0 (0: off), not {args.click_mark_radius}")
            model.prompt_encoder.click_mark_radius = model.config["click_mark_radius"] = float(args.click_mark_radius)
        pre = resolve_preprocessing(args, start_pre, model.img_size)
        classes = as_list(args.classes)
        cases, items = load_split(args.data, pre, args.cache_dir, ctx, classes=classes,
                                  exclude=as_list(args.exclude_classes), modality=args.modality,
                                  min_voxels=args.min_voxels)
        dataset = CropDataset(cases, items, pre, seed=args.seed, augment=augmentation_from_args(args),
                              iterations=args.iterations)
        val_data = None
        if args.val_data:
            val_classes = as_list(args.val_classes) if args.val_classes is not None else classes
            val_cases, val_items = load_split(args.val_data, pre, args.cache_dir, ctx, classes=val_classes,
                                              modality=args.modality, min_voxels=args.min_voxels)
            val_data = CropDataset(val_cases, val_items, pre, seed=args.seed, augment=Augmentation.none(),
                                   fixed_crops=1, iterations=args.val_clicks, stream=1)
        lrs = {"image_encoder": args.lr_image_encoder or args.lr,
               "prompt_encoder": args.lr_prompt_encoder or 0.1 * args.lr,
               "mask_decoder": args.lr_mask_decoder or 0.1 * args.lr}
        task = PretrainTask(model, as_list(args.parts), lrs, args, val_data)
        # Box embeddings count as trained when the start's were or this run trains them.
        box_trained = model.box_prompts and (start_box_trained or (args.box_prob > 0 and "prompt_encoder" in task.parts))
        options = {**jsonable(args), "preprocessing": pre.as_bundle(), "model_config": dict(model.config),
                   "start": origin, "items": describe_items(items), "box_prompts_trained": box_trained}
        if ctx.is_main:
            print(f"pretrain: {len(items)} training items ({len(describe_items(items))} classes), "
                  f"{len(val_data) if val_data else 0} validation items; start: {origin}; "
                  f"{ctx.world_size} process(es) on {ctx.device}", flush=True)
        start = time.perf_counter()
        state = run(task, dataset, settings, ctx, options)
        if ctx.is_main and not state["stopped"]:
            source = settings.out / ("best.pt" if state["best_step"] is not None else "latest.pt")
            task.load_trainable_state(checkpoints.load_checkpoint(source)["model"])
            export = args.export or settings.out / "bundle"
            export_bundle(model, export, pre, {**options, "weights_from": source.name, "best_score": state["best"],
                                               "best_step": state["best_step"], "steps": state["step"],
                                               "seconds": round(time.perf_counter() - start, 1)},
                          box_prompts_trained=box_trained)
            print(f"pretrain: exported {source.name} (step {state['best_step'] or state['step']}) to {export}", flush=True)
        return 0


if __name__ == "__main__":
    run_script(main)
