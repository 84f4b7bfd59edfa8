"""The interactive session on the real example CT: prompts in RAS, masks back on the original
grid, the embedding cache, click replay protocols, undo, windows beyond the first, bad input,
and the worker thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from SAMMed3DMoELib import volume_io, windows
from SAMMed3DMoELib.errors import CancelledError, SAMMed3DError
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session
from SAMMed3DMoELib.worker import SessionWorker
from tiny_models import constant_mask_decoder, tiny_moe, tiny_sam


@pytest.fixture(scope="module")
def ct(data_dir):
    return volume_io.load_volume(data_dir / "example_ct_sm.nii.gz")


def _counter(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _centre_ras(volume, ijk=(60, 50, 15)):
    return volume.ijk_to_ras(np.array([ijk], dtype=float))[0]


def test_clicks_reuse_the_window_embedding_and_run_one_step_each(ct):
    session = Session(ct, tiny_moe(), device="cpu", max_windows=1)
    encodes = _counter(session.model.base.image_encoder)
    prompt_encodes = _counter(session.model.base.prompt_encoder)
    centre = _centre_ras(ct)
    session.add_point(centre)
    first = session.predict()
    assert len(encodes) == 1 and len(prompt_encodes) >= 1
    steps_before = len(prompt_encodes)
    session.add_point(centre + np.array([6.0, 0, 0]), positive=False)
    second = session.predict()
    assert len(encodes) == 1, "the second click in the same window must not re-encode"
    assert second.timings_ms["encode"] == 0.0
    assert len(prompt_encodes) - steps_before == 1, "adding a click replays only the new step"
    for result in (first, second):
        assert result.region.dtype == bool
        assert all(o >= 0 for o in result.offset)
        assert all(o + n <= s for o, n, s in zip(result.offset, result.region.shape, ct.shape))
        assert result.decoders[0] == "general" and set(result.scores) == {"general", "expert1", "expert2"}


def test_newest_protocol_matches_a_manual_replay(ct):
    moe = tiny_moe()
    session = Session(ct, moe, device="cpu", max_windows=1)
    a, b = _centre_ras(ct), _centre_ras(ct, (58, 55, 14))
    session.add_point(a)
    session.add_point(b, positive=False)
    result = session.predict()

    prepared = session.prepared
    window = windows.window_for_point(prepared, a, moe.base.img_size)
    image = torch.from_numpy(windows.extract_window(prepared, window))[None, None]
    coords = windows.ras_to_window(prepared, window, np.array([a, b]))
    with torch.no_grad():
        embedding = moe.encode(image)
        mask = torch.zeros(1, 1, 16, 16, 16)
        for point, label in zip(coords, (1, 0)):
            pts = (torch.tensor(np.array([[point]]), dtype=torch.float32), torch.tensor([[label]]))
            mask = moe.predict(embedding, points=pts, mask_logits=mask).logits
    expected, offset = windows.map_back(mask[0, 0], prepared, window)
    assert tuple(offset) == tuple(result.offset)
    assert np.array_equal(expected, result.region)


def test_accumulate_protocol_gives_all_points(ct):
    moe = tiny_moe()
    newest = Session(ct, moe, device="cpu", max_windows=1)
    accumulate = Session(ct, moe, device="cpu", max_windows=1, protocol="accumulate")
    for s in (newest, accumulate):
        s.add_point(_centre_ras(ct))
        s.add_point(_centre_ras(ct, (50, 40, 12)))
    assert not np.array_equal(newest.predict().region, accumulate.predict().region)


def test_undo_remove_and_reset(ct):
    session = Session(ct, tiny_moe(), device="cpu", max_windows=1)
    session.add_point(_centre_ras(ct))
    one = session.predict().region.copy()
    negative = session.add_point(_centre_ras(ct, (62, 52, 15)), positive=False)
    two = session.predict().region.copy()
    assert not np.array_equal(one, two)
    assert session.undo()
    assert np.array_equal(session.predict().region, one)
    negative = session.add_point(_centre_ras(ct, (62, 52, 15)), positive=False)
    session.remove_prompt(negative)
    assert np.array_equal(session.predict().region, one)
    revision = session.revision
    cleared = session.reset()
    assert cleared.empty and cleared.revision == session.revision == revision + 1
    assert session.prompts == []
    nothing = session.predict()
    assert nothing.empty and any("no prompts" in note for note in nothing.notes)
    assert session.undo() and len(session.prompts) == 1 and session.revision == revision + 2
    with pytest.raises(SAMMed3DError, match="no prompt with id"):
        session.remove_prompt(999)


def test_bad_prompts_are_explained(ct):
    session = Session(ct, tiny_moe(), device="cpu")
    with pytest.raises(SAMMed3DError, match="outside the image"):
        session.add_point(_centre_ras(ct) + np.array([0, 0, 500.0]))
    with pytest.raises(SAMMed3DError, match="outside the image"):
        session.add_point_ijk((60, 50, ct.shape[2]))
    session.add_point(_centre_ras(ct), positive=False)
    with pytest.raises(SAMMed3DError, match="only negative"):
        session.predict()
    corner = _centre_ras(ct)
    with pytest.raises(SAMMed3DError, match="zero extent"):
        session.set_box(corner, corner + np.array([20.0, 20.0, 0.0]))
    with pytest.raises(SAMMed3DError, match="protocol"):
        Session(ct, tiny_moe(), device="cpu", protocol="all")


def _constant_model(logit: float) -> SamMed3DMoE:
    base = tiny_sam()
    constant_mask_decoder(base.mask_decoder, logit)
    return SamMed3DMoE(base)


def test_object_larger_than_a_window_extends_until_the_volume_edge(ct):
    session = Session(ct, _constant_model(8.0), device="cpu", max_windows=64)
    session.add_point(_centre_ras(ct))
    result = session.predict()
    assert len(result.windows) > 1
    # the "object" fills everything: the union of windows must cover the whole volume
    assert result.full_mask(ct.shape).all()
    starts = np.array(result.windows)
    for k in range(1, len(starts)):  # each new window is half a window from an earlier one
        nearest = np.abs(starts[:k] - starts[k]).sum(-1).min()
        assert nearest == session.window_size // 2, "neighbours overlap by 50 %"


def test_extension_stops_at_the_window_limit_with_a_note(ct):
    session = Session(ct, _constant_model(8.0), device="cpu", max_windows=2)
    session.add_point(_centre_ras(ct))
    result = session.predict()
    assert len(result.windows) == 2
    assert any("max_windows" in note for note in result.notes)
    assert not result.full_mask(ct.shape).all()


def test_closed_object_stays_in_one_window(ct):
    session = Session(ct, _constant_model(-8.0), device="cpu")
    session.add_point(_centre_ras(ct))
    result = session.predict()
    assert len(result.windows) == 1 and not result.region.any()


def test_box_on_a_model_without_box_prompts_is_a_centre_click_limited_to_the_box(ct):
    base = tiny_sam(box_prompts=False)
    constant_mask_decoder(base.mask_decoder, 8.0)
    session = Session(ct, SamMed3DMoE(base), device="cpu", max_windows=1)
    lo, hi = _centre_ras(ct, (50, 40, 10)), _centre_ras(ct, (70, 60, 20))
    session.set_box(lo, hi)
    result = session.predict()
    assert any("no box prompt" in note for note in result.notes)
    mask = result.full_mask(ct.shape)
    ijk_lo = np.minimum(ct.ras_to_ijk(np.array([lo]))[0], ct.ras_to_ijk(np.array([hi]))[0]).round().astype(int)
    ijk_hi = np.maximum(ct.ras_to_ijk(np.array([lo]))[0], ct.ras_to_ijk(np.array([hi]))[0]).round().astype(int)
    inside = np.zeros_like(mask)
    inside[ijk_lo[0]:ijk_hi[0] + 1, ijk_lo[1]:ijk_hi[1] + 1, ijk_lo[2]:ijk_hi[2] + 1] = True
    assert mask.any() and not (mask & ~inside).any()
    assert inside.sum() == mask.sum()


def test_box_prompt_reaches_a_box_model(ct):
    moe = tiny_moe()
    seen = []
    moe.base.prompt_encoder.register_forward_hook(lambda _m, _a, kwargs, _o: seen.append(kwargs.get("boxes")), with_kwargs=True)
    session = Session(ct, moe, device="cpu", max_windows=1)
    session.set_box(_centre_ras(ct, (50, 40, 10)), _centre_ras(ct, (70, 60, 20)))
    result = session.predict()
    assert seen and seen[-1] is not None and seen[-1].shape == (1, 2, 3)
    assert not any("box" in note for note in result.notes)


def test_a_box_with_untrained_embeddings_is_a_centre_click(ct):
    moe = tiny_moe(box_prompts_trained=False)
    seen = []
    moe.base.prompt_encoder.register_forward_hook(lambda _m, _a, kwargs, _o: seen.append(kwargs), with_kwargs=True)
    session = Session(ct, moe, device="cpu", max_windows=1)
    lo, hi = _centre_ras(ct, (50, 40, 10)), _centre_ras(ct, (70, 60, 20))
    session.set_box(lo, hi)
    result = session.predict()
    assert any("never trained" in note and "centre" in note for note in result.notes)
    assert seen[0]["boxes"] is None and seen[0]["points"][1].tolist() == [[1]]
    window = windows.window_for_box(session.prepared, np.minimum(lo, hi), np.maximum(lo, hi), 64)
    centre = windows.ras_to_window(session.prepared, window, ((lo + hi) / 2)[None])[0]
    np.testing.assert_allclose(seen[0]["points"][0][0, 0].numpy(), centre, atol=1e-4)


def test_a_box_larger_than_the_window_is_clipped_with_a_note(ct):
    moe = tiny_moe()
    seen = []
    moe.base.prompt_encoder.register_forward_hook(lambda _m, _a, kwargs, _o: seen.append(kwargs["boxes"]), with_kwargs=True)
    session = Session(ct, moe, device="cpu", max_windows=1)
    session.set_box(_centre_ras(ct, (5, 5, 2)), _centre_ras(ct, (115, 95, 35)))  # 330 x 270 x 99 mm
    result = session.predict()
    assert any("larger than the model's window" in note for note in result.notes)
    corners = seen[-1][0].numpy()
    assert corners.min() >= 0 and corners.max() <= 63
    assert np.allclose(corners[0, :2], 0) and np.allclose(corners[1, :2], 63), "clipped to the window's edge voxels"


def test_prompt_rules_live_in_one_place(ct):
    from SAMMed3DMoELib import prompts

    with pytest.raises(SAMMed3DError, match="zero extent along S"):
        prompts.box_from_corners(ct, [0, 0, 0], [20, 20, 1.0])  # thinner than the 3 mm voxels
    box = prompts.box_from_corners(ct, [20, 20, 9], [0, 0, 0])
    assert box.ras_min == (0, 0, 0) and box.ras_max == (20, 20, 9)
    edge = ct.ijk_to_ras(np.array([[ct.shape[0] - 0.5, 0, 0]]))[0]
    np.testing.assert_allclose(prompts.point_on_volume(ct, edge), [ct.shape[0] - 0.5, 0, 0], atol=1e-6)
    with pytest.raises(SAMMed3DError, match="outside the image, which spans R"):
        prompts.point_on_volume(ct, edge + ct.affine[:3, 0] * 0.01)
    with pytest.raises(SAMMed3DError, match="within 0..121"):
        prompts.ijk_on_volume(ct, (122, 0, 0))


def test_worker_supersedes_stale_jobs_and_cancels():
    worker = SessionWorker()
    release = threading.Event()
    try:
        blocker = worker.submit(release.wait, 5)
        stale = worker.submit(lambda: "stale", key="click")
        fresh = worker.submit(lambda: "fresh", key="click")
        assert stale.cancelled()
        release.set()
        assert fresh.result(timeout=5) == "fresh" and blocker.result(timeout=5)

        started = threading.Event()

        def long_job(cancel):
            started.set()
            for _ in range(500):
                if cancel.is_set():
                    raise CancelledError("cancelled")
                time.sleep(0.01)
            return "finished"

        job = worker.submit(long_job, key="k", pass_cancel=True)
        assert started.wait(5)
        worker.cancel_all()
        with pytest.raises(CancelledError):
            job.result(timeout=5)
    finally:
        worker.shutdown()


def test_session_predict_honours_cancel(ct):
    session = Session(ct, tiny_moe(), device="cpu")
    session.add_point(_centre_ras(ct))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        session.predict(cancel=cancel)


def test_points_outside_the_first_window_are_not_used_and_said(ct):
    session = Session(ct, tiny_moe(), device="cpu", max_windows=1)
    session.add_point(_centre_ras(ct))
    alone = session.predict().region.copy()
    far = _centre_ras(ct, (5, 5, 2))  # ~ 150 mm away: outside the 64³ x 1.5 mm window
    session.add_point(far, positive=False)
    result = session.predict()
    assert any("outside every window" in note for note in result.notes)
    assert np.array_equal(result.region, alone)


def test_bundle_preprocessing_reaches_the_session(ct, tmp_path):
    from SAMMed3DMoELib import bundle

    moe = tiny_moe()
    bundle.save_bundle(moe, tmp_path / "b", preprocessing={"spacing_mm": 2.0, "window": 64,
                                                             "ct_clamp": [-200, 300], "normalization": "zscore_nonzero"})
    loaded = bundle.load_bundle(tmp_path / "b")
    assert loaded.preprocessing["spacing_mm"] == 2.0
    session = Session(ct, loaded, device="cpu")
    assert np.allclose(session.prepared.spacing, 2.0)
    assert session.prepared.array.min() >= -200 and session.prepared.array.max() <= 300
    loaded.preprocessing["normalization"] = "minmax"
    with pytest.raises(SAMMed3DError, match="normalisation 'minmax'"):
        Session(ct, loaded, device="cpu")
    loaded.preprocessing.update(normalization="zscore_nonzero", window=128)
    with pytest.raises(SAMMed3DError, match="inconsistent"):
        Session(ct, loaded, device="cpu")


def test_worker_cancel_all_cancels_every_queued_job():
    worker = SessionWorker()
    release = threading.Event()
    try:
        running = worker.submit(release.wait, 5)
        queued = [worker.submit(lambda: 1, key="a"), worker.submit(lambda: 2, key="b"), worker.submit(lambda: 3)]
        worker.cancel_all()
        assert all(f.cancelled() for f in queued)
        release.set()
        assert running.result(timeout=5) is True
        ran_on = worker.submit(threading.current_thread).result(timeout=5)
        assert ran_on is not threading.current_thread(), "model work runs on the worker thread"
    finally:
        worker.shutdown()


def _tally(session) -> int:
    """Bytes of every tensor in the session's cache, counted from its entries."""
    total = 0
    for entry in session._cache._windows.values():
        if entry.embedding is not None:
            total += entry.embedding.nbytes
        total += sum(p.logits.nbytes + p.iou.nbytes for memo in entry.steps.values() for _, p in memo)
    return total


