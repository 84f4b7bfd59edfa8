"""Catalog and Hub downloads, with real HTTP against the local stand-in Hub in hub_server.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from SAMMed3DMoELib import hub
from SAMMed3DMoELib import catalog as model_catalog
from SAMMed3DMoELib.errors import CancelledError, DownloadError, SAMMed3DError

REPO = "test-org/tiny-model"


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that do not repeat (a hash chain), so offsets matter."""
    out = bytearray()
    block = seed.to_bytes(8, "little")
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_root() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def _repo_cache(repo_id: str = REPO) -> Path:
    return _cache_root() / ("models--" + repo_id.replace("/", "--"))


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------


def test_packaged_catalog_lists_the_official_checkpoint():
    catalog = model_catalog.load_catalog()
    turbo = catalog["sam-med3d-turbo"]
    assert turbo.repo_id == "blueyo0/SAM-Med3D"
    assert turbo.filename == "sam_med3d_turbo.pth"
    assert turbo.sha256 == "899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c"
    assert turbo.kind == "checkpoint" and turbo.box_prompts is False and turbo.size_mb == 402
    box = [e for e in catalog.values() if e.box_prompts]
    assert box, "the catalog should list a box-prompt checkpoint"
    for entry in catalog.values():
        assert entry.name and entry.description and entry.title
        assert entry.kind in ("checkpoint", "bundle", "packaged")
        assert (entry.filename is not None) == (entry.kind == "checkpoint")
        assert (entry.repo_id is None) == (entry.kind == "packaged")
    demo = catalog["demo"]
    assert demo.kind == "packaged" and demo.title == "Demo (offline)" and demo.license == "Apache-2.0"
    assert model_catalog.remote_target("demo") is None, "the demo model never touches the network"


def test_a_packaged_model_resolves_to_its_folder_in_the_package(tmp_path):
    """A catalog entry of kind "packaged" is a bundle folder inside SAMMed3DMoELib (here one made
    for the test, named by a catalog file of its own); resolving it needs no network."""
    package = model_catalog.CATALOG_PATH.parent
    folder = package / "models" / "test-packaged"
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(json.dumps({"models": [
        {"name": "p", "kind": "packaged", "path": "models/test-packaged", "description": "x"}]}))
    entries = model_catalog.load_catalog(catalog_file)
    with pytest.raises(SAMMed3DError, match="not a model bundle"):
        hub.resolve_model("p", catalog=entries)  # missing: a clear message, no download attempt
    try:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        assert hub.resolve_model("p", catalog=entries) == folder
    finally:
        (folder / "config.json").unlink(missing_ok=True)
        folder.rmdir()


@pytest.mark.parametrize("change, complaint", [
    ({"kind": "weights"}, "kind"),
    ({"sha256": "abc"}, "sha256"),
    ({"repo_id": "no-slash"}, "repo_id"),
    ({"colour": "red"}, "unknown keys"),
    ({"kind": "packaged"}, "packaged model ships inside the package"),
    ({"kind": "packaged", "repo_id": None, "filename": None, "path": "../outside"}, "needs 'path'"),
    ({"path": "models/x"}, "only for packaged"),
    ({"license": 2}, "'license' must be a string"),
])
def test_catalog_rejects_bad_entries(tmp_path, change, complaint):
    entry = {"name": "m", "kind": "checkpoint", "repo_id": "a/b", "filename": "m.pth", "description": "x"}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": [{**entry, **change}]}))
    with pytest.raises(SAMMed3DError, match=complaint):
        model_catalog.load_catalog(path)


