"""SAM-Med3D's iterative prompting as training modules (one forward = one whole prompting loop,
so that ``DistributedDataParallel.forward`` runs and really averages the gradients).

The official recipe (``train.py`` of SAM-Med3D), kept here:

* 11 prompt iterations per sample; iteration k gives the decoder the *newest* click only and the
  previous iteration's low-res logits as the mask prompt; two iterations (the last one and one
  drawn in 2..8) get no click (mask prompt only);
* clicks come from :func:`SAMMed3DMoELib.clicks.sample_clicks` (first uniform in the target,
  then uniform in the error region; FN -> positive, FP -> negative);
* ``DiceCELoss(sigmoid=True, squared_pred=True)`` on the logits upsampled to the window,
  summed over the iterations.

With a box (``PromptPlan.box``) the box is part of every iteration (as in a session) and the
first iteration has the box alone. For the gate (:class:`GateTraining`) every iteration has a
prompt (the gate scores prompts, and a mask-only step has none): a click, or with a box the box
alone first and then the box with each click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from SAMMed3DMoELib import clicks, metrics
from SAMMed3DMoELib.model import MaskDecoder3D, SamMed3D
from SAMMed3DMoELib.moe import SamMed3DMoE, probability_to_logits

from .data import sample_seed


@dataclass(frozen=True)
class PromptPlan:
    """How one optimisation step prompts (the same on every rank and every sample of the step)."""

    iterations: int = 11
    mask_only: FrozenSet[int] = frozenset()
    box: bool = False


def plan_for_step(seed: int, step: int, iterations: int = 11, mask_only: int = 2, box_prob: float = 0.0) -> PromptPlan:
    """The step's plan: the last iteration and ``mask_only - 1`` iterations drawn from 2..n-2 are
    mask-only (official: 11 iterations, the last and one of 2..8); with probability
    ``box_prob`` the step uses a box."""
    rng = np.random.default_rng(sample_seed(seed, step, 3))
    chosen = set()
    if mask_only >= 1 and iterations > 1:
        chosen.add(iterations - 1)
    pool = list(range(2, iterations - 1))
    k = min(max(0, mask_only - 1), len(pool))
    if k:
        chosen |= {int(v) for v in rng.choice(pool, size=k, replace=False)}
    return PromptPlan(int(iterations), frozenset(chosen), bool(rng.random() < box_prob))


def dice_ce_loss():
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")


def upsample(lowres: Tensor, size: int) -> Tensor:
    """(B, 1, L, L, L) low-res logits -> (B, 1, size, size, size), trilinear (as the session)."""
    return F.interpolate(lowres.float(), size=(size,) * 3, mode="trilinear", align_corners=False)


class InteractiveSegmentation(nn.Module):
    """SAM-Med3D (``decoder``: its own mask decoder, or an expert's) under iterative prompting.

    ``forward(image, target, click_u, box_jitter, plan, embeddings=None)``: ``image`` and
    ``target`` (B, 1, S, S, S); ``click_u`` (B, iterations) uniform numbers; ``box_jitter``
    (B, 2, 3); ``embeddings`` (B, C, g, g, g) replaces the encoder (frozen encoder, cached).
    Returns ``{"loss": summed DiceCE, "iteration_losses": (iterations,)}``. The encoder runs
    with gradients only when some of its parameters train."""

    def __init__(self, model: SamMed3D, decoder: Optional[MaskDecoder3D] = None) -> None:
        super().__init__()
        self.model = model
        self.decoder = decoder if decoder is not None else model.mask_decoder
        self.loss_fn = dice_ce_loss()

    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.model.image_encoder.parameters())

    def forward(self, image: Tensor, target: Tensor, click_u: Tensor, box_jitter: Tensor, plan: PromptPlan,
                embeddings: Optional[Tensor] = None) -> Dict[str, Tensor]:
        if embeddings is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains()):
                embeddings = self.model.image_encoder(image)
        prompt_encoder = self.model.prompt_encoder
        size = target.shape[-1]
        truth = target > 0.5
        lowres = target.new_zeros((target.shape[0], 1) + tuple(prompt_encoder.mask_input_size))
        full = torch.zeros_like(target)
        boxes = clicks.bounding_boxes(truth, box_jitter) if plan.box else None
        pe = prompt_encoder.get_dense_pe()
        total, losses = 0.0, []
        for it in range(plan.iterations):
            points = None
            if it not in plan.mask_only and not (boxes is not None and it == 0):
                with torch.no_grad():
                    points = clicks.sample_clicks(full.detach() > 0, truth, click_u[:, it])
            sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=lowres)
            lowres, _ = self.decoder(embeddings, pe, sparse, dense, multimask_output=False)
            full = upsample(lowres, size)
            loss = self.loss_fn(full, target.float())
            total = total + loss
            losses.append(loss.detach())
        return {"loss": total, "iteration_losses": torch.stack(losses)}


class GateTraining(nn.Module):
    """The gate of a mixture (and optionally each prompt's top-1 expert) under iterative clicks.

    Per iteration: cross-entropy of the gate's scores against the expert label (0 = general) plus
    DiceCE on the fused mask ``(1 - s_top)·σ(L_general) + s_top·σ(L_top)`` (paper §2.3 without
    the threshold τ, which is chosen afterwards on validation data). ``decoder_weights``
    (m+1,), or None: the cross-entropy weight of each decoder's label
    (:func:`balanced_decoder_weights`). The next click and mask prompt come from the fused mask,
    as in a session."""

    def __init__(self, moe: SamMed3DMoE, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 decoder_weights: Optional[Tensor] = None) -> None:
        super().__init__()
        self.moe = moe
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.loss_fn = dice_ce_loss()
        self.register_buffer("decoder_weights", decoder_weights, persistent=False)

    def forward(self, image: Tensor, target: Tensor, expert: Tensor, click_u: Tensor, iterations: int,
                embeddings: Optional[Tensor] = None, box_jitter: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``box_jitter`` (B, 2, 3), or None: with it, a box around the target (corners moved by
        the jitter) is part of every iteration, alone in the first."""
        moe, base = self.moe, self.moe.base
        if embeddings is None:
            with torch.no_grad():
                embeddings = base.image_encoder(image)
        size = target.shape[-1]
        truth = target > 0.5
        lowres = target.new_zeros((target.shape[0], 1) + tuple(base.prompt_encoder.mask_input_size))
        full = torch.zeros_like(target)
        pe = base.prompt_encoder.get_dense_pe()
        experts = [moe.experts[name] for name in moe.expert_names]
        boxes = None if box_jitter is None else clicks.bounding_boxes(truth, box_jitter)
        total, correct = 0.0, 0.0
        for it in range(iterations):
            with torch.no_grad():
                points = None
                if boxes is None or it > 0:
                    points = clicks.sample_clicks(full.detach() > 0, truth, click_u[:, it])
                sparse, dense = base.prompt_encoder(points=points, boxes=boxes, masks=lowres)
                general = base.mask_decoder(embeddings, pe, sparse, dense)[0]
            logits = moe.gate(embeddings, pe, sparse, SamMed3DMoE.prompt_mask(points, boxes, sparse))
            scores = logits.softmax(-1)
            top = scores[:, 1:].argmax(-1) + 1
            s_top = scores.gather(1, top[:, None]).view(-1, 1, 1, 1, 1)
            with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for e in experts for p in e.parameters())):
                expert_logits = torch.stack([e(embeddings, pe, sparse, dense)[0] for e in experts])
            chosen = expert_logits[top - 1, torch.arange(top.shape[0], device=top.device)]
            fused = probability_to_logits((1 - s_top) * torch.sigmoid(general) + s_top * torch.sigmoid(chosen))
            full = upsample(fused, size)
            ce = F.cross_entropy(logits, expert, weight=self.decoder_weights)
            loss = self.ce_weight * ce + self.dice_weight * self.loss_fn(full, target.float())
            total = total + loss
            correct = correct + (logits.argmax(-1) == expert).float().mean().detach()
            lowres = fused.detach()
        return {"loss": total, "gate_accuracy": correct / iterations}


