"""The models known by name (``catalog.json``) and how a model spec reads: catalog name, local
path, Hub repository (a bundle) or one file in a Hub repository. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from .errors import SAMMed3DError
from .files import CHECKPOINT_SUFFIXES, SHA256_RE

CATALOG_PATH = Path(__file__).with_name("catalog.json")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A Hugging Face Hub repository id ``owner/name`` (the one rule for repo ids in this package)."""


def is_repo_id(text: object) -> bool:
    """True for a string of the form ``owner/name`` (see :data:`REPO_ID_RE`)."""
    return isinstance(text, str) and REPO_ID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class CatalogEntry:
    """One known model. ``kind`` is ``"checkpoint"`` (one file: ``filename`` in ``repo_id``),
    ``"bundle"`` (a whole Hub repo: a folder with ``config.json``; ``filename`` is None) or
    ``"packaged"`` (a bundle folder shipped inside this package at ``path``; works offline).
    ``sha256`` None means no published checksum is known; ``size_mb`` is the documented size
    (the exact size comes from the server, see :func:`remote_file_info`). ``title`` is what a GUI
    shows; ``license`` an SPDX id when known; ``homepage`` the model card."""

    name: str
    repo_id: Optional[str]
    filename: Optional[str]
    revision: Optional[str]
    sha256: Optional[str]
    size_mb: Optional[float]
    kind: str
    box_prompts: bool
    description: str
    title: str = ""
    license: Optional[str] = None
    homepage: Optional[str] = None
    path: Optional[str] = None

    @property
    def local_path(self) -> Optional[Path]:
        """The folder of a packaged model (None for models on the Hub)."""
        return CATALOG_PATH.parent.joinpath(*self.path.split("/")) if self.kind == "packaged" else None


_ENTRY_KEYS = {
    "name", "repo_id", "filename", "revision", "sha256", "size_mb", "kind", "box_prompts", "description",
    "title", "license", "homepage", "path",
}
_KINDS = ("checkpoint", "bundle", "packaged")
_IGNORED_KEYS = {"notes"}  # for maintainers: where a value comes from


def load_catalog(path: Union[str, os.PathLike, None] = None) -> dict[str, CatalogEntry]:
    """The known models by name, from the packaged ``catalog.json`` or from ``path``."""
    source = Path(path) if path is not None else CATALOG_PATH
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAMMed3DError(f"Model catalog not found: {source}. Pass the path of an existing catalog JSON file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAMMed3DError(f"Model catalog {source} cannot be read: {exc}. Fix or replace the file.") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise SAMMed3DError(f"Model catalog {source} has no \"models\" list. Use the layout of the packaged catalog.json.")
    catalog: dict[str, CatalogEntry] = {}
    for index, raw in enumerate(models):
        entry = _catalog_entry(raw, where=f"{source}, model #{index + 1}")
        if entry.name in catalog:
            raise SAMMed3DError(f"Model catalog {source} lists '{entry.name}' twice. Give every model its own name.")
        catalog[entry.name] = entry
    return catalog


def _catalog_entry(raw: object, *, where: str) -> CatalogEntry:
    def bad(what: str) -> SAMMed3DError:
        return SAMMed3DError(f"Model catalog entry ({where}): {what}. Fix the catalog file.")

    if not isinstance(raw, dict):
        raise bad("is not a JSON object")
    unknown = set(raw) - _ENTRY_KEYS - _IGNORED_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)} (allowed: {sorted(_ENTRY_KEYS | _IGNORED_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise bad("'name' must be a non-empty string without '/'")
    where = f"{where} '{name}'"
    kind = raw.get("kind", "checkpoint")
    if kind not in _KINDS:
        raise bad(f"'kind' is {kind!r}; it must be one of {', '.join(_KINDS)}")
    repo_id = raw.get("repo_id")
    path = raw.get("path")
    if kind == "packaged":
        if repo_id is not None or raw.get("filename") is not None:
            raise bad("a packaged model ships inside the package: give 'path', not 'repo_id'/'filename'")
        if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path
                or ".." in path.split("/")):
            raise bad("a packaged model needs 'path', a folder relative to the package (e.g. models/demo)")
    else:
        if path is not None:
            raise bad("'path' is only for packaged models")
        if not is_repo_id(repo_id):
            raise bad(f"'repo_id' is {repo_id!r}; it must be a Hub repo id 'owner/name'")
    filename = raw.get("filename")
    if kind == "checkpoint" and (not isinstance(filename, str) or not filename):
        raise bad("a checkpoint needs 'filename' (the file's path in the repo)")
    if kind == "bundle" and filename is not None:
        raise bad("a bundle is the whole repo; set 'filename' to null")
    revision = raw.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise bad("'revision' must be null or a branch, tag or commit")
    sha256 = raw.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256.lower()):
            raise bad("'sha256' must be null or 64 hexadecimal digits")
        sha256 = sha256.lower()
    size_mb = raw.get("size_mb")
    if size_mb is not None and (isinstance(size_mb, bool) or not isinstance(size_mb, (int, float)) or size_mb < 0):
        raise bad("'size_mb' must be null or a non-negative number")
    box_prompts = raw.get("box_prompts", False)
    if not isinstance(box_prompts, bool):
        raise bad("'box_prompts' must be true or false")
    texts = {}
    for key in ("description", "title", "license", "homepage"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"'{key}' must be a string")
        texts[key] = value
    return CatalogEntry(
        name=name, repo_id=repo_id, filename=filename, revision=revision, sha256=sha256,
        size_mb=size_mb, kind=kind, box_prompts=box_prompts, description=texts["description"] or "",
        title=texts["title"] or name, license=texts["license"], homepage=texts["homepage"], path=path,
    )


def remote_target(spec: str, catalog: Optional[Dict[str, "CatalogEntry"]] = None) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """``(repo_id, filename or None for a bundle repository, revision)`` when
    :func:`resolve_model` would fetch ``spec`` from the Hub; None for local paths."""
    entries = load_catalog() if catalog is None else catalog
    if spec in entries:
        entry = entries[spec]
        return None if entry.kind == "packaged" else (entry.repo_id, entry.filename, entry.revision)
    if os.path.exists(os.path.expanduser(spec)):
        return None
    form = spec_form(spec)
    parts = spec.split("/")
    if form == "hub-file":
        return "/".join(parts[:2]), "/".join(parts[2:]), None
    if form == "hub-repo":
        return spec, None, None
    return None


def spec_form(text: str) -> str:
    """How a spec that is neither a catalog name nor an existing path reads: local/hub-file/hub-repo/unknown."""
    if (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text
            or re.match(r"[A-Za-z]:", text) or "//" in text or text.endswith("/")):
        return "local"
    parts = text.split("/")
    has_suffix = parts[-1].lower().endswith(CHECKPOINT_SUFFIXES)
    if len(parts) == 1:
        return "local" if has_suffix else "unknown"
    if not is_repo_id("/".join(parts[:2])):
        return "local"
    if len(parts) == 2:
        return "local" if has_suffix else "hub-repo"  # 'ckpt/model.pth' is a path, not a repo
    return "hub-file" if has_suffix else "local"