def test_one_memory_budget_holds_embeddings_and_click_steps_over_a_long_session(ct):
    moe = tiny_moe()
    embedding = 48 * 4 ** 3 * 4  # one tiny embedding: 48 x 4³ float32
    step = 16 ** 3 * 4 + 4  # one memoised click: 16³ float32 logits + the IoU prediction
    budget = 3 * (embedding + 3 * step)
    session = Session(ct, moe, device="cpu", max_windows=1, memory_budget_bytes=budget)
    encodes = _counter(moe.base.image_encoder)
    centres = [(i, j, 15) for i in (20, 60, 100) for j in (20, 50, 80)] + [(20, 20, 15)]
    for n, centre in enumerate(centres):
        session.start_new_segment()
        session.add_point(_centre_ras(ct, centre))
        for dk in (2, -2):
            session.add_point(_centre_ras(ct, (centre[0], centre[1], 15 + dk)), positive=False)
            session.predict()
            assert session.cached_bytes == _tally(session) <= budget
        assert len(session._cache.windows) <= 3
    assert session.cached_bytes >= 2 * (embedding + 3 * step), "the cache is used, not emptied"
    assert len(encodes) == len(centres), "each window encoded once per visit; the first was evicted and re-encoded"
    session.close()
    assert session.cached_bytes == 0
    with pytest.raises(SAMMed3DError, match="closed"):
        session.predict()


