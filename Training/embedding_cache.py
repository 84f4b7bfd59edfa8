"""Image embeddings of a frozen image encoder, computed once per fixed crop and reused.

With both encoders frozen (fine-tuning an expert, training the gate) the image embedding of a
crop never changes, so each of an item's fixed crops (``CropDataset(fixed_crops=K)``) is encoded
the first time it is drawn and read from memory afterwards; only the prompt encoder, the gate
and the decoders run per step. Memory: one ``(C, g, g, g)`` float tensor per (item, crop), e.g.
384 x 8³ x 4 bytes = 0.8 MB at full size, 48 x 2³ x 4 bytes for the test model.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn


class EmbeddingCache:
    """``cache(images, items, variants) -> (B, C, g, g, g)`` embeddings of ``encoder`` (eval
    mode, no gradients). ``enabled=False`` encodes every time (the reference the cache must
    match). Each crop is encoded on its own, so its embedding does not depend on its batch-mates
    (a batched convolution may round differently): cached and recomputed values are identical."""

    def __init__(self, encoder: nn.Module, enabled: bool = True) -> None:
        self.encoder = encoder
        self.enabled = bool(enabled)
        self._store: Dict[Tuple[int, int], Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def __call__(self, images: Tensor, items: Tensor, variants: Tensor) -> Tensor:
        self.encoder.eval()
        if not self.enabled:
            self.misses += images.shape[0]
            return torch.cat([self.encoder(images[i:i + 1]) for i in range(images.shape[0])])
        keys = list(zip(items.tolist(), variants.tolist()))
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        if missing:
            for i in missing:
                self._store[keys[i]] = self.encoder(images[i:i + 1])[0].clone()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._store[key] for key in keys])
