"""The mixture of experts: gate, selector (paper §2.3 and its ablation variants), overrides,
only contributing decoders run, adding/removing experts leaves old behaviour intact."""

from __future__ import annotations

import pytest
import torch

from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.model import build_sam_med3d
from SAMMed3DMoELib.moe import GENERAL, SamMed3DMoE, fuse, probability_to_logits
from tiny_models import tiny_moe, tiny_sam


@pytest.fixture
def setup():
    torch.manual_seed(5)
    moe = tiny_moe(num_experts=2)
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        embedding = moe.encode(image)
    points = (torch.tensor([[[16.0, 12.0, 20.0], [5.0, 6.0, 7.0]]]), torch.tensor([[1, 0]]))
    return moe, embedding, points


def _count_calls(moe):
    calls = {}
    decoders = {GENERAL: moe.base.mask_decoder, **dict(moe.experts.items())}
    for name, decoder in decoders.items():
        decoder.register_forward_hook(lambda *_args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return calls


def _force_gate(moe, expert_index: int, strength: float):
    """Bias the gate's last layer so one output dominates (a trained gate's behaviour)."""
    with torch.no_grad():
        moe.gate.fc2.weight.zero_()
        moe.gate.fc2.bias.zero_()
        moe.gate.fc2.bias[expert_index] = strength


def test_gate_scores_are_a_distribution_that_ignores_padding(setup):
    moe, embedding, points = setup
    pe = moe.base.prompt_encoder.get_dense_pe()
    sparse, _ = moe.base.prompt_encoder(points=points, boxes=None, masks=None)
    mask = SamMed3DMoE.prompt_mask(points, None, sparse)
    assert mask.tolist() == [[True, True, False]]
    scores = moe.gate.scores(embedding, pe, sparse, mask)
    assert scores.shape == (1, 3)
    assert torch.allclose(scores.sum(-1), torch.ones(1))
    changed = sparse.clone()
    changed[:, -1] += 10.0  # padding token
    assert torch.allclose(moe.gate.scores(embedding, pe, changed, mask), scores, atol=1e-6)
    changed = sparse.clone()
    changed[:, 0] += 1.0  # a real prompt token
    assert not torch.allclose(moe.gate.scores(embedding, pe, changed, mask), scores, atol=1e-6)


def test_selector_paper_formula_and_only_contributing_decoders_run(setup):
    moe, embedding, points = setup
    _force_gate(moe, expert_index=2, strength=4.0)  # expert2 dominates
    calls = _count_calls(moe)
    with torch.no_grad():
        pred = moe.predict(embedding, points=points)
        general, _ = moe.predict(embedding, points=points, expert=GENERAL).logits, None
        expert2 = moe.predict(embedding, points=points, expert="expert2").logits
    s = pred.scores["expert2"]
    assert s > moe.tau
    assert pred.decoders == [GENERAL, "expert2"]
    assert pred.weights == pytest.approx({GENERAL: 1 - s, "expert2": s})
    expected = (1 - s) * torch.sigmoid(general) + s * torch.sigmoid(expert2)
    assert torch.allclose(pred.probability, expected, atol=1e-5)
    # auto ran general + expert2; the overrides ran one each; expert1 never ran.
    assert calls == {GENERAL: 2, "expert2": 2}


def test_low_top_score_uses_general_only(setup):
    moe, embedding, points = setup
    _force_gate(moe, expert_index=0, strength=4.0)  # "general" dominates
    calls = _count_calls(moe)
    with torch.no_grad():
        pred = moe.predict(embedding, points=points)
        calls_in_predict = dict(calls)
        general = moe.base.decode(embedding, points=points)[0]
    assert pred.decoders == [GENERAL]
    assert max(pred.scores["expert1"], pred.scores["expert2"]) <= moe.tau
    assert torch.allclose(pred.logits, general)
    assert calls_in_predict == {GENERAL: 1}


@pytest.mark.parametrize("selector", ["average", "renormalized"])
def test_ablation_selectors(selector):
    general = torch.tensor([2.0, -1.0, 0.0])
    expert = torch.tensor([-3.0, 4.0, 1.0])
    fused, w = fuse(general, expert, s_general=0.2, s_top=0.7, tau=0.5, selector=selector)
    w_e = 0.5 if selector == "average" else 0.7 / 0.9
    assert w["expert"] == pytest.approx(w_e)
    assert torch.allclose(torch.sigmoid(fused), (1 - w_e) * torch.sigmoid(general) + w_e * torch.sigmoid(expert), atol=1e-6)
    same, w = fuse(general, expert, s_general=0.6, s_top=0.4, tau=0.5, selector=selector)
    assert torch.equal(same, general) and w["expert"] == 0.0


def test_fused_mask_is_finite_next_click_prompt():
    logits = probability_to_logits(torch.tensor([0.0, 1.0, 0.5]))
    assert torch.isfinite(logits).all() and logits[2] == 0


def test_unknown_expert_and_selector_are_explained(setup):
    moe, embedding, points = setup
    with pytest.raises(SAMMed3DError, match="no expert named 'liver'.*expert1, expert2"):
        moe.predict(embedding, points=points, expert="liver")
    with pytest.raises(SAMMed3DError, match="selector"):
        fuse(torch.zeros(1), torch.zeros(1), 0.1, 0.9, 0.5, "max")


def test_without_gate_is_plain_sam_med3d():
    base = tiny_sam()
    moe = SamMed3DMoE(base)
    image = torch.randn(1, 1, 64, 64, 64)
    points = (torch.tensor([[[10.0, 11.0, 12.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        embedding = moe.encode(image)
        pred = moe.predict(embedding, points=points)
        logits, iou = base(image, points=points)
    assert pred.scores is None and pred.decoders == [GENERAL]
    assert torch.allclose(pred.logits, logits) and torch.allclose(pred.iou, iou)


def test_adding_an_expert_does_not_change_old_results(setup):
    moe, embedding, points = setup
    _force_gate(moe, expert_index=1, strength=3.0)
    with torch.no_grad():
        before = moe.predict(embedding, points=points)
        moe.add_expert("expert3", moe.base.new_mask_decoder())
        after = moe.predict(embedding, points=points)
    assert moe.expert_names == ["expert1", "expert2", "expert3"]
    assert after.scores["expert3"] < 1e-9
    assert after.decoders == before.decoders
    assert torch.allclose(after.logits, before.logits, atol=1e-6)
    with pytest.raises(SAMMed3DError, match="already exists"):
        moe.add_expert("expert1", moe.base.new_mask_decoder())


def test_removing_an_expert_keeps_the_others(setup):
    moe, embedding, points = setup
    _force_gate(moe, expert_index=2, strength=3.0)
    with torch.no_grad():
        before = moe.predict(embedding, points=points, expert="expert2").logits
        gate_logits_before = moe.gate.fc2.bias.clone()
        moe.remove_expert("expert1")
        after = moe.predict(embedding, points=points)
    assert moe.expert_names == ["expert2"] and moe.gate.num_experts == 1
    assert torch.equal(moe.gate.fc2.bias, gate_logits_before[[0, 2]])
    assert after.decoders == [GENERAL, "expert2"]
    assert torch.allclose(moe.predict(embedding, points=points, expert="expert2").logits, before)
    with pytest.raises(SAMMed3DError, match="no expert named"):
        moe.remove_expert("expert1")


def test_gate_is_trainable_end_to_end(setup):
    moe, embedding, points = setup
    moe.train()
    sparse, _ = moe.base.prompt_encoder(points=points, boxes=None, masks=None)
    mask = SamMed3DMoE.prompt_mask(points, None, sparse)
    optimizer = torch.optim.AdamW(moe.gate.parameters(), lr=1e-2)
    target = torch.tensor([2])
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(
            moe.gate(embedding, moe.base.prompt_encoder.get_dense_pe(), sparse.detach(), mask), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moe.eval()
    with torch.no_grad():
        assert moe.predict(embedding, points=points).scores["expert2"] > 0.9


def test_gate_must_match_expert_count():
    moe = tiny_moe(num_experts=2)
    with pytest.raises(SAMMed3DError, match="gate scores 2 expert"):
        SamMed3DMoE(moe.base, {"a": moe.base.new_mask_decoder()}, moe.gate)


def test_experts_work_with_the_full_size_architecture():
    base = build_sam_med3d()
    expert = base.new_mask_decoder()
    assert {k: v.shape for k, v in expert.state_dict().items()} == {
        k: v.shape for k, v in base.mask_decoder.state_dict().items()}
