"""Sessions under threads and sharing: prompt snapshots, one model shared by several sessions,
the out-of-memory fallback, the worker's shutdown, the device choice and float64 on the device.

Out-of-memory failures are injected through the documented seam ``Session.device_step_hook``
(a stand-in for a GPU that runs out of memory, which this machine does not have; the real CUDA
path is in test_gpu.py). The errors raised are the ones PyTorch raises, with their messages.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from SAMMed3DMoELib import volume_io
from SAMMed3DMoELib.device import copy_module, is_out_of_memory, prediction_runs_on, select_device
from SAMMed3DMoELib.errors import CancelledError, OutOfMemoryError, SAMMed3DError
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session
from SAMMed3DMoELib.worker import SessionWorker
from tiny_models import constant_mask_decoder, tiny_moe, tiny_sam

OUT_OF_MEMORY = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"),
    "cublas": RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "cudnn": RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "mps": RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
                        "18.13 GB). Tried to allocate 256.00 MB on private pool."),
    "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: you "
                        "tried to allocate 8589934592 bytes."),
}


@pytest.fixture(scope="module")
def ct(data_dir):
    return volume_io.load_volume(data_dir / "example_ct_sm.nii.gz")


def _ras(volume, ijk=(60, 50, 15)):
    return volume.ijk_to_ras(np.array([ijk], dtype=float))[0]


def _state(model):
    """Every tensor of a model with where it lives, to prove nobody moved, cast or changed it."""
    return {name: (t.data_ptr(), t.device, t.dtype, t.detach().clone()) for name, t in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, (ptr, device, dtype, value) in before.items():
        t = after[name]
        assert (t.data_ptr(), t.device, t.dtype) == (ptr, device, dtype), name
        assert torch.equal(t, value), name


def test_a_prediction_works_on_a_snapshot_of_the_prompts(ct):
    """Prompts edited from another thread while the prediction runs do not reach it."""
    model = tiny_moe()
    session = Session(ct, model, device="cpu", max_windows=1)
    session.add_point(_ras(ct))
    session.add_point(_ras(ct, (62, 52, 15)), positive=False)
    revision = session.revision
    decoding, edited = threading.Event(), threading.Event()

    def pause_at_the_first_decode(step):
        if step == "decode" and not decoding.is_set():
            decoding.set()
            assert edited.wait(10)

    session.device_step_hook = pause_at_the_first_decode
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", session.predict()))
    thread.start()
    assert decoding.wait(10)
    session.add_point(_ras(ct, (58, 48, 15)), positive=False)  # edits while the model runs
    session.remove_prompt(session.prompts[1][0])
    edited.set()
    thread.join(10)
    result = outcome["result"]
    assert result.revision == revision < session.revision

    reference = Session(ct, model, device="cpu", max_windows=1)
    reference.add_point(_ras(ct))
    reference.add_point(_ras(ct, (62, 52, 15)), positive=False)
    np.testing.assert_array_equal(result.region, reference.predict().region)
    session.device_step_hook = None
    later = session.predict()
    assert later.revision == session.revision and not np.array_equal(later.region, result.region)


def test_sessions_sharing_a_model_predict_on_two_threads(ct):
    model = tiny_moe()
    before = _state(model)
    clicks = {"a": [(60, 50, 15), (62, 52, 15)], "b": [(40, 40, 12), (44, 40, 12)]}
    expected = {}
    for name, points in clicks.items():
        alone = Session(ct, model, device="cpu", max_windows=1)
        for k, p in enumerate(points):
            alone.add_point(_ras(ct, p), positive=k == 0)
        expected[name] = alone.predict().region

    sessions = {name: Session(ct, model, device="cpu", max_windows=1) for name in clicks}
    results, start = {}, threading.Barrier(2)

    def run(name):
        for k, p in enumerate(clicks[name]):
            sessions[name].add_point(_ras(ct, p), positive=k == 0)
        start.wait(10)
        for _ in range(3):
            results[name] = sessions[name].predict()

    threads = [threading.Thread(target=run, args=(name,)) for name in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, session in sessions.items():
        assert session.model is model and not session.owns_model
        np.testing.assert_array_equal(results[name].region, expected[name])
    _assert_untouched(model, before)


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY))
def test_out_of_memory_moves_only_what_the_session_owns(ct, kind):
    """Two sessions share one bfloat16 model. The first runs out of memory: it frees its cache
    and continues in float32 on its own CPU copy; the shared model and the other session are
    untouched and keep working."""
    shared = tiny_moe().to(torch.bfloat16)
    before = _state(shared)
    failing, other = (Session(ct, shared, device="cpu", max_windows=1) for _ in range(2))
    for session in (failing, other):
        session.add_point(_ras(ct))
    other_first = other.predict()
    other_cache = other.cached_bytes

    failures = []

    def fail_once(step):
        if not failures:
            failures.append(step)
            raise OUT_OF_MEMORY[kind]

    failing.device_step_hook = fail_once
    with pytest.warns(UserWarning, match="out of memory"):
        result = failing.predict()
    assert failures == ["encode"]
    assert any("out of memory" in note for note in result.notes)
    assert failing.owns_model and failing.model is not shared and failing.dtype == torch.float32
    assert {p.dtype for p in failing.model.parameters()} == {torch.float32}
    assert {e.dtype for e in failing._cache._windows[result.windows[0]].__dict__.values() if torch.is_tensor(e)} \
        == {torch.float32}, "the cache holds float32 embeddings after the fallback"

    upcast = Session(ct, copy_module(shared, "cpu", torch.float32), device="cpu", max_windows=1)
    upcast.add_point(_ras(ct))
    np.testing.assert_array_equal(result.region, upcast.predict().region)

    _assert_untouched(shared, before)
    assert other.model is shared and other.dtype == torch.bfloat16 and other.cached_bytes == other_cache
    np.testing.assert_array_equal(other.predict().region, other_first.region)


def test_out_of_memory_on_the_cpu_too_raises_out_of_memory_error(ct):
    session = Session(ct, tiny_moe(), device="cpu", max_windows=1)
    session.add_point(_ras(ct))

    def always(step):
        raise OUT_OF_MEMORY["cpu"]

    session.device_step_hook = always
    with pytest.warns(UserWarning, match="freed its cache"), pytest.raises(OutOfMemoryError) as caught:
        session.predict()
    assert caught.value.exit_code == 4 and "CPU" in str(caught.value)

    strict = Session(ct, tiny_moe(), device="cpu", max_windows=1, cpu_fallback=False)
    strict.add_point(_ras(ct))
    strict.device_step_hook = always
    with pytest.raises(OutOfMemoryError, match="ran out of memory"):
        strict.predict()


def test_other_errors_are_not_taken_for_out_of_memory(ct):
    session = Session(ct, tiny_moe(), device="cpu", max_windows=1)
    session.add_point(_ras(ct))

    def broken(step):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    session.device_step_hook = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        session.predict()
    assert not session.notes


def test_out_of_memory_errors_are_recognised():
    for error in OUT_OF_MEMORY.values():
        assert is_out_of_memory(error)
    assert is_out_of_memory(MemoryError())
    for error in (RuntimeError("CUDA error: device-side assert triggered"), ValueError("out of memory"),
                  RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")):
        assert not is_out_of_memory(error)


def test_a_session_that_needs_another_placement_copies_the_model(ct):
    """A model whose parts disagree on dtype cannot be used as it is: the session computes on its
    own copy, and the model stays as it was."""
    model = tiny_moe()
    model.gate.to(torch.bfloat16)
    before = _state(model)
    session = Session(ct, model, device="cpu", max_windows=1)
    assert session.owns_model and {p.dtype for p in session.model.parameters()} == {torch.float32}
    session.add_point(_ras(ct))
    assert session.predict().region.any()
    _assert_untouched(model, before)


def test_worker_shutdown_never_blocks_the_caller():
    """shutdown() returns while a long job still runs (it asks the job to stop; the job ends on
    its own thread); afterwards the worker refuses new jobs."""
    worker = SessionWorker()
    started, release = threading.Event(), threading.Event()

    def long_job(cancel):
        started.set()
        release.wait(30)  # ignores the cancel request until released
        if cancel.is_set():
            raise CancelledError("cancelled")
        return "finished"

    job = worker.submit(long_job, pass_cancel=True)
    queued = worker.submit(lambda: "never")
    assert started.wait(10)
    caller = threading.Thread(target=worker.shutdown)
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "shutdown() returned"
    assert not job.done(), "...while the job was still running"
    assert queued.cancelled()
    with pytest.raises(SAMMed3DError, match="shut down"):
        worker.submit(lambda: 1)
    release.set()
    with pytest.raises(CancelledError):
        job.result(timeout=10)


def test_auto_picks_a_device_only_where_the_whole_prediction_runs():
    assert prediction_runs_on("cpu")
    assert not prediction_runs_on("meta"), "a device where a prediction cannot run is never picked"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if prediction_runs_on("mps") else "cpu")
    assert select_device("auto").type == expected


class _Float64Recorder(TorchDispatchMode):
    """Records every operation whose inputs or outputs include a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.float64 = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves((args, kwargs, out))):
            self.float64.append(str(func))
        return out


def test_no_float64_tensor_in_a_prediction(ct):
    """MPS has no float64: preparing the volume, cutting and normalising windows, encoding,
    decoding, the gate, neighbouring windows, box clipping and mapping back all stay in float32
    (on the CPU here, where every tensor of the session lives on the compute device)."""
    filling = tiny_sam(box_prompts=False)
    constant_mask_decoder(filling.mask_decoder, 8.0)
    with _Float64Recorder() as recorder:
        mixture = Session(ct, tiny_moe(), device="cpu", max_windows=1)
        mixture.add_point(_ras(ct))
        mixture.add_point(_ras(ct, (62, 52, 15)), positive=False)
        mixture.predict()
        extending = Session(ct, SamMed3DMoE(filling), device="cpu", max_windows=3)
        extending.set_box(_ras(ct, (40, 30, 5)), _ras(ct, (80, 70, 25)))
        result = extending.predict()
    assert len(result.windows) == 3
    assert recorder.float64 == []
