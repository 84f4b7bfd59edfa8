"""Fine-tuning an expert (LoRA, frozen encoders, cached embeddings) and training the gate, with
the tiny model on the real example CT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from SAMMed3DMoELib.bundle import load_bundle
from SAMMed3DMoELib.clicks import bounding_boxes, sample_clicks
from SAMMed3DMoELib.evaluation import read_dataset
from SAMMed3DMoELib.moe import SamMed3DMoE
from Training import finetune_expert, train_gate
from Training.data import Augmentation, CropDataset, Preprocessing, PreparedCases, build_items
from Training.distributed import DistContext
from Training.interactive import balanced_decoder_weights
from Training.lora import add_lora
from Training.validation import validation_score
from training_helpers import TINY_RUN, checkpoint_model, converted_datasets, tiny_bundle, train_losses


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    base = tmp_path_factory.getbasetemp()
    return converted_datasets(base, data_dir)["Dataset501_ExampleCT"], base / "prepared"


def _expert_run(bundle, out, data, cache, *extra):
    return finetune_expert.main(["--bundle", str(bundle), "--name", "vessels", "--classes", "aorta,inferior_vena_cava",
                                 "--data", str(data), "--cache-dir", str(cache), "--out", str(out), "--steps", "4",
                                 "--batch-size", "2", "--crops-per-item", "1", "--lr", "1e-3", "--iterations", "3",
                                 *TINY_RUN, *extra])


def test_embedding_cache_gives_the_same_losses_and_lora_exports_a_plain_decoder(setup, tmp_path):
    data, cache = setup
    cached_bundle, fresh_bundle = tiny_bundle(tmp_path / "cached"), tiny_bundle(tmp_path / "fresh")
    assert _expert_run(cached_bundle, tmp_path / "run_cached", data, cache) == 0
    assert _expert_run(fresh_bundle, tmp_path / "run_fresh", data, cache, "--no-embedding-cache") == 0
    cached, fresh = train_losses(tmp_path / "run_cached"), train_losses(tmp_path / "run_fresh")
    assert len(cached) == 4
    np.testing.assert_allclose(cached, fresh, rtol=1e-5)
    stats = json.loads((cached_bundle / "training" / "expert_vessels.json").read_text())["embedding_cache"]
    assert stats == {"entries": 2, "hits": 6, "misses": 2}  # 2 crops encoded once, reused in steps 2-4

    # The exported expert is a plain MaskDecoder3D (strict load) that computes what the LoRA
    # decoder of the checkpoint computes; only LoRA targets and the upscaling changed.
    moe = load_bundle(cached_bundle)
    assert moe.expert_names == ["vessels"] and moe.expert_info["vessels"].targets == ["aorta", "inferior_vena_cava"]
    expert, general = moe.experts["vessels"], moe.base.mask_decoder
    lora = copy.deepcopy(general)
    add_lora(lora, ["q_proj", "v_proj"], rank=4, alpha=4.0)
    lora.load_state_dict(checkpoint_model(tmp_path / "run_cached"))
    torch.manual_seed(0)
    inputs = (torch.randn(1, 48, 2, 2, 2), moe.base.prompt_encoder.get_dense_pe(), torch.randn(1, 3, 48),
              torch.randn(1, 48, 2, 2, 2))
    with torch.no_grad():
        torch.testing.assert_close(expert(*inputs)[0], lora(*inputs)[0], rtol=1e-5, atol=1e-6)
    plain, old = expert.state_dict(), general.state_dict()
    changed = {k for k in plain if not torch.equal(plain[k], old[k])}
    assert changed and all(".q_proj.weight" in k or ".v_proj.weight" in k or k.startswith("output_upscaling") for k in changed)


def _gate_argv(bundle, classes, setup, out, *, steps: int, crops: int):
    """train_gate options for a tiny gate trained on cross-entropy alone (constant lr 1e-2)."""
    data, cache = setup
    return ["--bundle", str(bundle), "--classes", ",".join(classes), "--data", str(data), "--cache-dir", str(cache),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--lr", "1e-2", "--weight-decay", "0",
            "--schedule", "constant", "--gate-mlp-dim", "32", "--gate-hidden-dim", "16", "--iterations", "2",
            "--dice-weight", "0", "--crops-per-item", str(crops), "--seed", "1", *TINY_RUN]


SPLIT = {"lungs": (["lung_lower_lobe_left", "lung_lower_lobe_right"], "CT"), "bones": (["hip_left", "hip_right"], "CT")}
SPLIT_CLASSES = ["liver", "spleen", "lung_lower_lobe_left", "lung_lower_lobe_right", "hip_left", "hip_right"]


def _routed_right(moe, setup, prompt: str) -> float:
    """Share of fresh prompts (``"click"``: a first click; ``"box"``: a box alone) on the four
    training crops of each item of SPLIT_CLASSES that the gate sends to the item's decoder."""
    data, cache = setup
    pre = Preprocessing(3.0, 32)
    cases = PreparedCases([read_dataset(data)], pre, cache)
    items = train_gate.label_items(moe, build_items(cases, SPLIT_CLASSES))
    crops = CropDataset(cases, items, pre, seed=1, fixed_crops=4, iterations=1, augment=Augmentation(flip_prob=0.0))
    right = total = 0
    with torch.no_grad():
        for index in range(len(items)):
            for epoch in range(4, 8):  # the four training crops, with clicks and box jitter never used in training
                sample = crops[(index, epoch)]
                emb = moe.encode(sample["image"][None])
                target = sample["target"][None]
                points = boxes = None
                if prompt == "box":
                    boxes = bounding_boxes(target > 0, sample["box_jitter"][None])
                else:
                    points = sample_clicks(torch.zeros_like(target) > 0, target > 0, sample["click_u"][:1])
                sparse, _ = moe.base.prompt_encoder(points=points, boxes=boxes)
                scores = moe.gate_scores(emb, sparse, SamMed3DMoE.prompt_mask(points, boxes, sparse))
                right += int(scores[0].argmax()) == items[index].expert
                total += 1
    return right / total


