"""The prompt encoder: points, boxes and a low-res mask prompt -> sparse and dense embeddings."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of 3D coordinates, concatenated as [sin, cos, sin]."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _encode(self, coords: Tensor) -> Tensor:
        """Encode coordinates normalised to [0, 1] (..., 3) -> (..., 3 * num_pos_feats)."""
        matrix = self.positional_encoding_gaussian_matrix
        coords = (2 * coords.to(matrix.dtype) - 1) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Tuple[int, int, int]) -> Tensor:
        """Dense encoding of a grid, (C, X, Y, Z). Keeps the official swap of the first two
        axes: the value at [a, b, c] encodes the point (b, a, c)."""
        x, y, z = size
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones((x, y, z), device=matrix.device, dtype=matrix.dtype)
        along0 = (grid.cumsum(dim=0) - 0.5) / y
        along1 = (grid.cumsum(dim=1) - 0.5) / x
        along2 = (grid.cumsum(dim=2) - 0.5) / z
        return self._encode(torch.stack([along1, along0, along2], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: Tensor, image_size: Tuple[int, int, int]) -> Tensor:
        """Encode (B, N, 3) coordinates given in voxels of an ``image_size`` input."""
        scale = torch.tensor(image_size, dtype=coords.dtype, device=coords.device)
        return self._encode(coords / scale)


CLICK_MARK_LOGIT = 10.0
"""Logit written into the mask prompt around a click (+ positive, - negative) when click marks are on."""


class PromptEncoder3D(nn.Module):
    """Points, boxes and a low-res mask prompt -> sparse (B, N, C) and dense (B, C, 8, 8, 8).

    ``click_mark_radius`` > 0 (voxels of the input window; 0 in the official networks) also marks
    each click in the mask prompt: a ball of that radius set to +CLICK_MARK_LOGIT (positive) or
    -CLICK_MARK_LOGIT (negative) over the given low-res logits (zeros when there are none). The
    mask prompt reaches the image embedding through convolutions, on the grid itself, so a model
    trained so can tell which structure a click is on without learning it from the points'
    positional codes alone."""

    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: Tuple[int, int, int] = (8, 8, 8),
        input_image_size: Tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
        box_prompts: bool = False,
        click_mark_radius: float = 0.0,
    ) -> None:
        super().__init__()
        self.click_mark_radius = float(click_mark_radius)
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.box_prompts = box_prompts
        # 0: negative point, 1: positive point, (2, 3: box corners when box_prompts).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4 if box_prompts else 2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid, (1, C, 8, 8, 8)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        points = points + 0.5  # voxel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight.to(embedding.dtype), embedding)
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1) * self.point_embeddings[1].weight
        return embedding

    def mark_clicks(self, masks: Optional[Tensor], coords: Tensor, labels: Tensor) -> Tensor:
        """(B, 1, *mask_input_size) logits: ``masks`` (or zeros) with a ball of radius
        ``click_mark_radius`` input voxels set to ±CLICK_MARK_LOGIT around each positive (label 1)
        or negative (label 0) click of ``coords`` (B, N, 3) voxel indices of the input window."""
        size = self.mask_input_size
        if masks is None:
            masks = coords.new_zeros((coords.shape[0], 1) + size)
        scale = torch.tensor([m / i for m, i in zip(size, self.input_image_size)], dtype=coords.dtype,
                             device=coords.device)
        centres = (coords + 0.5) * scale - 0.5  # low-res voxel indices
        axes = [torch.arange(n, dtype=coords.dtype, device=coords.device) for n in size]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3)
        radius = self.click_mark_radius * float(scale.min())
        inside = ((grid[None, None] - centres[:, :, None, None, None, :]) ** 2).sum(-1) <= radius ** 2
        for label, value in ((1, CLICK_MARK_LOGIT), (0, -CLICK_MARK_LOGIT)):
            hit = (inside & (labels == label)[:, :, None, None, None]).any(dim=1)[:, None]
            masks = torch.where(hit, masks.new_tensor(value), masks)
        return masks

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        if not self.box_prompts:
            raise ValueError(
                "this checkpoint has no box prompt embeddings; use a box-prompt checkpoint "
                "(build_sam_med3d(box_prompts=True)) or give points instead of a box"
            )
        corners = boxes.reshape(-1, 2, 3) + 0.5
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return embedding + corner_embed

    def forward(
        self,
        points: Optional[Tuple[Tensor, Tensor]] = None,
        boxes: Optional[Tensor] = None,
        masks: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Official signature: ``points=(coords (B,N,3), labels (B,N))``, ``boxes`` (B,2,3) corners
        or (B,6), ``masks`` (B,1,32,32,32) logits. Labels: 1 positive, 0 negative, -1 padding."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((bs, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords.to(weight.dtype), labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes.to(weight.dtype))], dim=1)
        if points is not None and self.click_mark_radius > 0:
            masks = self.mark_clicks(masks, points[0].to(weight.dtype), points[1])
        if masks is not None:
            dense = self.mask_downscaling(masks.to(weight.dtype))
        else:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
