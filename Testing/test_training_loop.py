"""The pre-training loop on the real example CT with the tiny model: the loss falls, a resumed run
continues exactly, and two gloo processes (real torch.distributed, via torchrun) give the same
weights as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_DIR
from SAMMed3DMoELib.errors import SAMMed3DError
from Training import pretrain
from Training.checkpoints import load_checkpoint
from training_helpers import TINY_RUN, checkpoint_model, converted_datasets, train_losses


def _args(tmp_path_factory, data_dir, out, *extra):
    data = converted_datasets(tmp_path_factory.getbasetemp(), data_dir)
    cache = tmp_path_factory.getbasetemp() / "prepared"
    return ["--data", str(data["Dataset501_ExampleCT"]), "--cache-dir", str(cache), "--model-size", "tiny", "--spacing", "3",
            "--out", str(out), *TINY_RUN, *extra]


def test_loss_falls_on_the_example_ct(tmp_path_factory, data_dir, tmp_path):
    out = tmp_path / "run"
    argv = _args(tmp_path_factory, data_dir, out, "--classes", "liver,spleen", "--steps", "60", "--batch-size", "2",
                 "--lr", "2e-3", "--lr-prompt-encoder", "2e-3", "--lr-mask-decoder", "2e-3", "--schedule", "constant",
                 "--iterations", "3", "--mask-only-iterations", "1", "--flip-prob", "0")
    assert pretrain.main(argv) == 0
    losses = train_losses(out)
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses
    # The run exported a bundle that loads, and its checkpoints load with weights_only=True.
    from SAMMed3DMoELib.bundle import load_bundle

    assert load_bundle(out / "bundle").preprocessing["spacing_mm"] == 3.0
    assert load_checkpoint(out / "latest.pt")["loop"]["step"] == 60


def test_resume_continues_exactly(tmp_path_factory, data_dir, tmp_path):
    common = ["--classes", "liver,spleen,aorta,kidney_left", "--steps", "6", "--batch-size", "1", "--accumulate", "2",
              "--lr", "1e-3", "--warmup-steps", "2", "--milestones", "0.5", "--iterations", "3"]
    whole = tmp_path / "whole"
    assert pretrain.main(_args(tmp_path_factory, data_dir, whole, *common, "--no-resume")) == 0
    split = tmp_path / "split"
    assert pretrain.main(_args(tmp_path_factory, data_dir, split, *common, "--stop-at-step", "3")) == 0
    assert load_checkpoint(split / "latest.pt")["loop"]["step"] == 3
    assert not (split / "bundle").exists()  # stopped early: nothing exported yet
    # 3 steps of a 6-step schedule: the same weights as the 6-step run at step 3, and a bundle.
    # ("--steps 3" after common's "--steps 6": argparse keeps the last.)
    truncated = tmp_path / "truncated"
    assert pretrain.main(_args(tmp_path_factory, data_dir, truncated, *common, "--steps", "3", "--schedule-steps", "6")) == 0
    a, b = checkpoint_model(split), checkpoint_model(truncated)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (truncated / "bundle" / "config.json").exists()
    with pytest.raises(SAMMed3DError, match="--schedule-steps"):
        pretrain.main(_args(tmp_path_factory, data_dir, tmp_path / "bad", *common, "--schedule-steps", "5"))
    # Resumed with a DataLoader worker this time: the samples must not depend on it.
    resumed = _args(tmp_path_factory, data_dir, split, *common)
    resumed[resumed.index("--num-workers") + 1] = "1"
    assert pretrain.main(resumed) == 0
    assert train_losses(split) == train_losses(whole)
    a, b = checkpoint_model(whole), checkpoint_model(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck_a, ck_b = load_checkpoint(whole / "latest.pt"), load_checkpoint(split / "latest.pt")
    assert ck_a["loop"] == ck_b["loop"] and ck_a["scheduler"] == ck_b["scheduler"]


def test_exported_bundle_says_whether_box_prompts_were_trained(tmp_path_factory, data_dir, tmp_path):
    """The session uses a box only when the bundle says its embeddings were trained: a run with
    --box-prob > 0 says so, one without does not, and a run started from a bundle keeps its word."""
    from SAMMed3DMoELib.bundle import load_bundle

    common = ["--classes", "spleen", "--steps", "2", "--batch-size", "1", "--iterations", "2"]
    boxed, plain, continued = tmp_path / "boxed", tmp_path / "plain", tmp_path / "continued"
    assert pretrain.main(_args(tmp_path_factory, data_dir, boxed, *common, "--box-prob", "1")) == 0
    assert pretrain.main(_args(tmp_path_factory, data_dir, plain, *common)) == 0
    assert load_bundle(boxed / "bundle").box_prompts_trained is True
    assert load_bundle(plain / "bundle").box_prompts_trained is False
    assert pretrain.main(_args(tmp_path_factory, data_dir, continued, *common, "--init", str(boxed / "bundle"),
                               "--parts", "mask_decoder")) == 0
    assert load_bundle(continued / "bundle").box_prompts_trained is True


def test_click_marks_are_recorded_and_kept(tmp_path_factory, data_dir, tmp_path):
    """--click-mark-radius: the exported bundle records it (so the session marks clicks the same
    way), a run started from that bundle keeps it, and a negative radius is refused by name."""
    from SAMMed3DMoELib.bundle import load_bundle
    from SAMMed3DMoELib.errors import SAMMed3DError

    common = ["--classes", "spleen,liver", "--steps", "2", "--batch-size", "1", "--iterations", "2"]
    marked, continued = tmp_path / "marked", tmp_path / "continued"
    assert pretrain.main(_args(tmp_path_factory, data_dir, marked, *common, "--click-mark-radius", "4",
                               "--other-target-prob", "0.5")) == 0
    assert load_bundle(marked / "bundle").base.prompt_encoder.click_mark_radius == 4.0
    assert pretrain.main(_args(tmp_path_factory, data_dir, continued, *common, "--init", str(marked / "bundle"))) == 0
    assert load_bundle(continued / "bundle").base.config["click_mark_radius"] == 4.0
    with pytest.raises(SAMMed3DError, match="--click-mark-radius must be >= 0"):
        pretrain.main(_args(tmp_path_factory, data_dir, tmp_path / "bad", *common, "--click-mark-radius", "-1"))


def test_two_gloo_processes_match_one_process(tmp_path_factory, data_dir, tmp_path):
    """Real torch.distributed: torchrun starts 2 CPU processes (gloo); each takes half of every
    global batch. DDP must average the gradients, so rank 0's weights equal one process's."""
    common = ["--classes", "liver,spleen,aorta,kidney_left", "--steps", "3", "--lr", "1e-3", "--iterations", "3"]
    single = tmp_path / "single"
    assert pretrain.main(_args(tmp_path_factory, data_dir, single, *common, "--batch-size", "2")) == 0
    double = tmp_path / "double"
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "Training.pretrain", *_args(tmp_path_factory, data_dir, double, *common, "--batch-size", "1")]
    done = subprocess.run(cmd, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    one, two = checkpoint_model(single), checkpoint_model(double)
    moved = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved < 1e-5, moved
    np.testing.assert_allclose(train_losses(single), train_losses(double), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed precision runs on CUDA only)")
def test_mixed_precision_training_on_a_gpu(tmp_path_factory, data_dir, tmp_path):
    out = tmp_path / "amp"
    argv = _args(tmp_path_factory, data_dir, out, "--classes", "liver,spleen", "--steps", "3", "--batch-size", "2",
                 "--iterations", "3", "--device", "cuda", "--amp", "on")
    assert pretrain.main(argv) == 0
    ck = load_checkpoint(out / "latest.pt")
    assert ck["scaler"]["scale"] > 0 and all(np.isfinite(train_losses(out)))
