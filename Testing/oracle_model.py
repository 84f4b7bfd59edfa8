"""An oracle network: a documented stand-in for a trained SAM-Med3D, for tests that need to know
what the right mask is (a trained checkpoint cannot live in the repository, and random weights
give masks nobody can predict).

It is a real ``SamMed3D`` built from three real ``nn.Module`` parts with the interfaces of the
official ones, so the session drives it exactly as it drives the real network (windows,
normalisation, click replay, mask prompts, neighbouring windows, mapping back):

* :class:`OracleImageEncoder` packs the normalised window's intensities into the image embedding:
  a stride-4 convolution whose one-hot kernels move every voxel of a 4³ block into its own channel
  (``(B, 1, S, S, S) -> (B, 66, S/4, S/4, S/4)``; 64 channels carry the voxels, 2 are zero because
  the prompt encoder's width must be divisible by 3). With a patch size of 4 the low-res mask
  grid (4 x the embedding grid) is the window itself, so nothing is lost on the way back.
* :class:`OraclePromptEncoder` hands the clicks through: sparse token ``n`` carries the point's
  window coordinates in channels 0-2 and its label in channel 3 (1 positive, 0 negative,
  -1 padding), like the real encoder's tokens but readable. It has no box embeddings.
* :class:`OracleMaskDecoder` unpacks the intensities (the transposed convolution with the same
  kernels) and returns them as logits: the mask is "brighter than the window's mean", the
  normalisation's zero. A negative click excludes the tissue under it: the mask keeps only voxels
  brighter than the voxel under any negative click in the window. The mask prompt is ignored.

So on an image whose intensities are 1 outside and 2 inside an organ (the window z-scored over its
voxels > 0), the mask of every window is exactly the organ's voxels in that window, and a stitched
multi-window mask can be checked voxel for voxel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.model import SamMed3D
from SAMMed3DMoELib.moe import SamMed3DMoE

BLOCK = 4
CHANNELS = BLOCK ** 3 + 2
GAIN = 10.0


def _one_hot_kernels() -> Tensor:
    """(64, 1, 4, 4, 4): kernel c picks voxel c of a 4³ block."""
    return torch.eye(BLOCK ** 3).reshape(BLOCK ** 3, 1, BLOCK, BLOCK, BLOCK)


class OracleImageEncoder(nn.Module):
    """Normalised window (B, 1, S, S, S) -> embedding (B, 66, S/4, S/4, S/4) holding every voxel."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.pack = nn.Conv3d(1, CHANNELS, kernel_size=BLOCK, stride=BLOCK, bias=False)
        with torch.no_grad():
            self.pack.weight.zero_()
            self.pack.weight[: BLOCK ** 3] = _one_hot_kernels()

    def forward(self, image: Tensor) -> Tensor:
        return self.pack(image)


