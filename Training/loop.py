"""The training loop shared by ``pretrain``, ``finetune_expert`` and ``train_gate``.

One place for what every stage needs: AdamW with per-part learning rates, warm-up then a
multi-step/cosine/constant schedule, AMP (float16 + GradScaler) on CUDA, gradient
accumulation, ``DistributedDataParallel`` (the whole prompting loop runs inside its forward,
so gradients are averaged over the ranks; ``no_sync`` during accumulation), validation with
best-checkpoint tracking, latest/best checkpoints that resume exactly, and logs (JSON lines,
TensorBoard when installed, a progress bar) written by rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from SAMMed3DMoELib.device import set_cpu_threads
from SAMMed3DMoELib.errors import SAMMed3DError

from . import checkpoints
from .config import as_list
from .data import CropDataset, EpochSampler, make_loader
from .distributed import DistContext, all_reduce_sum, barrier, init_distributed, shutdown

SCHEDULES = ("multistep", "cosine", "constant")


def add_loop_arguments(parser: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int = 2) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps in total (default {steps})")
    g.add_argument("--schedule-steps", type=int, default=None,
                   help="steps the learning-rate schedule spans (default: --steps); more than --steps ends the run "
                        "part-way down the schedule, exactly where a longer run would be at that step")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="samples per process and micro-step; the global batch is batch-size x processes x accumulate")
    g.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=float, default=lr, help=f"base learning rate (default {lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (official: 0.1)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--schedule", choices=SCHEDULES, default="multistep",
                   help="after warm-up: multistep (x gamma at each milestone, official), cosine, constant")
    g.add_argument("--milestones", default="0.6,0.9",
                   help="multistep milestones as fractions of the schedule's steps (official 120 and 180 of 200 epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep factor")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr as a fraction of the lr")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    g.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="mixed precision (float16 + GradScaler); auto: on CUDA only")
    r = parser.add_argument_group("run")
    r.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, logs, exported files")
    r.add_argument("--seed", type=int, default=0, help="seed of every random choice (data, clicks, init)")
    r.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda (each torchrun rank takes cuda:LOCAL_RANK)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch per process")
    r.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    r.add_argument("--val-every", type=int, default=0, help="steps between validations (0: at the end only)")
    r.add_argument("--save-every", type=int, default=50, help="steps between latest.pt checkpoints")
    r.add_argument("--stop-at-step", type=int, default=None,
                   help="stop (with a checkpoint) after this step, e.g. for a time-limited job; rerun to resume")
    r.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if OUT/latest.pt exists (default: resume from it)")


@dataclass
class RunSettings:
    out: Path
    steps: int
    schedule_steps: int
    batch_size: int
    accumulate: int
    weight_decay: float
    warmup_steps: int
    schedule: str
    milestones: List[float]
    gamma: float
    min_lr_ratio: float
    grad_clip: float
    amp: str
    seed: int
    num_workers: int
    log_every: int
    val_every: int
    save_every: int
    stop_at_step: Optional[int]
    resume: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunSettings":
        s = cls(out=Path(args.out).expanduser(), steps=args.steps,
                schedule_steps=args.steps if args.schedule_steps is None else args.schedule_steps,
                batch_size=args.batch_size, accumulate=args.accumulate,
                weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule,
                milestones=as_list(args.milestones, float), gamma=args.gamma, min_lr_ratio=args.min_lr_ratio,
                grad_clip=args.grad_clip, amp=args.amp, seed=args.seed, num_workers=args.num_workers,
                log_every=args.log_every, val_every=args.val_every, save_every=args.save_every,
                stop_at_step=args.stop_at_step, resume=args.resume)
        for name in ("steps", "batch_size", "accumulate"):
            if getattr(s, name) < 1:
                raise SAMMed3DError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
        if s.schedule_steps < s.steps:
            raise SAMMed3DError(f"--schedule-steps ({s.schedule_steps}) must be at least --steps ({s.steps}): the "
                                "schedule cannot end before the run")
        if s.schedule not in SCHEDULES:
            raise SAMMed3DError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        return s


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: what a run creates before training (new weights, LoRA
    matrices, a new gate) is then the same on every run and every rank."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextmanager
def training_run(args: argparse.Namespace) -> Iterator[DistContext]:
    """What every training script does around its work: CPU threads (``args.threads``), seeds
    (``args.seed``), the process group on ``args.device``; the group is shut down however the
    work ends."""
    set_cpu_threads(args.threads)
    seed_everything(args.seed)
    ctx = init_distributed(args.device)
    try:
        yield ctx
    finally:
        shutdown(ctx)


def lr_factor(step: int, s: RunSettings) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.schedule == "multistep":
        return s.gamma ** sum(step >= m * s.schedule_steps for m in s.milestones)
    if s.schedule == "cosine":
        span = max(1, s.schedule_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class Task:
    """What a stage trains. ``module`` is what DDP wraps; subclasses fill in the rest."""

    name = "task"
    module: nn.Module

    def param_groups(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def train_step(self, module: nn.Module, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, torch.Tensor]:
        """Run ``module`` (the DDP-wrapped one) on a batch already on the device; return at least ``loss``."""
        raise NotImplementedError

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state(self, state: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def validate(self, ctx: DistContext) -> Optional[float]:
        """A validation score (higher is better; the same on every rank), or None."""
        return None


class RunLogger:
    """JSON lines (``log.jsonl``), TensorBoard (``tensorboard/``, if installed) and a progress bar, rank 0 only."""

    def __init__(self, out: Path, enabled: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate_after(initial)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=initial)
        except ImportError:
            self.writer = None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=out.name, unit="step", dynamic_ncols=True, leave=False,
                        disable=None)

    def _truncate_after(self, step: int) -> None:
        """Drop log lines of steps a resumed run will redo."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, values: Dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fill_missing_grads(params: List[nn.Parameter]) -> None:
    """Zero gradients for parameters no loss reached this step, so the optimizer treats them
    the same whether one rank or several computed the step (DDP may leave them None)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _EndlessSampler(torch.utils.data.Sampler):
    """Epoch after epoch of an :class:`EpochSampler`, each cut to whole batches, from the
    position in ``state``: one DataLoader (and its workers) serves the whole run."""

    def __init__(self, sampler: EpochSampler, batch_size: int, state: dict) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.start = (state["epoch"], state["batch_in_epoch"])

    def __iter__(self):
        epoch, skip = self.start
        usable = (self.sampler.per_epoch() // self.batch_size) * self.batch_size
        while True:
            self.sampler.set_position(epoch)
            indices = [i for i, _ in self.sampler][:usable]
            for index in indices[skip * self.batch_size:]:
                yield index, epoch
            epoch, skip = epoch + 1, 0


def _batches(dataset: CropDataset, sampler: EpochSampler, s: RunSettings, state: dict, device) -> Iterator[dict]:
    """Batches forever from the position in ``state``, which is kept up to date (epoch and
    batches used in it) as batches are taken."""
    per_epoch = sampler.per_epoch() // s.batch_size
    for batch in make_loader(dataset, _EndlessSampler(sampler, s.batch_size, state), s.batch_size, s.num_workers,
                             device):
        state["batch_in_epoch"] += 1
        if state["batch_in_epoch"] == per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        yield batch


def run(task: Task, dataset: CropDataset, s: RunSettings, ctx: DistContext, options: Dict[str, Any],
        on_save: Optional[Callable[[Path, bool], None]] = None) -> Dict[str, Any]:
    """Train ``task`` for ``s.steps`` steps (or until ``s.stop_at_step``), resuming from
    ``OUT/latest.pt`` when it exists and ``s.resume``. Returns the final loop state
    (``step``, ``best``, ``best_step``, ``stopped``). ``on_save(path, is_best)`` runs on rank 0
    after each checkpoint."""
    device = ctx.device
    module = task.module.to(device)
    wrapped: nn.Module = module
    if ctx.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    groups = [g for g in task.param_groups() if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise SAMMed3DError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s))
    amp = s.amp == "on" or (s.amp == "auto" and device.type == "cuda")
    if amp and device.type != "cuda":
        raise SAMMed3DError("--amp on needs a CUDA device (float16 autocast); use --amp auto or off on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None}

    latest, best_path = s.out / "latest.pt", s.out / "best.pt"
    if s.resume and latest.exists():
        ck = checkpoints.load_checkpoint(latest)
        if ck.get("task") != task.name:
            raise SAMMed3DError(f"{latest} is a {ck.get('task')!r} checkpoint, not {task.name!r}; use another --out")
        task.load_trainable_state(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        state.update(ck["loop"])
        checkpoints.set_rng_state(ck["rng"])
        if ctx.is_main:
            print(f"resuming {task.name} from {latest} at step {state['step']}", flush=True)

    sampler = EpochSampler(len(dataset), ctx.rank, ctx.world_size, s.seed)
    if sampler.per_epoch() // s.batch_size == 0:
        raise SAMMed3DError(
            f"the training data give no full batch: {len(dataset)} samples for {ctx.world_size} process(es) x "
            f"batch size {s.batch_size}; lower --batch-size or add data")
    logger = RunLogger(s.out, ctx.is_main, s.steps, state["step"])

    def save(path: Path, is_best: bool) -> None:
        if ctx.is_main:
            checkpoints.save_checkpoint(path, {
                "task": task.name, "model": task.trainable_state(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "loop": dict(state),
                "rng": checkpoints.rng_state(), "options": options})
            if on_save is not None:
                on_save(path, is_best)
        barrier(ctx)

    def validate() -> None:
        module.eval()
        score = task.validate(ctx)
        module.train()
        if score is None:
            return
        logger.log(state["step"], {"score": score}, kind="val")
        if state["best"] is None or score > state["best"]:
            state["best"], state["best_step"] = float(score), state["step"]
            save(best_path, True)

    batches = _batches(dataset, sampler, s, state, device)
    module.train()
    stopped = False
    while state["step"] < s.steps:
        if s.stop_at_step is not None and state["step"] >= s.stop_at_step:
            stopped = True
            break
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}
        for micro in range(s.accumulate):
            batch = _to_device(next(batches), device)
            last = micro == s.accumulate - 1
            with (wrapped.no_sync() if ctx.distributed and not last else nullcontext()):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out = task.train_step(wrapped, batch, state["step"])
                scaler.scale(out["loss"] / s.accumulate).backward()
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / s.accumulate
        _fill_missing_grads(params)
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state["step"] += 1
        keys = sorted(sums)
        values = dict(zip(keys, (v / ctx.world_size for v in all_reduce_sum(ctx, [sums[k] for k in keys]))))
        step = state["step"]
        elapsed = time.perf_counter() - start
        values.update(lr=optimizer.param_groups[0]["lr"], step_seconds=elapsed,
                      samples_per_second=s.batch_size * s.accumulate * ctx.world_size / max(elapsed, 1e-9))
        logger.progress(values["loss"])
        if step % max(1, s.log_every) == 0 or step in (1, s.steps) or step == s.stop_at_step:
            logger.log(step, values)
        if s.val_every and step % s.val_every == 0 and step != s.steps:
            validate()
        if step == s.steps:
            validate()
        if (s.save_every and step % s.save_every == 0) or step == s.steps or step == s.stop_at_step:
            save(latest, False)
    batches.close()  # ends the DataLoader's workers
    logger.close()
    return {**state, "stopped": stopped}
