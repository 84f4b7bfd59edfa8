"""Checks that need a CUDA GPU. Skipped on CPU-only machines (CI has no GPU); run them on a
machine with one: ``python -m pytest Testing/test_gpu.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_weights import reference_input, reference_outputs, reference_state_dict
from SAMMed3DMoELib import volume_io
from SAMMed3DMoELib.model import build_sam_med3d
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"),
]


def test_fast_encoder_matches_reference_on_cuda():
    model = build_sam_med3d(box_prompts=True).cuda()
    model.load_state_dict(reference_state_dict(True, torch.float32))
    with torch.inference_mode():
        embedding = model.image_encoder(reference_input(torch.float32).cuda()).cpu().double().numpy()
    assert np.abs(embedding - reference_outputs()["image_embedding"]).max() <= 2e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_encoder_is_close_to_literal(dtype):
    torch.manual_seed(0)
    encoder = build_sam_med3d().image_encoder.cuda().to(dtype)
    x = torch.randn(1, 1, 128, 128, 128, device="cuda", dtype=dtype)
    with torch.inference_mode():
        fast = encoder(x).float()
        encoder.set_attention_mode("literal")
        literal = encoder(x).float()
    assert (fast - literal).abs().max() <= 0.1 * literal.abs().max()


def test_out_of_memory_falls_back_to_cpu(data_dir):
    volume = volume_io.load_volume(data_dir / "example_ct_sm.nii.gz")
    session = Session(volume, SamMed3DMoE(build_sam_med3d()), device="cuda", max_windows=1)
    session.add_point(volume.ijk_to_ras(np.array([[60.0, 50.0, 15.0]]))[0])
    hog = []
    try:  # take (almost) all free GPU memory so that encoding cannot allocate
        while True:
            hog.append(torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        pass
    with pytest.warns(UserWarning, match="out of memory"):
        result = session.predict()
    del hog
    assert session.device.type == "cpu"
    assert any("out of memory" in note for note in result.notes)