class OraclePromptEncoder(nn.Module):
    """Points -> readable sparse tokens (B, N + 1, 66): channels 0-2 the window coordinates,
    channel 3 the label (the real encoder's padding point is appended, label -1)."""

    box_prompts = False

    def __init__(self, img_size: int) -> None:
        super().__init__()
        grid = img_size // BLOCK
        self.image_embedding_size = (grid,) * 3
        self.mask_input_size = (img_size,) * 3

    def get_dense_pe(self) -> Tensor:
        return torch.zeros((1, CHANNELS) + self.image_embedding_size)

    def forward(self, points: Optional[Tuple[Tensor, Tensor]] = None, boxes: Optional[Tensor] = None,
                masks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if boxes is not None:
            raise ValueError("the oracle has no box prompt")
        batch = points[0].shape[0] if points is not None else (masks.shape[0] if masks is not None else 1)
        sparse = torch.zeros((batch, 1, CHANNELS))
        sparse[:, 0, 3] = -1  # the padding point
        if points is not None:
            coords, labels = points
            tokens = torch.zeros((batch, coords.shape[1], CHANNELS))
            tokens[..., :3] = coords.float().cpu()
            tokens[..., 3] = labels.float().cpu()
            sparse = torch.cat([tokens, sparse], dim=1)
        dense = torch.zeros((batch, CHANNELS) + self.image_embedding_size)
        device = points[0].device if points is not None else (masks.device if masks is not None else sparse.device)
        return sparse.to(device), dense.to(device)


class OracleMaskDecoder(nn.Module):
    """Embedding + readable tokens -> logits (B, 1, S, S, S) = GAIN x (intensity - threshold),
    the threshold being 0 or the intensity under the brightest negative click."""

    def __init__(self) -> None:
        super().__init__()
        self.unpack = nn.ConvTranspose3d(CHANNELS, 1, kernel_size=BLOCK, stride=BLOCK, bias=False)
        with torch.no_grad():
            self.unpack.weight.zero_()
            self.unpack.weight[: BLOCK ** 3] = _one_hot_kernels()

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool = False) -> Tuple[Tensor, Tensor]:
        intensity = self.unpack(image_embeddings)  # (B, 1, S, S, S)
        size = intensity.shape[-1]
        logits = []
        for b in range(intensity.shape[0]):
            threshold = intensity.new_zeros(())
            for token in sparse_prompt_embeddings[b]:
                if float(token[3]) == 0:  # a negative click
                    i, j, k = (int(np.clip(np.floor(float(c) + 0.5), 0, size - 1)) for c in token[:3])
                    threshold = torch.maximum(threshold, intensity[b, 0, i, j, k])
            logits.append(GAIN * (intensity[b] - threshold))
        iou = intensity.new_ones((intensity.shape[0], 1))
        return torch.stack(logits), iou


def oracle_moe(img_size: int = 32, spacing_mm: float = 3.0) -> SamMed3DMoE:
    """The oracle as a model a session takes: ``img_size``³ windows on a ``spacing_mm`` grid
    (3 mm: the example CT's own grid, so preparing the volume does not resample it)."""
    if img_size % BLOCK:
        raise ValueError(f"img_size must be a multiple of {BLOCK}")
    config = {"img_size": img_size, "patch_size": BLOCK, "prompt_embed_dim": CHANNELS, "box_prompts": False}
    base = SamMed3D(OracleImageEncoder(img_size), OraclePromptEncoder(img_size), OracleMaskDecoder(), config)
    return SamMed3DMoE(base, preprocessing={"spacing_mm": spacing_mm, "window": img_size}).eval()


def organ_image(data_dir, label_name: str = "liver", core_radius: Optional[float] = None):
    """The example CT's grid with intensity 1 everywhere and 2 in the reference organ (from
    example_ct_seg.nii.gz); with ``core_radius`` (voxels) a ball of 3 around the organ's most
    interior voxel. Returns ``(volume, organ_mask, core_mask_or_None, interior_voxel)``."""
    import json

    import nibabel as nib
    from scipy import ndimage

    labels = json.loads((data_dir / "example_ct_seg_labels.json").read_text())
    label_id = next(int(k) for k, v in labels.items() if v["name"] == label_name)
    seg_image = nib.load(data_dir / "example_ct_seg.nii.gz")
    organ = np.asarray(seg_image.dataobj) == label_id
    depth = ndimage.distance_transform_edt(np.pad(organ, 1))[1:-1, 1:-1, 1:-1]  # the scan's edge is a boundary
    interior = np.unravel_index(int(np.argmax(depth)), organ.shape)
    image = 1.0 + organ.astype(np.float32)
    core = None
    if core_radius is not None:
        grid = np.indices(organ.shape).transpose(1, 2, 3, 0)
        core = np.linalg.norm(grid - np.asarray(interior), axis=-1) <= core_radius
        core &= organ
        image[core] = 3.0
    return Volume(image, seg_image.affine), organ, core, tuple(int(v) for v in interior)
