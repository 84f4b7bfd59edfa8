"""LoRA for the mask decoder's linear layers (Hu et al. 2021), through ``torch.nn.utils.parametrize``.

``peft`` needs ``transformers`` and ``accelerate`` and does not wrap ``ConvTranspose3d``, so the
decoder gets this small version: each targeted ``nn.Linear`` weight W becomes
``W + (alpha / rank) · B @ A`` with ``A`` (rank, in) Kaiming-initialised and ``B`` (out, rank)
zero (so training starts from the original decoder); W and the bias stay frozen. Targets are
matched against the module path (``fnmatch``; a bare name such as ``q_proj`` matches that last
component anywhere). finetune-SAM's default is rank 4 on the attention's q and v projections.
The upscaling convolutions are not LoRA'd: the fine-tuning script trains them fully.
:func:`merge_lora` folds the update into plain ``nn.Linear`` weights before export, so an
expert is an ordinary ``MaskDecoder3D`` state dict.
"""

from __future__ import annotations

import fnmatch
import math
from typing import List, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from SAMMed3DMoELib.errors import SAMMed3DError

DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoRAUpdate(nn.Module):
    """The parametrisation ``W -> W + scale · B @ A`` of one linear weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(alpha) / float(rank)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def _matches(name: str, targets: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(last, t) for t in targets)


def add_lora(module: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 4, alpha: float = 4.0) -> List[str]:
    """Parametrise the ``nn.Linear`` layers of ``module`` whose path matches ``targets``; their
    own weights and biases are frozen. Returns the paths wrapped."""
    if rank < 1:
        raise SAMMed3DError(f"LoRA rank must be at least 1, got {rank}")
    wrapped = []
    for name, layer in list(module.named_modules()):
        if isinstance(layer, nn.Linear) and _matches(name, targets):
            update = LoRAUpdate(layer.out_features, layer.in_features, rank, alpha).to(layer.weight)
            parametrize.register_parametrization(layer, "weight", update)
            layer.parametrizations.weight.original.requires_grad_(False)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
            wrapped.append(name)
    if not wrapped:
        raise SAMMed3DError(f"no linear layer matches the LoRA targets {list(targets)}; "
                            "give names such as q_proj, v_proj, k_proj, out_proj, lin1, lin2")
    return wrapped


def lora_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for name, p in module.named_parameters() if name.endswith(("lora_A", "lora_B"))]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA update into its plain weight (in place) and return ``module``."""
    for layer in module.modules():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return module
