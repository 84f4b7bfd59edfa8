"""The network equals the official SAM-Med3D: official state-dict names and shapes, and every
array of Testing/Data/reference reproduced (float64 to 1e-7, float32 to 2e-4) with the full-size model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reference_weights import REFERENCE_DIR, keys_file, reference_input, reference_outputs, reference_state_dict
from SAMMed3DMoELib.model import build_sam_med3d

CLICKS = [((64, 64, 64), 1), ((40, 70, 80), 1), ((90, 30, 60), 0), ((20, 100, 110), 1)]
BOX = ((30, 40, 50), (90, 100, 110))


@pytest.fixture(scope="module")
def ref():
    return reference_outputs()


@pytest.mark.parametrize("box_prompts", [False, True])
def test_state_dict_has_official_names_and_shapes(box_prompts):
    official = json.loads((REFERENCE_DIR / keys_file(box_prompts)).read_text())
    model = build_sam_med3d(box_prompts=box_prompts)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official["keys"]
    assert sum(p.numel() for p in model.parameters()) == official["num_parameters"]


def test_official_weights_load_strictly_into_plain_model():
    model = build_sam_med3d()
    state = reference_state_dict(box_prompts=False, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="point_embeddings.2"):
        model.load_state_dict(reference_state_dict(box_prompts=True, dtype=torch.float32), strict=True)


def _points(clicks, dtype):
    coords = torch.tensor([[p for p, _ in clicks]], dtype=dtype)
    labels = torch.tensor([[lab for _, lab in clicks]], dtype=torch.int64)
    return coords, labels


def _run_protocols(model, embedding, dtype):
    """Both click protocols of the reference README; yields (name, array)."""
    pe = model.prompt_encoder.get_dense_pe()
    for protocol in ("newest", "accumulate"):
        mask = torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
        for step in range(len(CLICKS)):
            clicks = CLICKS[step : step + 1] if protocol == "newest" else CLICKS[: step + 1]
            sparse, dense = model.prompt_encoder(points=_points(clicks, dtype), boxes=None, masks=mask)
            logits, iou = model.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            yield f"{protocol}_step{step}_sparse", sparse
            yield f"{protocol}_step{step}_lowres_logits", logits
            yield f"{protocol}_step{step}_iou", iou
            mask = logits

    sparse, dense = model.prompt_encoder(points=_points(CLICKS[:1], dtype), boxes=None, masks=None)
    logits, iou = model.mask_decoder(
        image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=True,
    )
    yield "nomask_multimask_lowres_logits", logits
    yield "nomask_multimask_iou", iou

    box = torch.tensor([BOX], dtype=dtype)
    zeros = torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
    for name, points in (("box", None), ("box_point", _points(CLICKS[:1], dtype))):
        sparse, dense = model.prompt_encoder(points=points, boxes=box, masks=zeros)
        logits, iou = model.mask_decoder(
            image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False,
        )
        yield f"{name}_sparse", sparse
        yield f"{name}_lowres_logits", logits
        yield f"{name}_iou", iou


def _assert_close(name, got, expected, tol):
    got = got.detach().to(torch.float64).numpy()
    assert got.shape == expected.shape, name
    err = float(np.abs(got - expected).max())
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "literal"])
def test_image_embedding_float64(reference_model_f64, ref, mode):
    model = reference_model_f64
    model.image_encoder.set_attention_mode(mode)
    try:
        with torch.no_grad():
            embedding = model.image_encoder(reference_input(torch.float64))
    finally:
        model.image_encoder.set_attention_mode("fast")
    _assert_close(f"image_embedding ({mode})", embedding, ref["image_embedding"], 1e-7)


@pytest.mark.slow
def test_prompt_and_decoder_outputs_float64(reference_model_f64, ref):
    model = reference_model_f64
    embedding = torch.from_numpy(ref["image_embedding"])
    with torch.no_grad():
        _assert_close("dense_pe", model.prompt_encoder.get_dense_pe(), ref["dense_pe"], 1e-7)
        produced = dict(_run_protocols(model, embedding, torch.float64))
    compared = set(ref) - {"image_embedding", "dense_pe"}
    assert compared <= set(produced), f"reference arrays not produced: {compared - set(produced)}"
    for name in sorted(compared):
        _assert_close(name, produced[name], ref[name], 1e-7)


@pytest.mark.slow
def test_everything_float32(ref):
    model = build_sam_med3d(box_prompts=True)
    model.load_state_dict(reference_state_dict(box_prompts=True, dtype=torch.float32), strict=True)
    with torch.no_grad():
        embedding = model.image_encoder(reference_input(torch.float32))
        _assert_close("image_embedding (float32)", embedding, ref["image_embedding"], 2e-4)
        _assert_close("dense_pe (float32)", model.prompt_encoder.get_dense_pe(), ref["dense_pe"], 2e-4)
        # Decoders from the float32 embedding: errors do not compound past the tolerance.
        for name, value in _run_protocols(model, embedding, torch.float32):
            if name in ref:
                _assert_close(f"{name} (float32)", value, ref[name], 2e-4)


def test_dense_pe_keeps_the_official_axis_swap(reference_model_f64):
    """The encoding of point (a, b, c) equals dense_pe[:, :, b, a, c] (reference README)."""
    pe = reference_model_f64.prompt_encoder.get_dense_pe()[0]
    a, b, c = 1, 5, 3
    coords = torch.tensor([[[a * 16 + 8.0, b * 16 + 8.0, c * 16 + 8.0]]], dtype=torch.float64)
    point = reference_model_f64.prompt_encoder.pe_layer.forward_with_coords(coords, (128, 128, 128))[0, 0]
    assert torch.allclose(point, pe[:, b, a, c], atol=1e-12)
    assert not torch.allclose(point, pe[:, a, b, c], atol=1e-3)


def test_click_marks_in_the_mask_prompt():
    """click_mark_radius > 0 (models trained so; 0 in the official networks): a ball of ±10 logits
    around each positive/negative click in the low-res mask prompt, over the given logits, and
    the dense embedding then comes from that prompt. At 0 the prompt encoder is the official one."""
    from SAMMed3DMoELib.model.prompt_encoder import CLICK_MARK_LOGIT

    size = dict(img_size=64, patch_size=8, encoder_embed_dim=48, encoder_depth=1, encoder_num_heads=4,
                encoder_global_attn_indexes=(0,), window_size=4, prompt_embed_dim=48)
    torch.manual_seed(0)
    marked = build_sam_med3d(click_mark_radius=4, **size)
    plain = build_sam_med3d(**size)
    plain.load_state_dict(marked.state_dict())
    coords, labels = torch.tensor([[[10.0, 20.0, 30.0], [50.0, 50.0, 50.0]]]), torch.tensor([[1, 0]])
    previous = torch.full((1, 1, 32, 32, 32), 3.0)
    masks = marked.prompt_encoder.mark_clicks(previous, coords, labels)
    positive, negative = masks[0, 0] == CLICK_MARK_LOGIT, masks[0, 0] == -CLICK_MARK_LOGIT
    # Voxel (10, 20, 30) of the 64³ window is at (4.75, 9.75, 14.75) on the 32³ grid; radius 4 -> 2.
    assert torch.allclose(positive.nonzero().double().mean(0), torch.tensor([4.75, 9.75, 14.75], dtype=torch.float64),
                          atol=0.3)
    assert 20 <= int(positive.sum()) <= 40 and int(negative.sum()) == int(positive.sum())
    assert bool((masks[0, 0][~positive & ~negative] == 3.0).all())  # the rest of the prompt is kept

    with torch.no_grad():
        sparse, dense = marked.prompt_encoder(points=(coords, labels))
        plain_sparse, plain_dense = plain.prompt_encoder(points=(coords, labels))
        _, from_marks = plain.prompt_encoder(points=(coords, labels), masks=masks.new_zeros(masks.shape).where(
            ~(positive | negative)[None, None], masks))
    assert torch.equal(sparse, plain_sparse)  # the points' own tokens are unchanged
    assert torch.allclose(dense, from_marks) and not torch.allclose(dense, plain_dense)


def test_box_needs_box_checkpoint():
    model = build_sam_med3d(box_prompts=False, img_size=32, encoder_embed_dim=48, encoder_depth=1,
                            encoder_num_heads=4, encoder_global_attn_indexes=(), window_size=3,
                            prompt_embed_dim=48, decoder_mlp_dim=32)
    with pytest.raises(ValueError, match="box"):
        model.prompt_encoder(points=None, boxes=torch.zeros(1, 2, 3), masks=None)
