"""Does a model segment the structure that was clicked, or the one at the window's centre?

One window is opened centred on one structure (as the session opens it on a first click there);
then each of several structures in that window gets one positive click at its most interior
voxel, decoded on the same image embedding. A model that follows the click answers with a mask
on the clicked structure; one that learned "segment what is at the centre" answers with the
centre structure every time.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from SAMMed3DMoELib import clicks, geometry, windows
from SAMMed3DMoELib.moe import GENERAL
from Training.data import crop_label


CENTRES = ("spleen", "liver", "kidney_left", "vertebrae_L3", "stomach")
"""Structures of the example CT that the scored windows are centred on."""
STRUCTURES = ("spleen", "kidney_left", "stomach", "colon", "liver", "vertebrae_L1", "kidney_right",
              "lung_lower_lobe_left", "iliopsoas_left", "vertebrae_L3")
"""Structures clicked in each window (classes of the demo's general model)."""


def _most_interior(mask: np.ndarray) -> np.ndarray:
    return np.asarray(clicks.first_click(mask, mode="center").index)


def clicked_structures(model, volume: geometry.Volume, label: np.ndarray, ids: Dict[str, int], centre: str,
                       classes: Sequence[str], expert: str = GENERAL, modality: str = "CT") -> Dict[str, str]:
    """{clicked class: the class its mask overlaps most} in a window centred on ``centre``.

    ``label`` is the reference label map on ``volume``'s grid; ``ids`` maps class names to label
    ids. Classes with fewer than 64 voxels in the window are left out."""
    pre = model.preprocessing
    prepared = geometry.prepare_volume(volume, spacing=pre["spacing_mm"], modality=modality,
                                       ct_clamp=pre.get("ct_clamp"))
    on_grid = geometry.resample_label(label, volume, prepared)
    size = int(pre["window"])
    window = windows.Window(tuple(int(i) - size // 2 for i in _most_interior(on_grid == ids[centre])), size)
    crop = crop_label(on_grid, window)
    image = windows.extract_window_tensor(prepared, window, "cpu")[None, None]
    lowres = model.base.prompt_encoder.mask_input_size
    answers = {}
    with torch.inference_mode():
        embedding = model.encode(image)
        for name in classes:
            target = crop == ids[name]
            if target.sum() < 64:
                continue
            point = torch.tensor(_most_interior(target)[None, None], dtype=torch.float32)
            prediction = model.predict(embedding, points=(point, torch.ones((1, 1), dtype=torch.long)),
                                       mask_logits=torch.zeros((1, 1) + tuple(lowres)), expert=expert)
            logits = torch.nn.functional.interpolate(prediction.logits.float(), size=(size,) * 3, mode="trilinear")
            mask = logits[0, 0].numpy() > 0
            overlaps = {other: int((mask & (crop == ids[other])).sum()) for other in classes}
            answers[name] = max(overlaps, key=overlaps.get)
    return answers


def click_following_score(model, volume: geometry.Volume, label: np.ndarray, ids: Dict[str, int],
                          expert: str = GENERAL) -> Tuple[int, int]:
    """(clicks whose mask lies mostly on the clicked structure, clicks) over windows centred on
    each of CENTRES, each clicked on every one of STRUCTURES that it shows."""
    hits = total = 0
    for centre in CENTRES:
        answers = clicked_structures(model, volume, label, ids, centre, STRUCTURES, expert=expert)
        hits += sum(clicked == found for clicked, found in answers.items())
        total += len(answers)
    return hits, total
