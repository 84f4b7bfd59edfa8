"""Mixture of expert mask decoders (SAM-Med3D-MoE, Wang et al., MICCAI 2024).

The general SAM-Med3D model keeps its image and prompt encoders; each expert is a full
``MaskDecoder3D`` fine-tuned on new targets. Per prompt, a gating network (paper §2.2) scores
``[general, expert_1 .. expert_m]`` from the image embedding and the prompt, and a selector
(paper §2.3) fuses the general mask with the best expert's mask only when that expert is
confident (score above τ). The "general" output is what lets a model say "no expert applies"
and so not forget what the base model could do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import SAMMed3DError
from .geometry import CT_CLAMP, DEFAULT_SPACING, WINDOW_SIZE
from .model import GatingNetwork, MaskDecoder3D, SamMed3D

DEFAULT_PREPROCESSING = {
    "spacing_mm": DEFAULT_SPACING,
    "window": WINDOW_SIZE,
    "ct_clamp": list(CT_CLAMP),
    "normalization": "zscore_nonzero",
}
"""How SAM-Med3D was trained to see images (stored in a bundle's config.json)."""
NORMALIZATIONS = ("zscore_nonzero",)

GENERAL = "general"
AUTO = "auto"
SELECTORS = ("paper", "average", "renormalized")
"""``paper``: (1 − s_top)·σ(L_general) + s_top·σ(L_top) (§2.3); ``average``: the plain mean of
the two; ``renormalized``: weights s_general/(s_general+s_top) and s_top/(s_general+s_top).
All three use the general mask alone when s_top <= τ (the paper's ablation variants)."""


@dataclass
class ExpertInfo:
    """What an expert was fine-tuned for (shown to users, stored in a bundle's config.json)."""

    name: str
    targets: List[str] = field(default_factory=list)
    modality: str = "any"
    description: str = ""


@dataclass
class Prediction:
    """One decoded prompt set: the fused low-res mask and what produced it."""

    logits: Tensor
    """(B, 1, 32, 32, 32) low-res logits of the final mask (the next click's mask prompt)."""
    iou: Tensor
    """(B, 1) IoU prediction of the decoder with the largest weight."""
    decoders: List[str]
    """Decoders that ran, in order ("general" and/or expert names)."""
    weights: Dict[str, float]
    """Weight of each decoder's sigmoid mask in the final mask (sums to 1)."""
    scores: Optional[Dict[str, float]]
    """Gate scores over general and the experts (first batch item), or None without a gate."""

    @property
    def probability(self) -> Tensor:
        return torch.sigmoid(self.logits)


def fuse(general: Tensor, expert: Tensor, s_general: float, s_top: float, tau: float, selector: str) -> Tuple[Tensor, Dict[str, float]]:
    """The selector of §2.3 on low-res logits. Returns (fused logits, {"general": w, "expert": w})."""
    if selector not in SELECTORS:
        raise SAMMed3DError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    if s_top <= tau:
        return general, {"general": 1.0, "expert": 0.0}
    if selector == "paper":
        w_expert = s_top
    elif selector == "average":
        w_expert = 0.5
    else:
        w_expert = s_top / (s_general + s_top)
    probability = (1.0 - w_expert) * torch.sigmoid(general) + w_expert * torch.sigmoid(expert)
    return probability_to_logits(probability), {"general": 1.0 - w_expert, "expert": w_expert}


def probability_to_logits(probability: Tensor) -> Tensor:
    """Inverse sigmoid, clamped so a certain voxel stays a finite logit (about ±13.8)."""
    eps = 1e-6
    return torch.logit(probability.clamp(eps, 1.0 - eps))


class SamMed3DMoE(nn.Module):
    """SAM-Med3D plus expert decoders and a gate. With no experts it is plain SAM-Med3D."""

    def __init__(
        self,
        base: SamMed3D,
        experts: Optional[Dict[str, MaskDecoder3D]] = None,
        gate: Optional[GatingNetwork] = None,
        expert_info: Optional[Dict[str, ExpertInfo]] = None,
        tau: float = 0.5,
        selector: str = "paper",
        preprocessing: Optional[dict] = None,
        box_prompts_trained: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.preprocessing = {**DEFAULT_PREPROCESSING, "window": base.img_size, **(preprocessing or {})}
        self.experts = nn.ModuleDict(experts or {})
        self.gate = gate
        self.expert_info = {name: (expert_info or {}).get(name, ExpertInfo(name)) for name in self.experts}
        if selector not in SELECTORS:
            raise SAMMed3DError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
        self.tau = float(tau)
        self.selector = selector
        self.box_prompts_trained = bool(box_prompts_trained) and base.box_prompts
        """Whether the base's box-prompt embeddings were trained. False (the default) for models
        without them and for checkpoints whose training fed no boxes (the CVPR 2025 line, the
        "bbox init" starting point): the session then turns a box into a click at its centre.
        A bundle stores it in config.json (``base.box_prompts_trained``)."""
        self._check_gate()

    def _check_gate(self) -> None:
        if self.gate is not None and self.gate.num_experts != len(self.experts):
            raise SAMMed3DError(
                f"the gate scores {self.gate.num_experts} expert(s) but the model has {len(self.experts)}; "
                "the bundle is inconsistent: re-export it or retrain the gate"
            )
        for name in self.experts:
            if name in (GENERAL, AUTO):
                raise SAMMed3DError(f"an expert may not be called {name!r} (reserved)")

    @property
    def expert_names(self) -> List[str]:
        return list(self.experts.keys())

    def encode(self, image: Tensor) -> Tensor:
        """(B, 1, 128, 128, 128) normalised window -> (B, 384, 8, 8, 8) image embedding."""
        return self.base.image_encoder(image)

    def add_expert(self, name: str, decoder: MaskDecoder3D, info: Optional[ExpertInfo] = None) -> None:
        """Add an expert; the gate (if any) gets an output that never selects it until retrained."""
        if name in self.experts or name in (GENERAL, AUTO):
            raise SAMMed3DError(f"an expert named {name!r} already exists or the name is reserved; pick another name")
        self.experts[name] = decoder
        self.expert_info[name] = info or ExpertInfo(name)
        if self.gate is not None:
            self.gate.resize_outputs(range(len(self.experts)), new=1)

    def remove_expert(self, name: str) -> None:
        """Remove an expert and its gate output; the other experts keep their scores' logits."""
        if name not in self.experts:
            raise SAMMed3DError(f"no expert named {name!r}; the model has: {', '.join(self.expert_names) or 'none'}")
        index = self.expert_names.index(name)
        del self.experts[name]
        del self.expert_info[name]
        if self.gate is not None:
            self.gate.resize_outputs([0] + [i + 1 for i in range(len(self.experts) + 1) if i != index])

    def gate_scores(self, image_embeddings: Tensor, sparse: Tensor, prompt_mask: Tensor) -> Optional[Tensor]:
        """(B, m+1) softmax scores, or None when there is no gate or no expert."""
        if self.gate is None or not self.experts:
            return None
        return self.gate.scores(image_embeddings, self.base.prompt_encoder.get_dense_pe(), sparse, prompt_mask)

    def predict(
        self,
        image_embeddings: Tensor,
        points: Optional[Tuple[Tensor, Tensor]] = None,
        boxes: Optional[Tensor] = None,
        mask_logits: Optional[Tensor] = None,
        expert: str = AUTO,
        tau: Optional[float] = None,
        selector: Optional[str] = None,
    ) -> Prediction:
        """Decode one prompt set on cached image embeddings.

        ``expert``: ``"auto"`` (gate + selector), ``"general"`` (the base model only) or an
        expert's name (that expert only). Only the decoders that contribute run. ``tau`` and
        ``selector`` override the model's for this call (a session's own settings; the model
        is not changed).
        """
        tau = self.tau if tau is None else float(tau)
        selector = self.selector if selector is None else selector
        prompt_encoder = self.base.prompt_encoder
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        pe = prompt_encoder.get_dense_pe()
        scores = self.gate_scores(image_embeddings, sparse, self.prompt_mask(points, boxes, sparse))
        score_dict = None
        if scores is not None:
            score_dict = {name: float(s) for name, s in zip([GENERAL] + self.expert_names, scores[0].tolist())}

        def run(name: str) -> Tuple[Tensor, Tensor]:
            decoder = self.base.mask_decoder if name == GENERAL else self.experts[name]
            return decoder(image_embeddings=image_embeddings, image_pe=pe, sparse_prompt_embeddings=sparse,
                           dense_prompt_embeddings=dense, multimask_output=False)

        if expert not in (AUTO, GENERAL) and expert not in self.experts:
            raise SAMMed3DError(
                f"no expert named {expert!r}; choose auto, general or one of: {', '.join(self.expert_names) or '(none)'}"
            )
        if expert != AUTO:
            logits, iou = run(expert)
            return Prediction(logits, iou, [expert], {expert: 1.0}, score_dict)

        general_logits, general_iou = run(GENERAL)
        if scores is None:
            return Prediction(general_logits, general_iou, [GENERAL], {GENERAL: 1.0}, None)
        # Decisions are per prompt set; batched prompts use the first item's choice.
        top = int(scores[0, 1:].argmax()) + 1
        top_name = self.expert_names[top - 1]
        s_general, s_top = float(scores[0, 0]), float(scores[0, top])
        if s_top <= tau:
            return Prediction(general_logits, general_iou, [GENERAL], {GENERAL: 1.0}, score_dict)
        expert_logits, expert_iou = run(top_name)
        logits, w = fuse(general_logits, expert_logits, s_general, s_top, tau, selector)
        iou = expert_iou if w["expert"] >= w["general"] else general_iou
        return Prediction(logits, iou, [GENERAL, top_name], {GENERAL: w["general"], top_name: w["expert"]}, score_dict)

    @staticmethod
    def prompt_mask(points: Optional[Tuple[Tensor, Tensor]], boxes: Optional[Tensor], sparse: Tensor) -> Tensor:
        """(B, N) bool: True for the sparse tokens of real prompts (not the padding point), as the
        gate pools them; ``sparse`` (B, N, C) is the prompt encoder's output for these prompts."""
        parts = []
        if points is not None:
            parts.append(points[1] != -1)
            if boxes is None:  # the prompt encoder appended a padding point
                parts.append(torch.zeros_like(points[1][:, :1], dtype=torch.bool))
        if boxes is not None:
            parts.append(torch.ones(sparse.shape[0], 2, dtype=torch.bool, device=sparse.device))
        mask = torch.cat(parts, dim=1) if parts else torch.zeros(sparse.shape[:2], dtype=torch.bool)
        return mask.to(sparse.device)
