"""The gating network of SAM-Med3D-MoE (Wang et al., MICCAI 2024, §2.2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock
from .transformer import DecoderAttention


class GatingNetwork(nn.Module):
    """Scores [general, expert_1..expert_m] from image tokens and the pooled prompt (§2.2).

    The pooled prompt token self-attends, cross-attends to the image (prompt as query), goes
    through an MLP, then the image cross-attends to it (image as query); each step is residual
    + LayerNorm. The prompt token and the mean image token are concatenated and passed through
    two fully connected layers; ``forward`` returns logits, ``scores`` their softmax.
    """

    def __init__(self, embed_dim: int, num_experts: int, num_heads: int = 8, mlp_dim: int = 1024, hidden_dim: int = 256) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.hidden_dim = hidden_dim
        self.self_attn = DecoderAttention(embed_dim, num_heads)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn_prompt_to_image = DecoderAttention(embed_dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.cross_attn_image_to_prompt = DecoderAttention(embed_dim, num_heads, downsample_rate=2)
        self.norm4 = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(2 * embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_experts + 1)

    @property
    def num_experts(self) -> int:
        return self.fc2.out_features - 1

    def config(self) -> dict:
        """Constructor arguments, for saving."""
        return dict(embed_dim=self.embed_dim, num_experts=self.num_experts, num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim, hidden_dim=self.hidden_dim)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, prompt_mask: Tensor) -> Tensor:
        """``image_embeddings`` (B, C, X, Y, Z), ``image_pe`` (1, C, X, Y, Z), ``sparse`` (B, N, C)
        prompt tokens, ``prompt_mask`` (B, N) True for real prompts. Returns (B, m+1) logits."""
        weights = prompt_mask.to(sparse.dtype)[..., None]
        count = weights.sum(1, keepdim=True).clamp_min(1.0)
        prompt = (sparse * weights).sum(1, keepdim=True) / count  # (B, 1, C)
        image = image_embeddings.flatten(2).transpose(1, 2)
        pos = image_pe.flatten(2).transpose(1, 2).to(image.dtype)
        if image.shape[0] != prompt.shape[0]:
            image = image.expand(prompt.shape[0], -1, -1)
        prompt = self.norm1(prompt + self.self_attn(prompt, prompt, prompt))
        prompt = self.norm2(prompt + self.cross_attn_prompt_to_image(prompt, image + pos, image))
        prompt = self.norm3(prompt + self.mlp(prompt))
        image = self.norm4(image + self.cross_attn_image_to_prompt(image + pos, prompt, prompt))
        pooled = torch.cat([prompt[:, 0], image.mean(1)], dim=-1)
        return self.fc2(F.relu(self.fc1(pooled)))

    def scores(self, *args: Tensor) -> Tensor:
        """Softmax of :meth:`forward`."""
        return self.forward(*args).softmax(-1)

    def resize_outputs(self, keep: Sequence[int], new: int = 0) -> None:
        """Keep the output rows ``keep`` (0 = general) in that order and append ``new`` rows.

        New rows start with zero weights and a very negative bias, so an added expert is never
        picked until the gate is trained again: adding an expert cannot change old results.
        """
        old = self.fc2
        fc2 = nn.Linear(old.in_features, len(keep) + new).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            fc2.weight.zero_()
            fc2.bias.fill_(-30.0)
            index = torch.tensor(list(keep), dtype=torch.long, device=old.weight.device)
            fc2.weight[: len(keep)] = old.weight[index]
            fc2.bias[: len(keep)] = old.bias[index]
        self.fc2 = fc2
