"""Fine-tune an expert mask decoder on new classes with both encoders frozen (SAM-Med3D-MoE §2.1),
fully or with LoRA, and add it (plain, LoRA merged) to a bundle.

    python -m Training.finetune_expert --bundle bundles/demo --name vessels --classes aorta,inferior_vena_cava \\
        --data data/Dataset501_ExampleCT --steps 300 --out runs/vessels

The frozen image encoder's embedding of each fixed crop is computed once and reused
(``--crops-per-item``; ``--no-embedding-cache`` recomputes it every step). See Training/README.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import List, Optional, Sequence

from SAMMed3DMoELib import bundle
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.moe import GENERAL

from . import checkpoints
from .config import as_list, jsonable, parse_args, read_config_file, run_script
from .data import (Augmentation, CropDataset, Preprocessing, add_data_arguments, augmentation_from_args,
                   describe_items, load_split)
from .distributed import DistContext
from .embedding_cache import EmbeddingCache
from .interactive import InteractiveSegmentation, click_dice, plan_for_step
from .lora import DEFAULT_TARGETS, add_lora, lora_parameters, merge_lora
from .loop import RunSettings, Task, add_loop_arguments, run, training_run
from .models import write_provenance
from .validation import add_prompt_arguments, require_box_prompts, validation_score


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.finetune_expert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON/YAML file with defaults for any option below")
    e = p.add_argument_group("expert")
    e.add_argument("--bundle", type=Path, required=True, help="bundle with the base model; the expert is added to it")
    e.add_argument("--name", default=None, help="expert name (letters, digits, _ . -)")
    e.add_argument("--experts", type=Path, default=None,
                   help="JSON/YAML file assigning classes to experts: {\"experts\": {NAME: {\"classes\": [...], "
                        "\"modality\": \"CT\", \"description\": \"...\"}}}; --name picks the entry")
    e.add_argument("--description", default="", help="what the expert is for (shown to users)")
    e.add_argument("--init-decoder", default=GENERAL, help="start from the general decoder or from an expert's")
    e.add_argument("--replace", action="store_true", help="replace an expert of the same name in the bundle")
    e.add_argument("--method", choices=("lora", "full"), default="lora",
                   help="LoRA on the decoder's linear layers + upscaling trained fully, or the whole decoder")
    e.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (finetune-SAM: 4)")
    e.add_argument("--lora-alpha", type=float, default=4.0, help="LoRA scale numerator (update x alpha/rank)")
    e.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="linear layers to adapt (names or fnmatch patterns of module paths)")
    e.add_argument("--train-fully", default="output_upscaling",
                   help="decoder submodules trained fully next to LoRA (comma-separated paths)")
    e.add_argument("--crops-per-item", type=int, default=4, help="fixed crops per (case, class), each encoded once")
    e.add_argument("--no-embedding-cache", dest="embedding_cache", action="store_false",
                   help="encode every crop at every step (slower; same results)")
    add_data_arguments(p)
    add_prompt_arguments(p)
    add_loop_arguments(p, steps=300, lr=1e-4)
    return p


def expert_spec(args) -> dict:
    """Name, classes, modality and description of the expert from the options / --experts file."""
    spec = {"name": args.name, "classes": as_list(args.classes), "modality": args.modality,
            "description": args.description}
    if args.experts is not None:
        table = read_config_file(args.experts).get("experts")
        if not isinstance(table, dict) or not table:
            raise SAMMed3DError(f"{args.experts}: expected {{\"experts\": {{NAME: {{\"classes\": [...]}}}}}}")
        if not args.name:
            raise SAMMed3DError(f"--experts needs --name, one of: {', '.join(table)}")
        if args.name not in table:
            raise SAMMed3DError(f"{args.experts} has no expert {args.name!r}; it lists: {', '.join(table)}")
        entry = table[args.name]
        spec["classes"] = spec["classes"] or as_list(entry.get("classes"))
        spec["modality"] = spec["modality"] or entry.get("modality")
        spec["description"] = spec["description"] or entry.get("description", "")
    if not spec["name"]:
        raise SAMMed3DError("give the expert a --name")
    if not spec["classes"]:
        raise SAMMed3DError("give the expert's classes (--classes a,b or an --experts file)")
    if spec["modality"] is not None:
        spec["modality"] = str(spec["modality"]).upper()
    return spec


def freeze_unreached(decoder) -> None:
    """The IoU head and the multi-mask outputs get no loss: keep them as they are."""
    decoder.iou_prediction_head.requires_grad_(False)
    for mlp in decoder.output_hypernetworks_mlps[1:]:
        mlp.requires_grad_(False)


class ExpertTask(Task):
    name = "expert"

    def __init__(self, base, decoder, args, cache: EmbeddingCache, val_data=None) -> None:
        require_box_prompts(args.box_prob, base)
        base.requires_grad_(False)
        self.args = args
        self.decoder = decoder
        if args.method == "lora":
            decoder.requires_grad_(False)
            self.wrapped = add_lora(decoder, as_list(args.lora_targets), args.lora_rank, args.lora_alpha)
            for path in as_list(args.train_fully):
                try:
                    decoder.get_submodule(path).requires_grad_(True)
                except AttributeError:
                    raise SAMMed3DError(f"--train-fully {path!r}: the decoder has no such submodule") from None
        else:
            decoder.requires_grad_(True)
            self.wrapped = []
        freeze_unreached(decoder)
        self.module = InteractiveSegmentation(base, decoder)
        self.base, self.cache, self.val_data = base, cache, val_data
        self.val_cache = EmbeddingCache(base.image_encoder, enabled=cache.enabled)

    def param_groups(self) -> List[dict]:
        lora = {id(p) for p in lora_parameters(self.decoder)}
        trainable = [p for p in self.decoder.parameters() if p.requires_grad]
        return [{"name": "lora", "lr": self.args.lr, "params": [p for p in trainable if id(p) in lora]},
                {"name": "decoder", "lr": self.args.lr, "params": [p for p in trainable if id(p) not in lora]}]

    def train_step(self, module, batch, step):
        a = self.args
        plan = plan_for_step(a.seed, step, a.iterations, a.mask_only_iterations, a.box_prob)
        embeddings = self.cache(batch["image"], batch["item"], batch["variant"])
        return module(batch["image"], batch["target"], batch["click_u"], batch["box_jitter"], plan, embeddings)

    def trainable_state(self):
        return self.decoder.state_dict()

    def load_trainable_state(self, state):
        self.decoder.load_state_dict(state, strict=True)

    def validate(self, ctx: DistContext):
        if self.val_data is None:
            return None
        base, decoder = self.base, self.decoder

        def run_batch(batch):
            emb = self.val_cache(batch["image"], batch["item"], batch["variant"])
            return click_dice(lambda e, pts, box, low: base.decode(e, pts, box, low, decoder=decoder)[0], emb,
                              batch["target"], batch["click_u"], self.args.val_clicks,
                              base.prompt_encoder.mask_input_size)

        return validation_score(self.val_data, run_batch, ctx, self.args.batch_size)

    def plain_decoder(self):
        """A copy of the decoder with LoRA merged: an ordinary MaskDecoder3D."""
        return merge_lora(copy.deepcopy(self.decoder)).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    with training_run(args) as ctx:
        settings = RunSettings.from_args(args)
        spec = expert_spec(args)
        moe = bundle.load_bundle(args.bundle, device="cpu")
        if spec["name"] in moe.expert_names and not args.replace:
            raise SAMMed3DError(f"{args.bundle} already has an expert {spec['name']!r}; pass --replace to retrain it")
        if args.init_decoder != GENERAL and args.init_decoder not in moe.expert_names:
            raise SAMMed3DError(f"--init-decoder {args.init_decoder!r}: the bundle's experts are {moe.expert_names}")
        pre = Preprocessing.from_bundle(moe.preprocessing)
        source = moe.base.mask_decoder if args.init_decoder == GENERAL else moe.experts[args.init_decoder]
        decoder = copy.deepcopy(source).train()
        cases, items = load_split(args.data, pre, args.cache_dir, ctx, classes=spec["classes"],
                                  exclude=as_list(args.exclude_classes), modality=spec["modality"],
                                  min_voxels=args.min_voxels)
        dataset = CropDataset(cases, items, pre, seed=args.seed, augment=augmentation_from_args(args),
                              fixed_crops=args.crops_per_item, iterations=args.iterations)
        val_data = None
        if args.val_data:
            val_classes = as_list(args.val_classes) if args.val_classes is not None else spec["classes"]
            val_cases, val_items = load_split(args.val_data, pre, args.cache_dir, ctx, classes=val_classes,
                                              modality=spec["modality"], min_voxels=args.min_voxels)
            val_data = CropDataset(val_cases, val_items, pre, seed=args.seed, augment=Augmentation.none(),
                                   fixed_crops=1, iterations=args.val_clicks, stream=1)
        cache = EmbeddingCache(moe.base.image_encoder, enabled=args.embedding_cache)
        task = ExpertTask(moe.base, decoder, args, cache, val_data)
        options = {**jsonable(args), "expert": spec, "preprocessing": pre.as_bundle(), "items": describe_items(items),
                   "lora_layers": task.wrapped}
        if ctx.is_main:
            n_train = sum(p.numel() for g in task.param_groups() for p in g["params"])
            print(f"finetune_expert {spec['name']}: {len(items)} items, {args.method} ({n_train} trainable parameters), "
                  f"{ctx.world_size} process(es) on {ctx.device}", flush=True)
        start = time.perf_counter()
        state = run(task, dataset, settings, ctx, options)
        if ctx.is_main and not state["stopped"]:
            source_ck = settings.out / ("best.pt" if state["best_step"] is not None else "latest.pt")
            task.load_trainable_state(checkpoints.load_checkpoint(source_ck)["model"])
            names = [e["name"] for e in bundle.read_bundle_config(args.bundle)["experts"]]
            if spec["name"] in names:
                bundle.remove_expert_from_bundle(args.bundle, spec["name"])
            bundle.add_expert_to_bundle(args.bundle, spec["name"], task.plain_decoder(), targets=spec["classes"],
                                        modality=spec["modality"] or "any", description=spec["description"])
            write_provenance(args.bundle, f"expert_{spec['name']}", {
                **options, "weights_from": source_ck.name, "best_score": state["best"], "best_step": state["best_step"],
                "steps": state["step"], "seconds": round(time.perf_counter() - start, 1),
                "embedding_cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses}})
            print(f"finetune_expert: added expert {spec['name']!r} ({source_ck.name}) to {args.bundle}", flush=True)
        return 0


if __name__ == "__main__":
    run_script(main)
