"""Small but complete models for fast tests (the same code as the full-size network)."""

from __future__ import annotations

import torch

from SAMMed3DMoELib.model import GatingNetwork, SamMed3D, build_sam_med3d
from SAMMed3DMoELib.moe import ExpertInfo, SamMed3DMoE

TINY = dict(
    img_size=64, patch_size=16, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=4,
    encoder_global_attn_indexes=(1,), window_size=6, prompt_embed_dim=48, decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def tiny_sam(seed: int = 0, box_prompts: bool = True) -> SamMed3D:
    """A 64³-input SAM-Med3D with random weights (4³ tokens padded to 6³ windows)."""
    torch.manual_seed(seed)
    model = build_sam_med3d(box_prompts=box_prompts, **TINY)
    with torch.no_grad():  # official init leaves some parameters at zero; make every path matter
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    return model


def tiny_moe(num_experts: int = 2, seed: int = 0, tau: float = 0.5, selector: str = "paper",
             box_prompts_trained: bool = True) -> SamMed3DMoE:
    """tiny_sam plus experts and a gate; its box embeddings count as trained unless told."""
    base = tiny_sam(seed)
    experts = {}
    for i in range(num_experts):
        torch.manual_seed(seed + 100 + i)
        experts[f"expert{i + 1}"] = base.new_mask_decoder()
    torch.manual_seed(seed + 1000)
    gate = GatingNetwork(embed_dim=48, num_experts=num_experts, num_heads=4, mlp_dim=32, hidden_dim=16)
    info = {name: ExpertInfo(name, targets=[f"organ{i}"], modality="CT") for i, name in enumerate(experts)}
    return SamMed3DMoE(base, experts, gate, info, tau=tau, selector=selector,
                       box_prompts_trained=box_prompts_trained).eval()


def constant_mask_decoder(decoder, logit: float):
    """Set a decoder's weights so every output voxel gets ``logit`` whatever the prompt: the
    upscaling path yields constant features and the hypernetworks a constant bias. A real
    network with chosen weights, used where a test needs an object of known extent (a mask
    that fills every window, or none)."""
    with torch.no_grad():
        up0, ln, _, up3, _ = decoder.output_upscaling
        for layer in (up0, up3):
            layer.weight.zero_()
            layer.bias.fill_(1.0)
        ln.weight.zero_()
        ln.bias.fill_(1.0)
        for mlp in decoder.output_hypernetworks_mlps:
            last = mlp.layers[-1]
            last.weight.zero_()
            last.bias.fill_(logit / (last.out_features * torch.nn.functional.gelu(torch.tensor(1.0)).item()))
    return decoder
