"""The image encoder: a 3D ViT-B on a 128³ window -> (B, 384, 8, 8, 8) image embedding.

Blocks with windowed attention have two implementations that give the same numbers:

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

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LayerNorm3d, MLPBlock

ATTENTION_MODES = ("fast", "literal")


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
