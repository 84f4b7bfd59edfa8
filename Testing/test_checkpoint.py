"""Official checkpoint files: every accepted form, every refused one, and files that carry code
(refused by name, never run, never called "damaged")."""

from __future__ import annotations

import argparse
import builtins
import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference_weights import assert_same_state
from SAMMed3DMoELib import checkpoint as C
from SAMMed3DMoELib.errors import SAMMed3DError, UnsafeCheckpointError
from tiny_models import TINY, tiny_sam


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["official", "raw", "module_prefix", "state_dict_key", "safetensors", "numpy_extras"])
def test_checkpoint_forms_load_every_tensor(tmp_path, form):
    model = tiny_sam(seed=1, box_prompts=False)
    sd = model.state_dict()
    path = tmp_path / ("model.safetensors" if form == "safetensors" else "model.pth")
    if form == "official":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.save({"model_state_dict": sd, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3,
                    "losses": [0.9, 0.5], "best_loss": 0.5}, path)
    elif form == "raw":
        torch.save(sd, path)
    elif form == "module_prefix":
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    elif form == "state_dict_key":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "global_step": 10}, path)
    elif form == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # what official training scripts keep next to the weights: their arguments, numpy numbers
        torch.save({"model_state_dict": sd, "args": argparse.Namespace(lr=1e-4, gpu_ids=[0, 1], task="x"),
                    "dices": [np.float64(0.8)], "best_dice": np.float32(0.8), "epoch": np.int64(4)}, path)

    loaded = C.load_state_dict_file(path)
    assert_same_state(sd, loaded)
    rebuilt = C.load_checkpoint(path, **TINY)
    assert not rebuilt.box_prompts
    assert_same_state(sd, rebuilt.state_dict())
    assert rebuilt.config == model.config


@pytest.mark.parametrize("box_prompts", [False, True])
def test_box_prompts_detected_from_the_file(tmp_path, box_prompts):
    model = tiny_sam(seed=2, box_prompts=box_prompts)
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "m.pth")
    loaded = C.load_checkpoint(tmp_path / "m.pth", **TINY)
    assert loaded.box_prompts is box_prompts
    assert_same_state(model.state_dict(), loaded.state_dict())
    if box_prompts:  # forcing the other architecture names the keys it lacks
        with pytest.raises(SAMMed3DError, match=r"unexpected key\(s\).*point_embeddings\.2\.weight"):
            C.load_checkpoint(tmp_path / "m.pth", box_prompts=False, **TINY)



