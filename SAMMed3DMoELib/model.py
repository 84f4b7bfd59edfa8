"""The SAM-Med3D network (ViT-B "ori" variant), written so the official checkpoints load with
``strict=True`` and give the official numbers (proved against ``shared/reference`` by the tests).

Three parts, with the official attribute names so that code written for the official model runs
on this one: ``image_encoder`` (a 3D ViT on a 128³ window -> (B, 384, 8, 8, 8)),
``prompt_encoder`` (points, boxes and a low-res mask prompt -> sparse and dense embeddings) and
``mask_decoder`` (a two-way transformer -> (B, 1 or 3, 32, 32, 32) low-res logits + IoU).

The encoder's windowed blocks have two implementations that give the same numbers:

* ``"literal"``: what the official code does: pad the 8³ token grid with zeros to the 14³
  window (after ``norm1``) and attend over all 2744 tokens, without masking.
* ``"fast"`` (default): attend over the 512 real tokens plus one extra key per query that
  stands for all padded tokens at once. A padded token is zero after ``norm1``, so its query,
  key and value are the projection biases ``q_b``, ``k_b``, ``v_b``. For a real query the
  official relative-position bias of key (a, b, c) is ``t_d(c) + t_h(a, c) + t_w(b, c)`` (see
  :func:`rel_pos_bias` for that quirk), so the softmax mass of the padded keys is
  ``exp(scale·q·k_b) · (Σ_c e^{t_d(c)} Σ_a e^{t_h(a,c)} Σ_b e^{t_w(b,c)}`` over the whole
  window minus the same sum over the real part), computed in log space; all padded keys share
  the value ``v_b``. Adding that one key, with its log-mass as an additive bias, is exact.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_MODES = ("fast", "literal")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, X, Y, Z) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (hypernetworks and IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x


# --------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------
def relative_position_table(size: int, rel_pos: Tensor) -> Tensor:
    """(size, size, C) table R[q, k] = rel_pos[q - k + size - 1] for equal query/key sizes."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative position table has {rel_pos.shape[0]} rows, expected {2 * size - 1} "
            f"for a {size}-token axis"
        )
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