def test_catalog_rejects_duplicate_names(tmp_path):
    entry = {"name": "m", "kind": "checkpoint", "repo_id": "a/b", "filename": "m.pth"}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": [entry, entry]}))
    with pytest.raises(SAMMed3DError, match="twice"):
        model_catalog.load_catalog(path)


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def test_size_first_then_verified_download_with_progress(hub_server):
    data = _payload(1_500_000)
    hub_server.add_file(REPO, "model.pth", data)

    info = hub.remote_file_info(REPO, "model.pth")
    assert info.size == len(data)
    assert info.commit == hub_server.commit(REPO)
    assert info.etag == _sha(data)  # the Hub's ETag of an LFS file is its SHA-256
    assert hub_server.gets("model.pth") == []  # the size came before any byte of the file

    calls = []
    path = hub.download_file(REPO, "model.pth", sha256=_sha(data), progress=lambda d, t: calls.append((d, t)))
    assert path.name == "model.pth"
    assert path.read_bytes() == data
    assert len(calls) >= 3
    assert all(total == len(data) for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == len(data)

    # A second call reuses the cached file: no new transfer.
    again = hub.download_file(REPO, "model.pth", sha256=_sha(data))
    assert again == path
    assert len(hub_server.gets("model.pth")) == 1


def test_downloads_leave_huggingface_hub_settings_alone(hub_server):
    """Other Slicer extensions share huggingface_hub in the same process: a download (resumed
    after a dropped connection, with progress) must not change its process-wide constants."""
    import huggingface_hub.constants as constants

    before = {name: getattr(constants, name) for name in dir(constants) if name.isupper()}
    data = _payload(1_200_000, seed=11)
    hub_server.add_file(REPO, "model.pth", data)
    hub_server.drop_after["model.pth"] = 500_000
    assert hub.download_file(REPO, "model.pth", progress=lambda d, t: None).read_bytes() == data
    after = {name: getattr(constants, name) for name in dir(constants) if name.isupper()}
    assert after == before
    assert before["DOWNLOAD_CHUNK_SIZE"] == 10 * 1024 * 1024  # huggingface_hub's own value, untouched


def test_resume_after_dropped_connection(hub_server):
    data = _payload(2_000_000, seed=1)
    hub_server.add_file(REPO, "model.pth", data)
    hub_server.drop_after["model.pth"] = 1_200_000

    path = hub.download_file(REPO, "model.pth", sha256=_sha(data))

    assert path.read_bytes() == data
    first, second = hub_server.gets("model.pth")
    assert "range" not in first.headers
    assert first.bytes_sent == 1_200_000
    resumed_at = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 1_200_000
    assert second.status == 206
    assert second.bytes_sent == len(data) - resumed_at < len(data)


def test_cancel_stops_promptly_and_the_next_call_resumes(hub_server):
    data = _payload(4 * 1024 * 1024, seed=2)
    hub_server.add_file(REPO, "model.pth", data)
    hub_server.delay = 0.02  # 64 KiB per 20 ms: about 1.3 s for the whole file
    cancel = threading.Event()
    set_at = []

    def press_cancel():
        set_at.append(time.monotonic())
        cancel.set()

    timer = threading.Timer(0.4, press_cancel)
    timer.start()
    try:
        with pytest.raises(CancelledError, match="cancelled"):
            hub.download_file(REPO, "model.pth", sha256=_sha(data), cancel=cancel)
        stopped = time.monotonic()
    finally:
        timer.cancel()
    assert set_at and stopped - set_at[0] < 0.5

    partial = _repo_cache() / "blobs" / (_sha(data) + ".partial")
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    assert data.startswith(partial.read_bytes())
    assert hub.cached_file(REPO, "model.pth") is None

    hub_server.delay = 0.0
    path = hub.download_file(REPO, "model.pth", sha256=_sha(data))
    assert path.read_bytes() == data
    last = hub_server.gets("model.pth")[-1]
    assert last.headers["range"] == f"bytes={kept}-"
    assert last.bytes_sent == len(data) - kept
    assert not partial.exists()


def test_cancel_before_start(hub_server):
    hub_server.add_file(REPO, "model.pth", _payload(10_000))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        hub.download_file(REPO, "model.pth", cancel=cancel)
    assert hub_server.requests == []


@pytest.mark.parametrize("with_expected_sha", [True, False])
def test_corrupted_download_is_refused_and_removed(hub_server, with_expected_sha):
    data = _payload(300_000, seed=3)
    hub_server.add_file(REPO, "model.pth", data)
    hub_server.corrupt.add("model.pth")

    sha = _sha(data) if with_expected_sha else None
    with pytest.raises(DownloadError, match="SHA-256") as caught:
        hub.download_file(REPO, "model.pth", sha256=sha)
    assert "model.pth" in str(caught.value) and _sha(data) in str(caught.value)
    assert hub.cached_file(REPO, "model.pth") is None
    blobs = _repo_cache() / "blobs"
    assert not list(blobs.iterdir()) if blobs.exists() else True

    hub_server.corrupt.clear()
    assert hub.download_file(REPO, "model.pth", sha256=sha).read_bytes() == data


def test_catalog_checksum_mismatch_is_refused(hub_server):
    data = _payload(5_000, seed=4)
    hub_server.add_file(REPO, "model.pth", data)
    with pytest.raises(DownloadError, match="catalog"):
        hub.download_file(REPO, "model.pth", sha256=_sha(b"something else"))
    assert hub.cached_file(REPO, "model.pth") is None


def test_missing_file_names_repo_and_file(hub_server):
    hub_server.add_file(REPO, "model.pth", b"x" * 10)
    with pytest.raises(DownloadError) as caught:
        hub.download_file(REPO, "no_such_file.pth")
    message = str(caught.value)
    assert REPO in message and "no_such_file.pth" in message and "does not exist" in message
    with pytest.raises(SAMMed3DError, match="no_such_file.pth"):
        hub.remote_file_info(REPO, "no_such_file.pth")


def test_missing_repo_and_revision(hub_server):
    with pytest.raises(DownloadError, match="not found") as caught:
        hub.download_file("nobody/nothing", "model.pth")
    assert "nobody/nothing" in str(caught.value)

    hub_server.add_file(REPO, "model.pth", b"x" * 10)
    with pytest.raises(DownloadError, match="Revision 'v9'"):
        hub.download_file(REPO, "model.pth", revision="v9")


def test_offline_mode_reuses_the_cached_copy_without_network(hub_server, monkeypatch, caplog):
    data = _payload(50_000, seed=5)
    hub_server.add_file(REPO, "model.pth", data)
    path = hub.download_file(REPO, "model.pth", sha256=_sha(data))
    seen = len(hub_server.requests)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.WARNING, logger=hub.__name__)
    again = hub.download_file(REPO, "model.pth", sha256=_sha(data))
    assert again == path and again.read_bytes() == data
    assert len(hub_server.requests) == seen  # not contacted
    assert any("Offline" in r.getMessage() and "cached" in r.getMessage() for r in caplog.records)

    with pytest.raises(DownloadError, match="Offline"):
        hub.remote_file_info(REPO, "model.pth")
    assert len(hub_server.requests) == seen