def test_gate_routes_prompts_to_the_right_expert(setup, tmp_path):
    """A small split of the example CT: lungs -> expert 'lungs', hips -> 'bones', liver and
    spleen -> general. After training, fresh clicks on the training crops go to the right
    decoder. (With the random tiny encoder the gate learns these crops; routing on unseen
    crops needs a trained encoder, as in the demo model.)"""
    bundle = tiny_bundle(tmp_path / "bundle", SPLIT)
    assert train_gate.main(_gate_argv(bundle, SPLIT_CLASSES, setup, tmp_path / "run", steps=50, crops=4)) == 0
    moe = load_bundle(bundle)
    assert moe.gate is not None and moe.gate.num_experts == 2
    info = json.loads((bundle / "training" / "gate.json").read_text())
    assert info["items_per_decoder"] == {"general": 2, "lungs": 2, "bones": 2}
    assert _routed_right(moe, setup, "click") >= 0.8


def test_gate_trained_with_boxes_routes_a_box(setup, tmp_path):
    """--box-prob: half of the steps prompt with a box (alone, then with the clicks); the gate
    then sends a box alone to the right decoder as well as a click. (This tiny gate routes boxes
    without box steps too; the demo model's tables show what box steps change for a real one.)"""
    bundle = tiny_bundle(tmp_path / "bundle", SPLIT)
    argv = _gate_argv(bundle, SPLIT_CLASSES, setup, tmp_path / "run", steps=80, crops=4) + ["--box-prob", "0.5"]
    assert train_gate.main(argv) == 0
    moe = load_bundle(bundle)
    assert json.loads((bundle / "training" / "gate.json").read_text())["box_prob"] == 0.5
    assert _routed_right(moe, setup, "box") >= 0.8
    assert _routed_right(moe, setup, "click") >= 0.8


def test_balanced_gate_weights_give_every_decoder_the_same_total():
    """20 general items, 5 of one expert, 14 of another (the demo's gate): after weighting, each
    decoder's items weigh the same in total; a decoder without items keeps weight 1."""
    labels = [0] * 20 + [1] * 5 + [2] * 14
    weights = balanced_decoder_weights(labels, 4)
    totals = [float(weights[d]) * labels.count(d) for d in range(3)]
    assert totals == pytest.approx([len(labels) / 3] * 3)
    assert float(weights[3]) == 1.0


def test_validation_score_by_group_is_the_mean_over_groups():
    """Three samples of group 0 with Dice 0.9 and one of group 1 with Dice 0.1: the plain mean is
    0.7, the mean over groups 0.5 (what τ and the gate's best checkpoint are chosen by)."""
    samples = [{"image": torch.zeros(1), "expert": torch.tensor(g), "dice": torch.tensor(d)}
               for g, d in [(0, 0.9), (0, 0.9), (0, 0.9), (1, 0.1)]]

    def run_batch(batch):
        return [batch["dice"].tolist()]  # one click

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert validation_score(samples, run_batch, ctx, 2) == pytest.approx(0.7)
    assert validation_score(samples, run_batch, ctx, 2, group_by="expert", groups=3) == pytest.approx(0.5)


def test_balanced_gate_routes_a_small_expert(setup, tmp_path):
    """Five general classes and one expert class (lungs): with the default balanced
    cross-entropy the gate learns to send lung clicks to the expert instead of answering
    "general" everywhere; gate.json reports routing accuracy per decoder."""
    bundle = tiny_bundle(tmp_path / "bundle", {"lungs": (["lung_lower_lobe_left"], "CT")})
    classes = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "lung_lower_lobe_left"]
    assert train_gate.main(_gate_argv(bundle, classes, setup, tmp_path / "run", steps=60, crops=2)) == 0
    info = json.loads((bundle / "training" / "gate.json").read_text())
    assert info["items_per_decoder"] == {"general": 5, "lungs": 1}
    accuracy = info["routing_accuracy"]
    assert set(accuracy) == {"all", "general", "lungs"}
    assert accuracy["lungs"] == 1.0 and accuracy["general"] >= 0.6, accuracy