def rel_pos_terms(q: Tensor, grid: int, tables: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The three relative-position terms of queries ``q`` (B, grid³, C) on a cubic grid.

    ``tables`` are (rows, K, C) relative position tables (query position along the axis by
    key position). Returns ``t_d[b,d,h,w,k] = q[b,(d,h,w)]·R_d[d,k]``, and ``t_h``, ``t_w``
    likewise with ``R_h[h,k]`` and ``R_w[w,k]``; each (B, grid, grid, grid, K).
    """
    b, _, c = q.shape
    rq = q.reshape(b, grid, grid, grid, c)
    t_d = torch.einsum("bdhwc,dkc->bdhwk", rq, tables[0])
    t_h = torch.einsum("bdhwc,hkc->bdhwk", rq, tables[1])
    t_w = torch.einsum("bdhwc,wkc->bdhwk", rq, tables[2])
    return t_d, t_h, t_w


def rel_pos_bias(t_d: Tensor, t_h: Tensor, t_w: Tensor) -> Tensor:
    """(B, Nq, Nk) additive attention bias, as the official 3D code broadcasts the terms.

    Quirk kept on purpose: the official code indexes the three (B, d, h, w, K) terms into the
    (B, qd, qh, qw, kd, kh, kw) attention map such that, for query (qd, qh, qw) and key
    (a, b, c), the bias is ``t_d[qd,qh,qw,c] + t_h[qd,qh,a,c] + t_w[qd,qh,b,c]``: every term
    is indexed by the key's last coordinate, and the second and third use the query vector of
    another token of the same (qd, qh) row. This is what the released weights were trained with.
    """
    b, d, h, w, k = t_d.shape
    bias = t_d[:, :, :, :, None, None, :] + t_h[:, :, :, None, :, None, :] + t_w[:, :, :, None, None, :, :]
    return bias.reshape(b, d * h * w, -1)


class EncoderAttention(nn.Module):
    """Multi-head self-attention with (the official form of) decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, input_size: Tuple[int, int, int], qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, self.head_dim))

    def _split_heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, self.head_dim).unbind(0)
        return q, k, v

    def _merge_heads(self, out: Tensor, b: int, grid: int) -> Tensor:
        out = out.view(b, self.num_heads, grid, grid, grid, self.head_dim)
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(b, grid, grid, grid, -1)
        return self.proj(out)

    def _tables(self, size: int) -> List[Tensor]:
        return [relative_position_table(size, t) for t in (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)]

    @staticmethod
    def _cubic_grid(x: Tensor) -> int:
        d, h, w = x.shape[1:4]
        if not d == h == w:
            raise ValueError(f"the encoder attends over cubic token grids only, got {d}x{h}x{w}")
        return d

    def forward_literal(self, x: Tensor) -> Tensor:
        """The official computation on a (B, G, G, G, C) token grid (padding included)."""
        b, grid = x.shape[0], self._cubic_grid(x)
        q, k, v = self._split_heads(x.reshape(b, grid ** 3, -1))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + rel_pos_bias(*rel_pos_terms(q, grid, self._tables(grid)))
        return self._merge_heads(attn.softmax(dim=-1) @ v, b, grid)

    def forward_global(self, x: Tensor) -> Tensor:
        """Same result as ``forward_literal`` through the fused attention kernel."""
        b, grid = x.shape[0], self._cubic_grid(x)
        q, k, v = self._split_heads(x.reshape(b, grid ** 3, -1))
        bias = rel_pos_bias(*rel_pos_terms(q, grid, self._tables(grid)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self._merge_heads(out, b, grid)

    def forward_padded_window(self, x: Tensor, window: int) -> Tensor:
        """Exact result of zero-padding ``x`` (B, G, G, G, C) to a ``window``³ grid and attending
        over all of it, computed on the G³ real tokens only (see the module docstring)."""
        b, g = x.shape[0], self._cubic_grid(x)
        q, k, v = self._split_heads(x.reshape(b, g ** 3, -1))
        bh, heads, hd = q.shape[0], self.num_heads, self.head_dim
        dim = heads * hd
        bias_qkv = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * dim)
        # A padded token is zero after norm1: its query, key and value are the biases.
        q_pad, k_pad, v_pad = (
            bias_qkv[i * dim:(i + 1) * dim].reshape(1, heads, 1, hd).expand(b, -1, -1, -1).reshape(bh, 1, hd)
            for i in range(3)
        )
        table_d, table_h, table_w = self._tables(window)
        # Terms over all window key positions; t_h and t_w along their third axis also need the
        # padded tokens' queries (the official broadcast reads them there, see rel_pos_bias).
        t_d, t_h, t_w = rel_pos_terms(q, g, (table_d[:g], table_h[:g], table_w[:g]))
        pad_h = torch.einsum("bc,hkc->bhk", q_pad[:, 0], table_h[:g])  # (BH, qh, K)
        pad_w = torch.einsum("bc,wkc->bwk", q_pad[:, 0], table_w[g:])  # (BH, w >= g, K)
        t_h = torch.cat([t_h, pad_h[:, None, :, None, :].expand(-1, g, -1, window - g, -1)], dim=3)
        t_w = torch.cat([t_w, pad_w[:, None, None, :, :].expand(-1, g, g, -1, -1)], dim=3)

        # log of the summed exp(bias) over all window keys, and over the real keys only.
        lse_full = (t_d + t_h.logsumexp(3)[:, :, :, None, :] + t_w.logsumexp(3)[:, :, :, None, :]).logsumexp(-1)
        lse_real = (
            t_d[..., :g]
            + t_h[:, :, :, :g, :g].logsumexp(3)[:, :, :, None, :]
            + t_w[:, :, :, :g, :g].logsumexp(3)[:, :, :, None, :]
        ).logsumexp(-1)
        log_padded_mass = lse_full + torch.log(-torch.expm1(lse_real - lse_full))

        # The padded region as one extra key: its q·k_b term comes from the kernel, the log of
        # its relative-position mass from the bias.
        real_bias = rel_pos_bias(t_d[..., :g], t_h[:, :, :, :g, :g], t_w[:, :, :, :g, :g])
        bias = torch.cat([real_bias, log_padded_mass.reshape(bh, -1, 1)], dim=-1)
        keys = torch.cat([k, k_pad], dim=1)
        values = torch.cat([v, v_pad], dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        return self._merge_heads(out, b, g)


class EncoderBlock(nn.Module):
    """Transformer block; window attention (with zero padding to the window) or global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        token_grid: Tuple[int, int, int],
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = token_grid if window_size == 0 else (window_size,) * 3
        self.attn = EncoderAttention(dim, num_heads, attn_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size
        self.attention_mode = "fast"

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size == 0:
            x = self.attn.forward_literal(x) if self.attention_mode == "literal" else self.attn.forward_global(x)
        else:
            x = self._windowed(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def _windowed(self, x: Tensor) -> Tensor:
        ws = self.window_size
        grid = x.shape[1:4]
        if self.attention_mode == "fast" and all(g <= ws for g in grid):
            if all(g == ws for g in grid):
                return self.attn.forward_global(x)
            return self.attn.forward_padded_window(x, ws)
        windows, padded = window_partition(x, ws)
        out = self.attn.forward_literal(windows)
        return window_unpartition(out, ws, padded, grid)


def window_partition(x: Tensor, ws: int) -> Tuple[Tensor, Tuple[int, int, int]]:
    """Zero-pad a (B, D, H, W, C) grid to multiples of ``ws`` and cut it into ws³ windows."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % ws, (-h) % ws, (-w) % ws
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition(windows: Tensor, ws: int, padded: Tuple[int, int, int], grid: Sequence[int]) -> Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    dp, hp, wp = padded
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, : grid[0], : grid[1], : grid[2], :].contiguous()


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens, channels last."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """3D ViT: (B, 1, S, S, S) -> (B, out_chans, S/16, S/16, S/16)."""

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                token_grid=(grid, grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def set_attention_mode(self, mode: str) -> None:
        """``"fast"`` (default) or ``"literal"`` (the official padded computation)."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        for block in self.blocks:
            block.attention_mode = mode

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


# --------------------------------------------------------------------------------------------
# Prompt encoder
# --------------------------------------------------------------------------------------------
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


class PromptEncoder3D(nn.Module):
    """Points, boxes and a low-res mask prompt -> sparse (B, N, C) and dense (B, C, 8, 8, 8)."""

    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: Tuple[int, int, int] = (8, 8, 8),
        input_image_size: Tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
        box_prompts: bool = False,
    ) -> None:
        super().__init__()
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
        if masks is not None:
            dense = self.mask_downscaling(masks.to(weight.dtype))
        else:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# --------------------------------------------------------------------------------------------
