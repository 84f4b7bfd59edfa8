"""Mixture-of-experts bundles on disk: round trip, checksums, validation, editing, a base on the
(local stand-in) Hub, and the full-size official architecture through convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference_weights import assert_same_state, reference_state_dict
from SAMMed3DMoELib import bundle as B
from SAMMed3DMoELib import checkpoint as C
from SAMMed3DMoELib import hub
from SAMMed3DMoELib.errors import DownloadError, SAMMed3DError
from SAMMed3DMoELib.files import file_sha256
from SAMMed3DMoELib.model import GatingNetwork
from SAMMed3DMoELib.moe import ExpertInfo, SamMed3DMoE
from tiny_models import TINY, tiny_moe, tiny_sam

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _inputs(moe: SamMed3DMoE, seed: int = 3):
    size = moe.base.img_size
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 1, size, size, size, generator=gen)
    points = (torch.tensor([[[size * 0.5, size * 0.4, size * 0.6], [size * 0.2, size * 0.3, size * 0.1]]]),
              torch.tensor([[1, 0]]))
    return image, points


@torch.no_grad()
def _predict(moe: SamMed3DMoE, expert: str = "auto", seed: int = 3):
    image, points = _inputs(moe, seed)
    return moe.predict(moe.encode(image), points=points, expert=expert)


def _edit_config(folder: Path, change) -> None:
    path = folder / B.CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def bundle(tmp_path):
    """A tiny bundle with two experts and a gate; tau 0 so the auto path fuses an expert."""
    moe = tiny_moe(num_experts=2, tau=0.0)
    folder = B.save_bundle(moe, tmp_path / "bundle")
    return moe, folder


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------
def test_bundle_round_trip_gives_identical_predictions(bundle):
    moe, folder = bundle
    config = json.loads((folder / B.CONFIG_NAME).read_text())
    assert config["format"] == B.BUNDLE_FORMAT and config["format_version"] == B.BUNDLE_FORMAT_VERSION
    assert [e["file"] for e in config["experts"]] == ["experts/expert1.safetensors", "experts/expert2.safetensors"]
    for rel in ["base.safetensors", "gate.safetensors", *(e["file"] for e in config["experts"])]:
        assert (folder / rel).is_file()
    assert config["base"]["sha256"] == file_sha256(folder / "base.safetensors")
    assert config["gate"]["config"] == moe.gate.config()
    assert not list(folder.rglob("*.tmp"))

    loaded = B.load_bundle(folder)
    assert loaded.base.config == moe.base.config  # tuples survive JSON
    assert loaded.expert_names == moe.expert_names
    assert loaded.expert_info == moe.expert_info
    assert (loaded.tau, loaded.selector) == (moe.tau, moe.selector)
    assert not loaded.training
    assert_same_state(moe.state_dict(), loaded.state_dict())

    before, after = _predict(moe), _predict(loaded)
    assert len(before.decoders) == 2  # the fused path ran, so experts and gate took part
    assert torch.equal(before.logits, after.logits)
    assert before.weights == after.weights and before.scores == after.scores
    for name in ["general", *moe.expert_names]:
        assert torch.equal(_predict(moe, expert=name).logits, _predict(loaded, expert=name).logits)

    via_model = B.load_model(folder)
    assert torch.equal(_predict(via_model).logits, before.logits)
    assert B.load_model(folder / B.CONFIG_NAME).expert_names == moe.expert_names


def test_bundle_keeps_preprocessing_and_settings(tmp_path):
    moe = tiny_moe(num_experts=1, tau=0.3, selector="renormalized")
    pre = {"spacing_mm": [1.0, 1.0, 2.0], "window": moe.base.img_size, "ct_clamp": None, "normalization": "zscore_nonzero"}
    folder = B.save_bundle(moe, tmp_path / "b", preprocessing=pre)
    config = B.read_bundle_config(folder)
    assert config["preprocessing"] == pre
    assert (config["tau"], config["selector"]) == (0.3, "renormalized")
    loaded = B.load_bundle(folder)
    assert (loaded.tau, loaded.selector) == (0.3, "renormalized")

    assert loaded.box_prompts_trained is True, "tiny_moe's box embeddings count as trained"
    untrained = tiny_moe(num_experts=1, box_prompts_trained=False)
    assert B.load_bundle(B.save_bundle(untrained, tmp_path / "u")).box_prompts_trained is False

    default = B.read_bundle_config(B.save_bundle(moe, tmp_path / "d"))["preprocessing"]
    assert default == {**B.DEFAULT_PREPROCESSING, "window": moe.base.img_size}
    with pytest.raises(SAMMed3DError, match="spacing_mm"):
        B.save_bundle(moe, tmp_path / "bad", preprocessing={"spacing_mm": -1})


def test_bundle_records_click_marks(tmp_path):
    """A model trained with clicks marked in the mask prompt loads with them (same predictions);
    a config without the field (bundles of the official networks) means no marks."""
    from SAMMed3DMoELib.model import build_sam_med3d

    torch.manual_seed(0)
    marked = SamMed3DMoE(build_sam_med3d(box_prompts=True, click_mark_radius=6.0, **TINY))
    folder = B.save_bundle(marked, tmp_path / "marked")
    assert B.read_bundle_config(folder)["base"]["model_config"]["click_mark_radius"] == 6.0
    loaded = B.load_bundle(folder)
    assert loaded.base.prompt_encoder.click_mark_radius == 6.0
    assert torch.equal(_predict(loaded).logits, _predict(marked).logits)

    def drop_field(config):
        config["base"]["model_config"].pop("click_mark_radius")

    official = B.save_bundle(tiny_moe(num_experts=1), tmp_path / "official")
    _edit_config(official, drop_field)
    assert B.load_bundle(official).base.prompt_encoder.click_mark_radius == 0.0


def test_bundle_records_whether_box_prompts_were_trained(tmp_path):
    """The session sends boxes as real prompts only to a model whose box embeddings were trained;
    the flag survives a save/load round trip and an expert edit."""
    folder = B.save_bundle(tiny_moe(num_experts=1, box_prompts_trained=True), tmp_path / "b")
    assert B.read_bundle_config(folder)["base"]["box_prompts_trained"] is True
    assert B.load_bundle(folder).box_prompts_trained is True
    B.remove_expert_from_bundle(folder, "expert1")
    assert B.load_bundle(folder).box_prompts_trained is True


def test_edited_expert_file_is_refused_by_name(bundle):
    _, folder = bundle
    path = folder / "experts" / "expert2.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(SAMMed3DError) as info:
        B.load_bundle(folder)
    text = str(info.value)
    assert "expert2.safetensors" in text and "expert 'expert2'" in text
    assert "corrupt or was edited" in text
    with pytest.raises(SAMMed3DError, match="expert2.safetensors"):  # editing the bundle checks it too
        B.add_expert_to_bundle(folder, "new", tiny_sam().new_mask_decoder().state_dict(), targets=[], modality="CT")


def test_newer_format_version_is_refused(bundle):
    _, folder = bundle
    _edit_config(folder, lambda c: c.update(format_version=B.BUNDLE_FORMAT_VERSION + 1, experts="future layout"))
    with pytest.raises(SAMMed3DError, match="newer version.*Upgrade"):
        B.load_bundle(folder)
    with pytest.raises(SAMMed3DError, match="newer version"):
        B.read_bundle_config(folder)


def _set(path, value):
    def change(config):
        obj = config
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(["format"], "something-else"), "not a SAM-Med3D-MoE bundle"),
    (_set(["format_version"], "1"), "'format_version' must be an integer"),
    (_set(["format_version"], 0), "at least 1"),
    (lambda c: c.pop("experts"), "'experts' is missing"),
    (_set(["experts", 1, "name"], "expert1"), "unique"),
    (_set(["experts", 1, "name"], "EXPERT1"), "unique"),
    (_set(["experts", 0, "name"], "general"), "reserved"),
    (_set(["experts", 0, "name"], "auto"), "reserved"),
    (_set(["experts", 0, "name"], "a/b"), "not a usable expert name"),
    (_set(["experts", 0, "targets"], "liver"), "'experts\\[0\\].targets' must be a list"),
    (_set(["experts", 0, "file"], "../outside.safetensors"), "relative path inside the bundle"),
    (_set(["experts", 0, "file"], "/etc/passwd.safetensors"), "relative path inside the bundle"),
    (_set(["experts", 0, "file"], "experts/missing.safetensors"), "missing from the bundle folder"),
    (_set(["experts", 0, "sha256"], "abc"), "64 lowercase hexadecimal"),
    (_set(["gate", "config", "num_experts"], 5), "the gate scores 5"),
    (_set(["tau"], 2), "'tau' must be between 0 and 1"),
    (_set(["selector"], "best"), "'selector' must be one of"),
    (_set(["base", "model_config", "img_size"], "big"), "img_size' must be an integer"),
    (_set(["base", "model_config", "depth"], 3), "unknown field"),
    (_set(["base", "model_config", "click_mark_radius"], -1), "click_mark_radius' must be a number >= 0"),
    (lambda c: c["base"].update(hub={"repo_id": "a/b", "filename": "m.pth"}), "not both"),
    (_set(["base", "box_prompts_trained"], "yes"), "'base.box_prompts_trained' must be"),
    (lambda c: c["base"].update(box_prompts_trained=True) or c["base"]["model_config"].update(box_prompts=False),
     "has no box prompts"),
])
def test_invalid_configs_are_refused_with_the_field_named(bundle, change, message):
    _, folder = bundle
    _edit_config(folder, change)
    with pytest.raises(SAMMed3DError, match=message) as info:
        B.read_bundle_config(folder)
    assert "config.json" in str(info.value)


def test_not_a_bundle_and_broken_json(tmp_path):
    with pytest.raises(SAMMed3DError, match="no config.json"):
        B.load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SAMMed3DError, match="not valid JSON.*line 1"):
        B.read_bundle_config(tmp_path)
    with pytest.raises(SAMMed3DError, match="not found"):
        B.load_model(tmp_path / "missing")


def test_config_with_a_hub_pointer_validates(bundle, tmp_path):
    moe, folder = bundle
    pointer = {"repo_id": "blueyo0/SAM-Med3D", "filename": "sam_med3d_turbo.pth", "revision": None,
               "sha256": "899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c"}
    hub_folder = B.save_bundle(moe, tmp_path / "hub_bundle", base_pointer=pointer)
    assert not (hub_folder / "base.safetensors").exists()
    config = B.read_bundle_config(hub_folder)
    assert config["base"]["hub"] == pointer
    assert config["base"]["model_config"] == moe.base.config
    assert [e["name"] for e in config["experts"]] == moe.expert_names

    # Switching an existing bundle to a pointer removes its now unlisted base file.
    B.save_bundle(moe, folder, base_pointer=pointer)
    assert not (folder / "base.safetensors").exists()
    assert (folder / "experts" / "expert1.safetensors").exists()

    for bad, message in [({**pointer, "repo_id": "not a repo"}, "owner/name"),
                         ({**pointer, "sha256": "XYZ"}, "sha256"),
                         ({**pointer, "filename": "../../etc/passwd.pth"}, "file path inside"),
                         ({**pointer, "filename": "weights.bin"}, "must name a checkpoint"),
                         ({**pointer, "mirror": "x"}, "unknown field")]:
        _edit_config(hub_folder, _set(["base", "hub"], bad))
        with pytest.raises(SAMMed3DError, match=message):
            B.read_bundle_config(hub_folder)
        with pytest.raises(SAMMed3DError, match=message):
            B.save_bundle(moe, tmp_path / "other", base_pointer=bad)


def test_hub_pointer_base_is_fetched_from_the_hub_and_checked(bundle, tmp_path, hub_server):
    """The base checkpoint lives on the local Hub stand-in (real HTTP on 127.0.0.1): load_bundle
    downloads exactly the pointed-to file and revision, verifies it, and refuses a wrong checksum
    or a missing file with DownloadError."""
    moe, _ = bundle
    checkpoint = tmp_path / "official.pth"
    torch.save({"model_state_dict": moe.base.state_dict(), "epoch": 1}, checkpoint)
    hub_server.add_file("someone/sam-med3d", "ckpt/official.pth", checkpoint.read_bytes())
    commit = hub_server.commit("someone/sam-med3d")
    pointer = {"repo_id": "someone/sam-med3d", "filename": "ckpt/official.pth", "revision": commit,
               "sha256": file_sha256(checkpoint)}
    folder = B.save_bundle(moe, tmp_path / "pointer_bundle", base_pointer=pointer)

    loaded = B.load_bundle(folder)
    assert torch.equal(_predict(loaded).logits, _predict(moe).logits)
    fetched = hub_server.gets("ckpt/official.pth")
    assert len(fetched) == 1 and fetched[0].bytes_sent == checkpoint.stat().st_size
    cached = hub.cached_file("someone/sam-med3d", "ckpt/official.pth", revision=commit)
    assert cached is not None and file_sha256(cached) == pointer["sha256"]

    _edit_config(folder, _set(["base", "hub", "sha256"], "0" * 64))
    with pytest.raises(DownloadError, match="SHA-256"):
        B.load_bundle(folder)
    _edit_config(folder, _set(["base", "hub"], {**pointer, "filename": "ckpt/missing.pth"}))
    with pytest.raises(DownloadError, match="missing.pth"):
        B.load_bundle(folder)


def test_add_then_remove_an_expert_on_disk(bundle):
    moe, folder = bundle
    base_file = folder / "base.safetensors"
    base_stat = base_file.stat()
    before = {name: _predict(moe, expert=name).logits for name in ["auto", "general", *moe.expert_names]}

    torch.manual_seed(77)
    decoder = moe.base.new_mask_decoder()
    B.add_expert_to_bundle(folder, "liver", decoder.state_dict(), targets=["liver", "liver tumor"],
                           modality="CT", description="fine-tuned on a liver set")
    config = B.read_bundle_config(folder)
    assert [e["name"] for e in config["experts"]] == ["expert1", "expert2", "liver"]
    liver = config["experts"][-1]
    assert liver["targets"] == ["liver", "liver tumor"] and liver["description"] == "fine-tuned on a liver set"
    assert (folder / "experts" / "liver.safetensors").is_file()
    assert liver["sha256"] == file_sha256(folder / "experts" / "liver.safetensors")
    assert config["gate"]["config"]["num_experts"] == 3
    assert base_file.stat().st_mtime_ns == base_stat.st_mtime_ns  # the base was not rewritten

    added = B.load_bundle(folder)
    assert added.expert_info["liver"] == ExpertInfo("liver", ["liver", "liver tumor"], "CT", "fine-tuned on a liver set")
    assert_same_state(decoder.state_dict(), added.experts["liver"].state_dict())
    for name, logits in before.items():  # old results unchanged: the new gate output is never chosen
        assert torch.equal(_predict(added, expert=name).logits, logits), name
    assert "liver" not in _predict(added).decoders
    assert not torch.equal(_predict(added, expert="liver").logits, before["general"])

    with pytest.raises(SAMMed3DError, match="already has an expert named 'Liver'|already has an expert named 'liver'"):
        B.add_expert_to_bundle(folder, "Liver", decoder.state_dict(), targets=[], modality="CT")

    B.remove_expert_from_bundle(folder, "liver")
    assert not (folder / "experts" / "liver.safetensors").exists()
    restored = B.load_bundle(folder)
    assert restored.expert_names == moe.expert_names
    for name, logits in before.items():
        assert torch.equal(_predict(restored, expert=name).logits, logits), name

    B.remove_expert_from_bundle(folder, "expert1")
    assert not (folder / "experts" / "expert1.safetensors").exists()
    assert [e["name"] for e in B.read_bundle_config(folder)["experts"]] == ["expert2"]
    fewer = B.load_bundle(folder)
    assert fewer.gate.num_experts == 1
    assert torch.equal(_predict(fewer, expert="expert2").logits, before["expert2"])
    assert torch.equal(_predict(fewer, expert="general").logits, before["general"])
    with pytest.raises(SAMMed3DError, match="no expert named 'expert1'"):
        B.remove_expert_from_bundle(folder, "expert1")


def test_add_expert_from_files_and_refusals(bundle, tmp_path):
    moe, folder = bundle
    decoder = moe.base.new_mask_decoder()
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "spleen.safetensors"))
    B.add_expert_to_bundle(folder, "spleen", tmp_path / "spleen.safetensors", targets="spleen", modality="MR")
    loaded = B.load_bundle(folder)
    assert loaded.expert_info["spleen"].targets == ["spleen"]
    assert_same_state(decoder.state_dict(), loaded.experts["spleen"].state_dict())

    torch.save(moe.base.state_dict(), tmp_path / "whole.pth")
    with pytest.raises(SAMMed3DError, match="whole model"):
        B.add_expert_to_bundle(folder, "whole", tmp_path / "whole.pth", targets=[], modality="CT")
    other = tiny_sam().new_mask_decoder()
    other.iou_prediction_head = type(other.iou_prediction_head)(48, 8, 4, 3)
    with pytest.raises(SAMMed3DError, match="shape mismatch"):
        B.add_expert_to_bundle(folder, "odd", other.state_dict(), targets=[], modality="CT")
    for name in ["general", "auto", "../x", ""]:
        with pytest.raises(SAMMed3DError, match="reserved|usable expert name"):
            B.add_expert_to_bundle(folder, name, decoder.state_dict(), targets=[], modality="CT")
    assert B.load_bundle(folder).expert_names == ["expert1", "expert2", "spleen"]


def test_failed_save_leaves_the_old_bundle_intact(bundle, monkeypatch):
    moe, folder = bundle
    original = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    import safetensors.torch

    calls = []
    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    changed = tiny_moe(num_experts=2, seed=9)
    with pytest.raises(SAMMed3DError, match="No space left"):
        B.save_bundle(changed, folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == original
    assert len(calls) == 3
    assert torch.equal(_predict(B.load_bundle(folder)).logits, _predict(moe).logits)


def test_shared_tensors_are_saved(tmp_path):
    moe = tiny_moe(num_experts=1)
    with torch.no_grad():
        moe.gate.norm2.weight = moe.gate.norm1.weight  # tied: safetensors alone refuses this
        moe.gate.norm1.weight.mul_(1.5)
    folder = B.save_bundle(moe, tmp_path / "tied")
    loaded = B.load_bundle(folder)
    assert torch.equal(loaded.gate.norm2.weight, moe.gate.norm1.weight)
    assert torch.equal(loaded.gate.norm1.weight, moe.gate.norm1.weight)


def test_bundle_without_gate_or_experts_and_load_model_of_a_file(tmp_path):
    base = tiny_sam(seed=4, box_prompts=False)
    torch.save({"model_state_dict": base.state_dict(), "epoch": 1}, tmp_path / "base.pth")
    folder = B.convert_checkpoint(tmp_path / "base.pth", tmp_path / "converted", **TINY)
    config = B.read_bundle_config(folder)
    assert config["experts"] == [] and config["gate"] is None
    assert not (folder / "experts").exists() and not (folder / "gate.safetensors").exists()
    loaded = B.load_bundle(folder)
    assert loaded.expert_names == [] and loaded.gate is None and not loaded.base.box_prompts
    assert_same_state(base.state_dict(), loaded.base.state_dict())
    with pytest.raises(SAMMed3DError, match="already holds a bundle"):
        B.convert_checkpoint(tmp_path / "base.pth", folder, **TINY)
    B.convert_checkpoint(tmp_path / "base.pth", folder, overwrite=True, **TINY)

    # A checkpoint file (the official size only) is wrapped without experts.
    with pytest.raises(SAMMed3DError, match="SAM-Med3D ViT-B 'ori'"):
        B.load_model(tmp_path / "base.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SAMMed3DError, match="not a model"):
        B.load_model(tmp_path / "notes.txt")

    # Adding an expert to a bundle without a gate: selectable by name, never chosen automatically.
    B.add_expert_to_bundle(folder, "kidney", base.new_mask_decoder().state_dict(), targets=["kidney"], modality="CT")
    moe = B.load_bundle(folder)
    assert moe.gate is None and moe.expert_names == ["kidney"]
    assert _predict(moe).decoders == ["general"]


def test_gate_with_other_sizes_round_trips(tmp_path):
    base = tiny_sam(seed=5)
    experts = {"a": base.new_mask_decoder()}
    gate = GatingNetwork(embed_dim=48, num_experts=1, num_heads=2, mlp_dim=24, hidden_dim=8)
    moe = SamMed3DMoE(base, experts, gate, {"a": ExpertInfo("a", ["x"], "CT", "d")}, tau=0.0).eval()
    loaded = B.load_bundle(B.save_bundle(moe, tmp_path / "g"))
    assert loaded.gate.config() == gate.config()
    assert torch.equal(_predict(loaded).logits, _predict(moe).logits)


def test_float16_on_disk_loads_into_the_float32_model(bundle, tmp_path):
    """dtype="float16" halves the files; loading converts back into float32 parameters equal to
    the float16-rounded originals, and the mixture predicts (nearly) the same."""
    from safetensors.torch import load_file

    moe, folder32 = bundle
    folder16 = B.save_bundle(moe, tmp_path / "fp16", dtype="float16")
    config = B.read_bundle_config(folder16)
    files = ["base.safetensors", "gate.safetensors", *(e["file"] for e in config["experts"])]
    for rel in files:
        assert {t.dtype for t in load_file(str(folder16 / rel)).values()} == {torch.float16}, rel
    size = lambda f: sum((f / rel).stat().st_size for rel in files)  # noqa: E731
    assert size(folder16) < 0.55 * size(folder32)

    loaded = B.load_bundle(folder16)  # checks every hash
    state = loaded.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    for key, value in moe.state_dict().items():
        assert torch.equal(state[key], value.half().float()), key
    before, after = _predict(moe), _predict(loaded)
    assert before.decoders == after.decoders
    assert torch.allclose(torch.sigmoid(before.logits), torch.sigmoid(after.logits), atol=2e-2)

    # bfloat16 too; a torch dtype works as well as its name; other types are refused by name.
    B.save_bundle(moe, tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_file(str(tmp_path / "bf16" / "base.safetensors"))["image_encoder.pos_embed"].dtype == torch.bfloat16
    with pytest.raises(SAMMed3DError, match="cannot store a bundle as 'int8'"):
        B.save_bundle(moe, tmp_path / "bad", dtype="int8")


# --------------------------------------------------------------------------------------------
# Full size (the official architecture)
# --------------------------------------------------------------------------------------------
def test_full_size_official_checkpoint_and_bundle(tmp_path):
    sd = reference_state_dict(box_prompts=False, dtype=torch.float32)
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-5, "params": [0, 1]}]},
                "epoch": 3}, path)

    model = C.load_checkpoint(path)
    assert not model.box_prompts and model.config["encoder_depth"] == 12
    assert_same_state(sd, model.state_dict())
    del model

    folder = B.convert_checkpoint(path, tmp_path / "bundle")
    assert B.read_bundle_config(folder)["base"]["model_config"]["img_size"] == 128
    moe = B.load_bundle(folder)
    assert moe.expert_names == [] and moe.gate is None
    assert_same_state(sd, moe.base.state_dict())
