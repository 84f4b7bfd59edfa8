"""Files the library writes and checks: SHA-256 digests and atomic writes (one place for both)."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Union

from .errors import SAMMed3DError

PathLike = Union[str, "os.PathLike[str]"]

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)
"""The weight files the library reads (here, not in :mod:`.checkpoint`, so that downloads need no torch)."""
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: PathLike) -> str:
    """Lowercase hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise SAMMed3DError(f"could not write {path}: {exc.strerror or exc}. Check the free disk space and the "
                            "folder's permissions.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def unreadable(path: Path, exc: OSError) -> SAMMed3DError:
    return SAMMed3DError(f"{path} cannot be read: {exc.strerror or exc}. Check the file's permissions and disk.")