# Mask decoder
# --------------------------------------------------------------------------------------------
class DecoderAttention(nn.Module):
    """Attention whose projections may shrink the embedding (``downsample_rate``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide the attention's internal dimension")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock3D(nn.Module):
    """Tokens self-attend, attend to the image, MLP, then the image attends to the tokens."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(embedding_dim, num_heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """The decoder's transformer between prompt tokens and image tokens."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim, num_heads, mlp_dim, downsample, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys


class MaskDecoder3D(nn.Module):
    """Image + prompt embeddings -> (B, 1 or 3, 32, 32, 32) mask logits and IoU predictions."""

    def __init__(
        self,
        transformer_dim: int = 384,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Official signature. Returns (masks, iou_pred): mask 0 alone, or masks 1..3."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> Tuple[Tensor, Tensor]:
        """All mask tokens' masks and IoU predictions."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse], dim=1)

        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(src, tokens.shape[0], dim=0)
        src = src + dense
        pos = image_pe
        if pos.shape[0] != tokens.shape[0]:
            pos = torch.repeat_interleave(pos, tokens.shape[0], dim=0)
        b, c, x, y, z = src.shape

        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, x, y, z = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, x * y * z)).reshape(b, -1, x, y, z)
        return masks, self.iou_prediction_head(iou_token_out)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------
class SamMed3D(nn.Module):
    """SAM-Med3D: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (official names)."""

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D, config: dict) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = dict(config)

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def box_prompts(self) -> bool:
        return self.prompt_encoder.box_prompts

    def new_mask_decoder(self) -> MaskDecoder3D:
        """A fresh decoder of this model's size (an expert's architecture)."""
        return build_mask_decoder(self.config)

    def decode(
        self,
        image_embeddings: Tensor,
        points: Optional[Tuple[Tensor, Tensor]] = None,
        boxes: Optional[Tensor] = None,
        mask_logits: Optional[Tensor] = None,
        multimask_output: bool = False,
        decoder: Optional[MaskDecoder3D] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Prompt encoder + a mask decoder (this model's, or an expert's) on cached embeddings."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        return (decoder or self.mask_decoder)(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(
        self,
        image: Tensor,
        points: Optional[Tuple[Tensor, Tensor]] = None,
        boxes: Optional[Tensor] = None,
        mask_logits: Optional[Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Encode a (B, 1, S, S, S) window and decode one prompt set."""
        return self.decode(self.image_encoder(image), points, boxes, mask_logits, multimask_output)


