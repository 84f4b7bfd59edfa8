"""Files the library writes and checks: SHA-256 digests and atomic writes (one place for both).
Imports no torch, so that downloads never load it."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from .errors import CancelledError, SAMMed3DError

PathLike = Union[str, "os.PathLike[str]"]

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)
"""The weight files the library reads (here, not in :mod:`.checkpoint`, so that downloads need no torch)."""
SHA256_RE = re.compile(r"[0-9a-f]{64}")


_HASH_BLOCK = 4 * 1024 * 1024
_HASHES: Dict[Tuple[str, int, int, int, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def file_sha256(path: PathLike, *, cancel: Optional[threading.Event] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Lowercase hex SHA-256 of a file (the one checksum rule of this package).

    ``cancel``: set it to stop with :class:`~SAMMed3DMoELib.errors.CancelledError` (checked every
    4 MiB); ``progress(done_bytes, total_bytes)``. A file already hashed in this process is not
    read again while its device, inode, size, modification and change times are the same (a
    GUI checks a 400 MB checkpoint once, not at every load)."""
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real)
    key = (real, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        if progress is not None:
            progress(stat.st_size, stat.st_size)
        return known
    digest = hashlib.sha256()
    done = 0
    with open(real, "rb") as handle:
        while True:
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"Computing the SHA-256 of {os.path.basename(real)} was cancelled.")
            block = handle.read(_HASH_BLOCK)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, stat.st_size)
    value = digest.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


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