def test_unreachable_server_falls_back_to_the_cache(hub_server, caplog):
    data = _payload(20_000, seed=6)
    hub_server.add_file(REPO, "model.pth", data)
    path = hub.download_file(REPO, "model.pth")
    hub_server.stop()

    caplog.set_level(logging.WARNING, logger=hub.__name__)
    assert hub.download_file(REPO, "model.pth") == path
    assert any("Cannot reach" in r.getMessage() for r in caplog.records)


def test_offline_with_nothing_cached_explains_what_to_do(hub_server, monkeypatch):
    hub_server.add_file(REPO, "model.pth", b"x" * 10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as caught:
        hub.download_file(REPO, "model.pth")
    message = str(caught.value)
    for part in ("Offline", REPO, "model.pth", "HF_ENDPOINT", "path", "hf download"):
        assert part in message
    assert hub_server.requests == []


def test_unreachable_with_nothing_cached_explains_what_to_do(hub_server):
    hub_server.stop()
    with pytest.raises(DownloadError, match="Cannot reach") as caught:
        hub.download_file(REPO, "model.pth")
    assert "HF_ENDPOINT" in str(caught.value)


# --------------------------------------------------------------------------------------------
# Bundle folders
# --------------------------------------------------------------------------------------------

BUNDLE = "test-org/tiny-bundle"


def _add_bundle(server) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"format": 1, "experts": 2}).encode(),
        "experts/expert_0.safetensors": _payload(40_000, seed=7),
        "experts/expert_1.safetensors": _payload(30_000, seed=8),
    }
    for name, content in files.items():
        server.add_file(BUNDLE, name, content)
    return files


def test_snapshot_of_a_bundle_folder(hub_server, monkeypatch):
    files = _add_bundle(hub_server)
    calls = []
    folder = hub.download_snapshot(BUNDLE, progress=lambda d, t: calls.append((d, t)))

    assert folder.name == hub_server.commit(BUNDLE)
    for name, content in files.items():
        assert (folder / name).read_bytes() == content
    total = sum(len(c) for c in files.values())
    assert calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done)

    # Offline, the same folder comes from the cache without the server.
    seen = len(hub_server.requests)
    hub_server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_snapshot(BUNDLE) == folder
    assert len(hub_server.requests) == seen