def test_clicks_in_a_cached_window_reuse_its_steps_within_the_budget(ct):
    moe = tiny_moe()
    session = Session(ct, moe, device="cpu", max_windows=1)
    prompt_encodes = _counter(moe.base.prompt_encoder)
    session.add_point(_centre_ras(ct))
    for k in range(5):
        session.add_point(_centre_ras(ct, (60, 50 + k, 13)), positive=False)
        session.predict()
    assert len(prompt_encodes) == 6, "each click decoded once"
    assert session.cached_bytes == _tally(session) <= session.memory_budget_bytes


def test_changing_the_mixture_settings_invalidates_memoised_steps(ct):
    moe = tiny_moe()
    with torch.no_grad():  # a gate that favours expert2 with score ~0.6
        moe.gate.fc2.weight.zero_()
        moe.gate.fc2.bias.copy_(torch.tensor([0.0, -5.0, 0.5]))
    moe.tau = 0.9
    session = Session(ct, moe, device="cpu", max_windows=1)
    session.add_point(_centre_ras(ct))
    assert session.predict().decoders == ["general"]
    moe.tau = 0.1  # a session without its own tau follows the model's
    assert session.predict().decoders == ["general", "expert2"]


def test_expert_tau_and_selector_are_per_session(ct):
    moe = tiny_moe()
    with torch.no_grad():
        moe.gate.fc2.weight.zero_()
        moe.gate.fc2.bias.copy_(torch.tensor([0.0, -5.0, 0.5]))
    moe.tau = 0.9
    own, other = (Session(ct, moe, device="cpu", max_windows=1) for _ in range(2))
    for session in (own, other):
        session.add_point(_centre_ras(ct))
    own.tau = 0.1
    own.selector = "average"
    assert own.predict().weights == {"general": 0.5, "expert2": 0.5}
    assert other.predict().decoders == ["general"]
    assert moe.tau == 0.9 and moe.selector == "paper" and other.tau == 0.9
    own.expert = "expert1"
    assert own.predict().decoders == ["expert1"]
    own.tau = None
    assert own.tau == 0.9
    with pytest.raises(SAMMed3DError, match="no expert named 'liver'"):
        own.expert = "liver"
    with pytest.raises(SAMMed3DError, match="between 0 and 1"):
        own.tau = 2
    with pytest.raises(SAMMed3DError, match="unknown selector"):
        own.selector = "vote"