# --------------------------------------------------------------------------------------------
# Files that carry code
# --------------------------------------------------------------------------------------------
class _Call:
    """Unpickling this calls ``function(*args)``: each payload below creates ``marker`` if it runs."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payload(kind: str, marker: Path):
    """(object whose unpickling would create ``marker``, a name the refusal must give)."""
    touch = f"open({str(marker)!r}, 'w').close()"
    if kind == "os.system":  # pickled as posix.system (nt.system on Windows)
        return _Call(os.system, f"touch {marker}"), os.system.__module__ + ".system"
    if kind == "subprocess":
        return _Call(subprocess.call, [sys.executable, "-c", touch]), "subprocess.call"
    if kind == "eval":
        return _Call(builtins.eval, touch), "builtins.eval"
    if kind == "exec":
        return _Call(builtins.exec, touch), "builtins.exec"
    if kind == "partial":  # a callable built at load time, then called
        return _Call(functools.partial(open, str(marker), "w")), "functools.partial"
    raise AssertionError(kind)


PAYLOADS = ["os.system", "subprocess", "eval", "exec", "partial"]
PLACES = ["top_level", "in_state_dict"]
CONTAINERS = ["torch_zip", "torch_legacy", "plain_pickle"]


def _write(path: Path, obj, container: str) -> None:
    if container == "torch_zip":
        torch.save(obj, path)
    elif container == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as handle:
            pickle.dump(obj, handle)  # the default protocol (STACK_GLOBAL, not GLOBAL)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_really_run_when_unpickled_normally(tmp_path, kind):
    """The control for the test below: an ordinary unpickler does run each payload."""
    marker = tmp_path / "ran"
    obj, _ = _payload(kind, marker)
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_file_that_carries_code_is_named_so_and_never_runs(tmp_path, kind, place, container):
    marker = tmp_path / "ran"
    obj, name = _payload(kind, marker)
    content = obj if place == "top_level" else {"model_state_dict": {"w": torch.zeros(2), "hook": obj}, "epoch": 1}
    path = tmp_path / "model.pth"
    _write(path, content, container)

    for load in (C.load_state_dict_file, C.load_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "model.pth carries code" in message and name in message
        assert "refused" in message and "nothing in it ran" in message
        for advice in ("weights_only", "damaged", "again", "trust the source"):
            assert advice not in message, advice
    assert info.value.exit_code == 2
    assert not marker.exists()


def test_damaged_file_with_code_is_still_named_as_carrying_code(tmp_path):
    """Truncated after the payload: what could be read is enough to refuse it as code."""
    marker = tmp_path / "ran"
    obj, name = _payload("os.system", marker)
    path = tmp_path / "cut.pth"
    _write(path, {"hook": obj, "model_state_dict": {"w": torch.zeros(1000)}}, "torch_legacy")
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(UnsafeCheckpointError, match=name):
        C.load_state_dict_file(path)
    assert not marker.exists()


def test_the_loader_allowlist_is_readable():
    """checkpoint.py names refused globals against torch's own weights-only allowlist (a private
    module of torch): a torch release that moves it fails here, not silently."""
    allowed = C._loader_allowlist()
    assert "torch._utils._rebuild_tensor_v2" in allowed and "collections.OrderedDict" in allowed
    assert "argparse.Namespace" in allowed  # ours, for official training checkpoints
    assert "posix.system" not in allowed and "builtins.eval" not in allowed


def test_plain_pickle_of_numbers_is_another_format_not_code(tmp_path):
    path = tmp_path / "numbers.pth"
    path.write_bytes(pickle.dumps({"epoch": 3, "lr": [0.1, 0.01]}, protocol=4))
    with pytest.raises(SAMMed3DError, match="not a PyTorch checkpoint this program can read") as info:
        C.load_state_dict_file(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "weights_only" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Damaged files and other refusals
# --------------------------------------------------------------------------------------------
def test_truncated_empty_and_missing_files_are_explained(tmp_path):
    sd = tiny_sam(seed=1, box_prompts=False).state_dict()
    full = tmp_path / "full.pth"
    torch.save({"model_state_dict": sd, "epoch": 3}, full)
    data = full.read_bytes()

    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAMMed3DError, match=r"half\.pth is damaged.*Download or copy it again"):
        C.load_state_dict_file(half)

    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-1000])
    with pytest.raises(SAMMed3DError, match="damaged"):
        C.load_state_dict_file(legacy)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(SAMMed3DError, match="empty"):
        C.load_state_dict_file(empty)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SAMMed3DError, match=r"garbage\.pth is damaged"):
        C.load_state_dict_file(garbage)

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(SAMMed3DError, match=r"model\.safetensors is damaged"):
        C.load_state_dict_file(st)

    with pytest.raises(SAMMed3DError, match="not found"):
        C.load_state_dict_file(tmp_path / "nowhere.pth")
    with pytest.raises(SAMMed3DError, match="folder"):
        C.load_state_dict_file(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(SAMMed3DError, match="unknown checkpoint type"):
        C.load_state_dict_file(tmp_path / "model.onnx")


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(3)], "holds a list"),
    ({"epoch": 3, "note": "hello"}, "none of model_state_dict"),
    ({"model_state_dict": {"w": "not a tensor"}}, "none of model_state_dict"),
    ({}, "no weights"),
])
def test_objects_that_are_not_state_dicts(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pth")
    with pytest.raises(SAMMed3DError, match=message):
        C.load_state_dict_file(tmp_path / "x.pth")


def test_wrong_architecture_is_explained(tmp_path):
    # A tiny SAM-Med3D into the official size: fewer blocks, smaller tensors.
    torch.save({"model_state_dict": tiny_sam(box_prompts=False).state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(SAMMed3DError) as info:
        C.load_checkpoint(tmp_path / "tiny.pth")
    text = str(info.value)
    assert "SAM-Med3D ViT-B 'ori'" in text and "sam_med3d_turbo.pth" in text
    assert "missing key(s) (image_encoder.blocks.2." in text
    grid = TINY["img_size"] // TINY["patch_size"]
    assert f"image_encoder.pos_embed: file [1, {grid}, {grid}, {grid}, 48] vs model [1, 8, 8, 8, 768]" in text
    assert "another size or variant" in text

    # A 2D SAM image encoder.
    sam2d = {"image_encoder.patch_embed.proj.weight": torch.zeros(48, 3, 16, 16),
             "image_encoder.pos_embed": torch.zeros(1, 4, 4, 48), "mask_decoder.iou_token.weight": torch.zeros(1, 48)}
    torch.save(sam2d, tmp_path / "sam2d.pth")
    with pytest.raises(SAMMed3DError, match="2D SAM checkpoint"):
        C.load_checkpoint(tmp_path / "sam2d.pth", **TINY)

    # Something else entirely, and a bare mask decoder.
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}, tmp_path / "resnet.pth")
    with pytest.raises(SAMMed3DError, match=r"2 unexpected key\(s\) \(conv1\.weight, fc\.bias\).*another architecture"):
        C.load_checkpoint(tmp_path / "resnet.pth", **TINY)
    torch.save(tiny_sam().mask_decoder.state_dict(), tmp_path / "decoder.pth")
    with pytest.raises(SAMMed3DError, match="mask decoder alone.*add_expert_to_bundle"):
        C.load_checkpoint(tmp_path / "decoder.pth", **TINY)


def test_missing_keys_are_named(tmp_path):
    sd = tiny_sam(box_prompts=False).state_dict()
    dropped = ["mask_decoder.iou_token.weight", "image_encoder.neck.1.bias"]
    for key in dropped:
        del sd[key]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(SAMMed3DError, match=r"2 missing key\(s\)") as info:
        C.load_checkpoint(tmp_path / "partial.pth", **TINY)
    assert all(key in str(info.value) for key in dropped)
    assert "unexpected" not in str(info.value)

