"""What a session keeps between clicks, under one memory budget.

Per window (keyed by its start index on the prepared grid) a session keeps the image embedding
(so later clicks skip the encoder) and the memoised click steps decoded in it (so a new click
replays one step). Both live on the session's compute device and count against one byte budget;
windows are evicted least recently used first, embedding and steps together. The window being
worked on is never evicted, so a budget smaller than one window's entries is exceeded by that
window alone (and only while it is the most recent).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

from torch import Tensor

from .moe import Prediction

WindowKey = Tuple[int, int, int]
Steps = List[Tuple[tuple, Prediction]]
"""Memoised click steps of one window and one set of mixture settings: (step, its prediction)."""


@dataclass
class _Entry:
    embedding: Optional[Tensor] = None
    steps: Dict[Hashable, Steps] = field(default_factory=dict)

    def nbytes(self) -> int:
        total = 0 if self.embedding is None else _tensor_bytes(self.embedding)
        for memo in self.steps.values():
            total += sum(_tensor_bytes(p.logits) + _tensor_bytes(p.iou) for _, p in memo)
        return total


def _tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SessionCache:
    """Image embeddings and memoised click steps per window, under ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._windows: "OrderedDict[WindowKey, _Entry]" = OrderedDict()

    def _entry(self, window: WindowKey) -> _Entry:
        entry = self._windows.get(window)
        if entry is None:
            entry = self._windows[window] = _Entry()
        self._windows.move_to_end(window)
        return entry

    def embedding(self, window: WindowKey) -> Optional[Tensor]:
        """The cached embedding of a window (marks it recently used), or None."""
        entry = self._windows.get(window)
        if entry is None or entry.embedding is None:
            return None
        self._windows.move_to_end(window)
        return entry.embedding

    def put_embedding(self, window: WindowKey, embedding: Tensor) -> None:
        self._entry(window).embedding = embedding
        self.trim(keep=window)

    def steps(self, window: WindowKey, settings: Hashable) -> Steps:
        """The memoised steps of a window under ``settings`` (a list the caller edits; call
        :meth:`trim` afterwards)."""
        entry = self._entry(window)
        memo = entry.steps.pop(settings, [])
        entry.steps[settings] = memo  # most recently used settings last
        return memo

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor cached (embeddings, step logits and IoU predictions)."""
        return sum(entry.nbytes() for entry in self._windows.values())

    @property
    def windows(self) -> List[WindowKey]:
        """Cached windows, least recently used first."""
        return list(self._windows)

    def trim(self, keep: Optional[WindowKey] = None) -> None:
        """Evict least recently used windows (never ``keep``) until the cache fits the budget;
        then drop ``keep``'s steps memoised under other settings if it alone is too large."""
        total = self.nbytes
        for window in list(self._windows):
            if total <= self.budget_bytes:
                return
            if window != keep:
                total -= self._windows.pop(window).nbytes()
        entry = self._windows.get(keep)
        if entry is not None and total > self.budget_bytes and len(entry.steps) > 1:
            newest = next(reversed(entry.steps))
            entry.steps = {newest: entry.steps[newest]}

    def clear(self) -> None:
        self._windows.clear()
