"""SAM-Med3D as a whole: the three parts under their official names, and the builders."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


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
    click_mark_radius=0.0,  # clicks also marked in the mask prompt (PromptEncoder3D); 0 in official networks
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
        click_mark_radius=config["click_mark_radius"],
    )
    model = SamMed3D(encoder, prompt_encoder, build_mask_decoder(config), config)
    return model.eval()
