"""Checks that need a CUDA GPU. Skipped on CPU-only machines (CI has no GPU); run them on a
machine with one: ``python -m pytest Testing/test_gpu.py``. The CPU stand-ins for the
out-of-memory fallback (errors injected through ``Session.device_step_hook``) are in
test_session_sharing.py; here the GPU really runs out of memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_weights import reference_input, reference_outputs, reference_state_dict
from SAMMed3DMoELib.geometry import Volume
from SAMMed3DMoELib.model import build_sam_med3d
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"),
]


@pytest.fixture
def no_tf32():
    """float32 arithmetic on the GPU: cuDNN convolutions use TF32 by default on Ampere and later
    (the patch embedding then differs from the reference by about 3e-3 on an H200)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fast_encoder_matches_reference_on_cuda(no_tf32):
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


@pytest.fixture(scope="module")
def volume(data_dir):
    """The example CT crop, read with nibabel (RAS affine): these checks are about the device,
    not about file reading, and so they also run where SimpleITK is not installed."""
    import nibabel as nib

    image = nib.load(str(data_dir / "example_ct_sm.nii.gz"))
    return Volume(np.asarray(image.dataobj, dtype=np.float32), image.affine)


def _click(volume):
    return volume.ijk_to_ras(np.array([[60.0, 50.0, 15.0]]))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_of_memory_falls_back_to_cpu_without_touching_the_shared_model(volume, dtype):
    shared = SamMed3DMoE(build_sam_med3d()).cuda().to(dtype)
    failing, other = (Session(volume, shared, device="cuda", max_windows=1) for _ in range(2))
    for session in (failing, other):
        session.add_point(_click(volume))
    assert not failing.owns_model and failing.model is shared
    hog = []
    # Take all free GPU memory, in smaller and smaller blocks, so that encoding cannot allocate:
    # 256 MB blocks alone leave up to 256 MB free, enough for the encoder of one window (seen on
    # an H200: no out-of-memory, the test failed).
    for block in (256 * 2 ** 20, 16 * 2 ** 20, 2 ** 20, 64 * 2 ** 10):
        try:
            while True:
                hog.append(torch.empty(block, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            pass
    try:
        with pytest.warns(UserWarning, match="out of memory"):
            result = failing.predict()
    finally:
        del hog
    assert failing.device.type == "cpu" and failing.dtype == torch.float32 and failing.owns_model
    assert any("out of memory" in note for note in result.notes)
    assert {(p.device.type, p.dtype) for p in shared.parameters()} == {("cuda", dtype)}
    assert other.predict().region.shape == result.region.shape  # the other session still runs on the GPU
    assert other.device.type == "cuda" and other.model is shared


def test_a_session_on_the_gpu_stays_within_its_memory_budget(volume):
    """The cache (embeddings + click steps) is counted on the GPU; the allocator agrees."""
    model = SamMed3DMoE(build_sam_med3d()).cuda()
    one_window = 384 * 8 ** 3 * 4 + 3 * (32 ** 3 * 4 + 4)
    session = Session(volume, model, device="cuda", max_windows=1, memory_budget_bytes=2 * one_window)
    session.add_point(_click(volume))
    session.predict()  # the volume's GPU copy now exists
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated() - session.cached_bytes
    for ijk in [(20, 20, 10), (100, 80, 20), (60, 20, 25), (20, 80, 5)]:
        session.start_new_segment()
        session.add_point(volume.ijk_to_ras(np.array([ijk], dtype=float))[0])
        session.add_point(volume.ijk_to_ras(np.array([ijk], dtype=float) + 2)[0], positive=False)
        session.predict()
        torch.cuda.synchronize()
        assert session.cached_bytes <= session.memory_budget_bytes
        assert torch.cuda.memory_allocated() - baseline <= session.memory_budget_bytes + 2 ** 20