VIT_B_ORI = dict(
    img_size=128,
    patch_size=16,
    encoder_embed_dim=768,
    encoder_depth=12,
    encoder_num_heads=12,
    encoder_global_attn_indexes=(2, 5, 8, 11),
    window_size=14,
    mlp_ratio=4.0,
    prompt_embed_dim=384,
    mask_in_chans=16,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=256,
    decoder_depth=2,
    decoder_heads=8,
    decoder_mlp_dim=2048,
)


def build_mask_decoder(config: dict) -> MaskDecoder3D:
    """A mask decoder for a model ``config`` (as stored in ``SamMed3D.config``)."""
    return MaskDecoder3D(
        transformer_dim=config["prompt_embed_dim"],
        num_multimask_outputs=config["num_multimask_outputs"],
        iou_head_depth=config["iou_head_depth"],
        iou_head_hidden_dim=config["iou_head_hidden_dim"],
        transformer_depth=config["decoder_depth"],
        transformer_heads=config["decoder_heads"],
        transformer_mlp_dim=config["decoder_mlp_dim"],
    )


def build_sam_med3d(box_prompts: bool = False, **size) -> SamMed3D:
    """Build SAM-Med3D. With no size arguments: the official ViT-B "ori" architecture of
    ``sam_med3d_turbo.pth`` (324 state-dict entries; 326 with ``box_prompts=True``).

    Size keywords (smaller models for tests and training): see ``VIT_B_ORI`` for the names.
    The returned model is in eval mode with float32 random weights.
    """
    unknown = set(size) - set(VIT_B_ORI)
    if unknown:
        raise TypeError(f"unknown size argument(s) {sorted(unknown)}; known: {sorted(VIT_B_ORI)}")
    config = {**VIT_B_ORI, **size, "box_prompts": bool(box_prompts)}
    config["encoder_global_attn_indexes"] = tuple(config["encoder_global_attn_indexes"])
    if config["img_size"] % config["patch_size"]:
        raise ValueError("img_size must be a multiple of patch_size")
    if config["prompt_embed_dim"] % 3:
        raise ValueError("prompt_embed_dim must be divisible by 3 (random Fourier features)")
    grid = config["img_size"] // config["patch_size"]
    encoder = ImageEncoderViT3D(
        img_size=config["img_size"],
        patch_size=config["patch_size"],
        embed_dim=config["encoder_embed_dim"],
        depth=config["encoder_depth"],
        num_heads=config["encoder_num_heads"],
        mlp_ratio=config["mlp_ratio"],
        out_chans=config["prompt_embed_dim"],
        window_size=config["window_size"],
        global_attn_indexes=config["encoder_global_attn_indexes"],
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=config["prompt_embed_dim"],
        image_embedding_size=(grid, grid, grid),
        input_image_size=(config["img_size"],) * 3,
        mask_in_chans=config["mask_in_chans"],
        box_prompts=box_prompts,
    )
    model = SamMed3D(encoder, prompt_encoder, build_mask_decoder(config), config)
    return model.eval()
