"""The SAM-Med3D network and the MoE gate, one file per component (as ``segment_anything/modeling``).

Written so the official checkpoints load with ``strict=True`` and give the official numbers
(proved against ``Testing/Data/reference`` by ``Testing/test_model_parity.py``). The module tree
and ``state_dict()`` names are the official ones:

* ``image_encoder`` (:mod:`.image_encoder`): a 3D ViT on a 128³ window -> (B, 384, 8, 8, 8);
* ``prompt_encoder`` (:mod:`.prompt_encoder`): points, boxes, a low-res mask -> sparse and dense
  embeddings;
* ``mask_decoder`` (:mod:`.mask_decoder`, :mod:`.transformer`): a two-way transformer ->
  (B, 1 or 3, 32, 32, 32) low-res logits + IoU;
* :class:`GatingNetwork` (:mod:`.gate`): the mixture's gate over [general, experts].
"""

from .common import MLP, LayerNorm3d, MLPBlock
from .gate import GatingNetwork
from .image_encoder import ATTENTION_MODES, ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PositionEmbeddingRandom3D, PromptEncoder3D
from .sam_med3d import VIT_B_ORI, SamMed3D, build_mask_decoder, build_sam_med3d
from .transformer import DecoderAttention, TwoWayTransformer3D

__all__ = [
    "ATTENTION_MODES", "VIT_B_ORI", "DecoderAttention", "GatingNetwork", "ImageEncoderViT3D", "LayerNorm3d",
    "MLP", "MLPBlock", "MaskDecoder3D", "PositionEmbeddingRandom3D", "PromptEncoder3D", "SamMed3D",
    "TwoWayTransformer3D", "build_mask_decoder", "build_sam_med3d",
]