def test_snapshot_patterns_and_corrupt_member(hub_server):
    files = _add_bundle(hub_server)
    folder = hub.download_snapshot(BUNDLE, allow_patterns=["config.json"])
    assert (folder / "config.json").read_bytes() == files["config.json"]
    assert not (folder / "experts").exists()

    # LFS members are checked against the SHA-256 in the repo listing.
    hub_server.corrupt.add("experts/expert_1.safetensors")
    with pytest.raises(DownloadError, match="expert_1"):
        hub.download_snapshot(BUNDLE)
    assert not (folder / "experts" / "expert_1.safetensors").exists()


def test_snapshot_of_missing_repo(hub_server):
    with pytest.raises(DownloadError, match="nobody/nothing"):
        hub.download_snapshot("nobody/nothing")


# --------------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------------


def _entry(name: str, sha256, kind: str = "checkpoint", filename="tiny.pth", repo_id=REPO) -> model_catalog.CatalogEntry:
    return model_catalog.CatalogEntry(name=name, repo_id=repo_id, filename=filename, revision=None, sha256=sha256,
                            size_mb=None, kind=kind, box_prompts=False, description="test model")


def test_resolve_catalog_name(hub_server, caplog):
    data = _payload(8_000, seed=9)
    hub_server.add_file(REPO, "tiny.pth", data)
    catalog = {"tiny": _entry("tiny", _sha(data)), "tiny-unknown-sha": _entry("tiny-unknown-sha", None)}

    path = hub.resolve_model("tiny", catalog=catalog)
    assert path.read_bytes() == data and path.name == "tiny.pth"

    # An entry without a recorded checksum still works, and says the file was not verified.
    caplog.set_level(logging.WARNING, logger=hub.__name__)
    assert hub.resolve_model("tiny-unknown-sha", catalog=catalog) == path
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "not verified" in warning and _sha(data) in warning


def test_resolve_catalog_bundle(hub_server):
    files = _add_bundle(hub_server)
    catalog = {"b": _entry("b", None, kind="bundle", filename=None, repo_id=BUNDLE)}
    folder = hub.resolve_model("b", catalog=catalog)
    assert json.loads((folder / "config.json").read_text()) == json.loads(files["config.json"])


def test_resolve_hub_specs(hub_server):
    files = _add_bundle(hub_server)
    data = _payload(3_000, seed=10)
    hub_server.add_file(REPO, "sub/model.pth", data)
    assert hub.resolve_model(f"{REPO}/sub/model.pth", catalog={}).read_bytes() == data
    folder = hub.resolve_model(BUNDLE, catalog={})
    assert (folder / "config.json").read_bytes() == files["config.json"]
    with pytest.raises(SAMMed3DError, match="no config.json"):
        hub.resolve_model(REPO, catalog={})  # a repo without config.json is not a bundle
    with pytest.raises(DownloadError, match="nobody/nothing"):
        hub.resolve_model("nobody/nothing", catalog={})


def test_resolve_local_paths(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"weights")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    other = tmp_path / "notes.txt"
    other.write_text("hi")

    assert hub.resolve_model(checkpoint, catalog={}) == checkpoint.resolve()
    assert hub.resolve_model(str(bundle), catalog={}) == bundle.resolve()
    with pytest.raises(SAMMed3DError, match="config.json"):
        hub.resolve_model(not_bundle, catalog={})
    with pytest.raises(SAMMed3DError, match="not a checkpoint"):
        hub.resolve_model(other, catalog={})

    monkeypatch.chdir(tmp_path)
    missing = ["./missing.pth", str(tmp_path / "missing.pth"), "ckpt/missing.pth", "missing.safetensors"]
    for spec in missing:
        with pytest.raises(SAMMed3DError, match="not found") as caught:
            hub.resolve_model(spec, catalog={})
        assert "missing" in str(caught.value)
    with pytest.raises(SAMMed3DError, match="sam-med3d-turbo"):
        hub.resolve_model("no-such-model")  # lists the packaged catalog's names


@pytest.mark.parametrize("spec, expected", [
    ("owner/repo", ("owner/repo", None, None)),
    ("owner/repo/weights.ckpt", ("owner/repo", "weights.ckpt", None)),
    ("owner/repo/sub/model.pth", ("owner/repo", "sub/model.pth", None)),
    ("./local/model.pth", None),
    ("ckpt/model.pth", None),
])
def test_remote_target_says_what_would_be_fetched(spec, expected):
    assert model_catalog.remote_target(spec, catalog={}) == expected


def test_downloads_never_import_torch():
    """A GUI downloads a model before (or without) loading it: hub.py must not pull in torch."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    code = "import sys, SAMMed3DMoELib.hub, SAMMed3DMoELib.catalog; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