def balanced_decoder_weights(labels: Sequence[int], num_decoders: int) -> Tensor:
    """(num_decoders,) cross-entropy weights that give each decoder's items the same total
    weight (``n / (k · n_d)`` over the k decoders that have items; 1 for a decoder without
    items). Without them a gate trained on, say, 20 general items and 5 of an expert learns to
    answer "general" for every CT prompt."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_decoders).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_decoders)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


# ------------------------------------------------------------------------------- inference-time loop


Decode = Callable[[Tensor, Tuple[Tensor, Tensor], Optional[Tensor], Tensor], Tensor]


@torch.no_grad()
def click_dice(decode: Decode, embeddings: Tensor, target: Tensor, click_u: Tensor, n_clicks: int,
               lowres_size: Sequence[int]) -> List[List[float]]:
    """Dice (via :mod:`SAMMed3DMoELib.metrics`) of each sample after each of ``n_clicks`` clicks,
    replayed as a session does (newest click + previous low-res logits; clicks from the error
    region). ``decode(embeddings, points, boxes, mask_logits) -> low-res logits``. Returns
    ``[click][sample]``."""
    size = target.shape[-1]
    truth = target > 0.5
    lowres = target.new_zeros((target.shape[0], 1) + tuple(lowres_size))
    full = torch.zeros_like(target)
    out = []
    for k in range(n_clicks):
        points = clicks.sample_clicks(full > 0, truth, click_u[:, k])
        lowres = decode(embeddings, points, None, lowres)
        full = upsample(lowres, size)
        out.append([metrics.dice(full[i, 0] > 0, truth[i, 0]) for i in range(target.shape[0])])
    return out
