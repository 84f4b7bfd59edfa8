"""``download``, ``convert``, ``info``, ``catalog``, and resolving a model spec (with consent before a large download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Tuple

from .. import model_info
from ..catalog import load_catalog, remote_target
from ..errors import ConsentDeclined, SAMMed3DError
from .console import EXIT_OK, _err, _format_bytes, _out, _Stages, _stdin_is_terminal

LARGE_DOWNLOAD_BYTES = 20 * 2**20
"""Downloads at least this large (or of unknown size) ask for consent on a terminal."""


def _catalog(args) -> Optional[dict]:

    path = getattr(args, "catalog", None)
    return load_catalog(path) if path is not None else None


def _remote_target(spec: str, catalog: Optional[dict]) -> Optional[Tuple[str, Optional[str], Optional[str], str]]:
    """(repo_id, filename or None for a whole bundle repo, revision, description) when
    ``spec`` will be fetched from the Hub; None for local paths."""
    target = remote_target(spec, catalog)
    if target is None:
        return None
    repo_id, filename, revision = target
    entries = load_catalog() if catalog is None else catalog
    if spec in entries:
        what = f"catalog model '{spec}' ({repo_id}" + (f"/{filename})" if filename else ")")
    elif filename:
        what = f"'{spec}' from the Hub"
    else:
        what = f"bundle repository '{spec}' from the Hub"
    return repo_id, filename, revision, what


def _confirm_download(repo_id: str, filename: Optional[str], revision: Optional[str], what: str, args) -> None:
    """If the file (or bundle repo) is not cached yet: show its size and, on a terminal without
    --yes, ask before a large download. Raises ConsentDeclined when the user declines."""
    from .. import hub

    size: Optional[int] = None
    if filename is not None:
        if hub.cached_file(repo_id, filename, revision=revision) is not None:
            return
        try:
            size = hub.remote_file_info(repo_id, filename, revision=revision).size
        except SAMMed3DError:
            return  # offline / unreachable / missing: the download step explains (or uses a cache)
    elif hub.cached_file(repo_id, "config.json", revision=revision) is not None:
        return
    size_text = _format_bytes(size)
    if getattr(args, "yes", False) or (size is not None and size < LARGE_DOWNLOAD_BYTES):
        _err(f"downloading {what} ({size_text})")
        return
    if not _stdin_is_terminal():
        _err(f"downloading {what} ({size_text}) without asking: the input is not a terminal "
             "(pass --yes to silence this note)")
        return
    sys.stderr.write(f"{what} is not downloaded yet ({size_text}). Download it now? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise ConsentDeclined(f"download of {what} declined; nothing was downloaded (pass --yes to download "
                              "without asking)")


def _resolve(spec: str, args) -> Path:
    """The local path of a model spec, asking before a large download."""
    from .. import hub

    catalog = _catalog(args)
    entries = load_catalog() if catalog is None else catalog
    local = Path(spec).expanduser()
    if spec not in entries and local.exists():
        # Local files go straight to bundle.load_model, which also reads .ckpt files and
        # explains a folder without config.json.
        return local.resolve()
    target = _remote_target(spec, catalog)
    if target is not None:
        _confirm_download(*target, args)
    return Path(hub.resolve_model(spec, catalog=catalog))


def _bundle_hub_base(folder: Path) -> Optional[dict]:
    """The Hub pointer of a bundle whose base model lives on the Hub, else None."""
    from ..bundle import read_bundle_config

    config = read_bundle_config(folder)
    return config["base"].get("hub")


def _confirm_bundle_base(folder: Path, args) -> Optional[dict]:
    pointer = _bundle_hub_base(folder)
    if pointer is not None:
        what = f"the base model of bundle {folder.name} ({pointer['repo_id']}/{pointer['filename']})"
        _confirm_download(pointer["repo_id"], pointer["filename"], pointer["revision"], what, args)
    return pointer


def cmd_download(args) -> int:
    from .. import hub

    spec = str(args.model).strip()
    path = _resolve(spec, args)
    if path.is_dir():
        pointer = _confirm_bundle_base(path, args)
        if pointer is not None:  # fetch the base too, so the bundle works offline
            hub.download_file(pointer["repo_id"], pointer["filename"], revision=pointer["revision"],
                              sha256=pointer["sha256"])
    _out(str(path))
    return EXIT_OK


def cmd_convert(args) -> int:
    from ..bundle import convert_checkpoint

    spec = str(args.checkpoint).strip()
    source = Path(spec).expanduser()
    if not source.exists():
        source = _resolve(spec, args)
    if source.is_dir():
        raise SAMMed3DError(f"{source} is a folder (a bundle?); convert takes a checkpoint file (.pth/.pt/.ckpt)")
    stages = _Stages(total=1)
    try:
        with stages.step("converting", "convert"):
            folder = convert_checkpoint(source, args.bundle, overwrite=args.overwrite)
    finally:
        stages.close()
    _err(f"converted {source.name} into a bundle (base model only) in {stages.timings_ms['convert'] / 1e3:.1f} s")
    _out(str(folder))
    return EXIT_OK


def cmd_info(args) -> int:
    spec = str(args.model).strip()
    local = Path(spec).expanduser()
    if local.is_file() and local.name == "config.json":
        local = local.parent
    path = local.resolve() if local.exists() else _resolve(spec, args)
    if path.is_dir():
        info = model_info.bundle_info(path)
    else:
        from ..checkpoint import CHECKPOINT_SUFFIXES

        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise SAMMed3DError(f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a bundle folder")
        stages = _Stages(total=1)
        try:
            with stages.step("reading the checkpoint and its SHA-256", "read"):
                info = model_info.checkpoint_info(path, _catalog(args))
        finally:
            stages.close()
    if args.json:
        _out(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return EXIT_OK


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _print_info(info: dict) -> None:
    if info["kind"] == "bundle":
        _out(f"Bundle {info['path']} (format version {info['format_version']})")
    else:
        _out(f"Checkpoint {info['path']} ({_format_bytes(info['file_size'])}, {info['tensors']} tensors, "
             f"{'/'.join(info['dtypes'])})")
    _out(f"  Architecture: {info['architecture']}")
    if info.get("problem"):
        _out(f"  Cannot be loaded as SAM-Med3D: {info['problem']}")
    _out(f"  Box prompts: {'yes' if info['box_prompts'] else 'no'}")
    p = info["parameters"]
    parts = f"base {_millions(p['base'])}"
    if p["experts"]:
        parts += f", experts {_millions(p['experts'])}"
    if p["gate"]:
        parts += f", gate {_millions(p['gate'])}"
    _out(f"  Parameters: {p['total']:,} ({parts})")
    if info["kind"] == "bundle":
        base = info["base"]
        if "hub" in base:
            h = base["hub"]
            _out(f"  Base model: on the Hub, {h['repo_id']}/{h['filename']} "
                 f"({'cached' if base['cached_path'] else 'not downloaded yet'})")
        if info["experts"]:
            _out(f"  Experts ({len(info['experts'])}):")
            for e in info["experts"]:
                targets = ", ".join(e["targets"]) or "-"
                extra = f"; {e['description']}" if e["description"] else ""
                _out(f"    {e['name']}: targets {targets}; modality {e['modality']}{extra}")
        else:
            _out("  Experts: none (the general model only)")
        if info["gate"] is not None:
            cfg = ", ".join(f"{k} {v}" for k, v in info["gate"]["config"].items())
            _out(f"  Gate: yes ({cfg})")
            _out(f"  Selector: {info['selector']}, tau {info['tau']:g}")
        else:
            _out(f"  Gate: none (selector {info['selector']} and tau {info['tau']:g} are unused)")
    pre = info["preprocessing"]
    _out(f"  Preprocessing: spacing {pre.get('spacing_mm')} mm, window {pre.get('window')}, CT clamp "
         f"{pre.get('ct_clamp')}, normalisation {pre.get('normalization')}")
    if info["kind"] == "checkpoint":
        _out(f"  SHA-256: {info['sha256']} ({info['sha256_note']})")
    else:
        _out(f"  SHA-256: {info['sha256_note']}")
        for f in info["files"]:
            if not f["verified"]:
                _out(f"    {f['file']}: {f['sha256']} but config.json records {f['expected_sha256']}")


def cmd_catalog(args) -> int:
    from .. import hub

    catalog = _catalog(args)
    entries = load_catalog() if catalog is None else catalog
    rows = []
    for e in entries.values():
        cached = None
        if e.kind == "packaged":
            cached = e.local_path.is_dir()
        elif e.filename:
            cached = hub.cached_file(e.repo_id, e.filename, revision=e.revision) is not None
        rows.append({"name": e.name, "kind": e.kind, "repo_id": e.repo_id, "filename": e.filename,
                     "revision": e.revision, "size_mb": e.size_mb, "box_prompts": e.box_prompts,
                     "sha256": e.sha256, "cached": cached, "description": e.description, "title": e.title,
                     "license": e.license, "homepage": e.homepage})
    if args.json:
        _out(json.dumps({"models": rows}, indent=2))
        return EXIT_OK
    width = max([len(r["name"]) for r in rows] + [4])
    _out(f"{'NAME':<{width}}  {'SIZE':>9}  {'BOX':<3}  {'CACHED':<6}  SOURCE")
    for r in rows:
        size = f"{r['size_mb']:g} MB" if r["size_mb"] is not None else "unknown"
        cached = "yes" if r["cached"] else ("no" if r["cached"] is False else "?")
        if r["kind"] == "packaged":
            source = "shipped with this package (offline)"
        else:
            source = r["repo_id"] + (f"/{r['filename']}" if r["filename"] else " (bundle)")
        _out(f"{r['name']:<{width}}  {size:>9}  {'yes' if r['box_prompts'] else 'no':<3}  {cached:<6}  {source}")
        if r["description"]:
            _out(f"{'':<{width}}  {r['description']}")
    return EXIT_OK