def test_user_points_reach_the_neighbouring_windows(ct):
    model = _constant_model(8.0)
    seen = []
    model.base.prompt_encoder.register_forward_hook(
        lambda _m, _a, kwargs, _o: seen.append(None if kwargs["points"] is None else kwargs["points"][1].tolist()),
        with_kwargs=True)
    session = Session(ct, model, device="cpu", max_windows=3)
    session.add_point(_centre_ras(ct))
    far = _centre_ras(ct, (40, 50, 15))  # outside the first window, inside its neighbour along i
    session.add_point(far, positive=False)
    result = session.predict()
    assert len(result.windows) == 3
    # seen[0] is the first window's step (its one positive click); later decodes are the
    # neighbours': seed point first, then the user's clicks that lie inside that window
    assert seen[0] == [[1]]
    assert any(labels[0][0] == 1 and 0 in labels[0][1:] for labels in seen[1:]), \
        "a neighbour window got the seed and the user's negative click"
    assert not any("outside every window" in note for note in result.notes)


def test_malformed_prompts_are_explained(ct):
    session = Session(ct, tiny_moe(), device="cpu")
    with pytest.raises(SAMMed3DError, match="three finite coordinates"):
        session.add_point([1.0, 2.0])
    with pytest.raises(SAMMed3DError, match="three finite coordinates"):
        session.set_box([1, 2], [3, 4, 5])
    with pytest.raises(SAMMed3DError, match="three finite voxel indices"):
        session.add_point_ijk([1, 2])
