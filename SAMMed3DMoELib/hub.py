"""Model catalog and Hugging Face Hub downloads: checkpoints, bundle folders, cache, offline use.

Everything goes through ``huggingface_hub`` and its standard cache (``HF_HUB_CACHE`` /
``HF_HOME``), so files fetched here are shared with every other Hub client on the machine.

What this module adds on top of ``huggingface_hub`` (tested with the versions pyproject.toml allows):

* **The environment is read at call time.** ``huggingface_hub`` reads ``HF_ENDPOINT``,
  ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``/``HF_HOME`` once, when it is imported. Here the endpoint
  and the cache folder are read on every call and passed explicitly; ``HF_HUB_OFFLINE`` set after
  the import is honoured by not touching the network at all.
* **Content verification.** For plain HTTP downloads ``huggingface_hub`` only checks that the
  byte count matches the advertised size; it never hashes the content. Here every new download
  is hashed: against the SHA-256 given by the caller (the catalog), otherwise against the
  server's ETag when that is a SHA-256 (the Hub's ETag of an LFS file is its SHA-256). A file
  that does not match is deleted from the cache (blob and snapshot link).
* **Resume across calls, progress and cancel.** For plain HTTP files this module reads the body
  itself (through huggingface_hub's HTTP session and headers) into
  ``blobs/<etag>.partial``, 256 KiB at a time, then moves it to ``blobs/<etag>`` and lets
  ``hf_hub_download`` link it into the snapshot as usual. huggingface_hub's own reader takes
  ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) pieces, and that constant is process-wide: other
  Slicer extensions share it, so it is never changed here. A cancelled or dropped download keeps
  its ``.partial`` bytes; the next call asks only for the rest (``Range: bytes=N-``). A
  ``progress(done_bytes, total_bytes)`` callback for GUIs (a terminal bar when there is no
  callback and stderr is a terminal) and a ``threading.Event`` that stops the download before
  the next 256 KiB with :class:`~SAMMed3DMoELib.errors.CancelledError`.
* **Clear errors.** Missing repository, file or revision, refused access, no network, offline
  mode and a checksum mismatch raise :class:`~SAMMed3DMoELib.errors.DownloadError` (exit status
  3 on the command line); an invalid repo id or argument raises
  :class:`~SAMMed3DMoELib.errors.SAMMed3DError`. The message says what to do. Without a network
  (offline mode, or the server cannot be reached), a cached copy is used when there is one, with
  a warning in the log.

Files stored in Xet (``hf_xet`` installed and the server announces Xet) are downloaded by
``hf_xet``. It keeps its own chunk cache, so the ``.partial`` mechanism above is not used for
them. Cancel is checked in its progress callback; whether ``hf_xet`` stops at once when that
callback raises has not been tested here (the test server does not speak Xet). If it finishes
the file instead, the call still raises CancelledError afterwards.

Callbacks run in the thread that downloads. A GUI runs the download in a worker thread and
forwards the progress to its own thread.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

from huggingface_hub import (
    HfApi,
    RepoFile,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, filter_repo_objects, hf_raise_for_status
from tqdm.auto import tqdm

from .catalog import CatalogEntry, load_catalog, spec_form
from .errors import CancelledError, DownloadError, SAMMed3DError
from .files import CHECKPOINT_SUFFIXES, SHA256_RE, file_sha256

__all__ = [
    "CatalogEntry",
    "RemoteFileInfo",
    "cached_file",
    "download_file",
    "download_snapshot",
    "load_catalog",
    "remote_file_info",
    "resolve_model",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; ``total_bytes`` is 0 while the size is unknown."""

DEFAULT_ENDPOINT = "https://huggingface.co"
BUNDLE_CONFIG = "config.json"

_CHUNK_BYTES = 256 * 1024  # network read size while downloading: the step of progress and cancel
_DROPS_RESUMED = 5  # dropped connections resumed within one call
_PARTIAL_SUFFIX = ".partial"  # blobs/<etag>.partial: bytes kept from an interrupted download
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_ETAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


# --------------------------------------------------------------------------------------------
# Environment, read at call time
# --------------------------------------------------------------------------------------------


def _is_true(value: Optional[str]) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class _Settings:
    endpoint: str
    cache_dir: Path
    offline: bool
    offline_reason: str


def _settings(cache_dir: Union[str, os.PathLike, None] = None) -> _Settings:
    env = os.environ
    endpoint = (env.get("HF_ENDPOINT") or "").strip().rstrip("/") or DEFAULT_ENDPOINT
    if cache_dir is None:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        cache_dir = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    cache = Path(os.path.expandvars(os.path.expanduser(str(cache_dir)))).resolve()
    env_offline = _is_true(env.get("HF_HUB_OFFLINE")) or _is_true(env.get("TRANSFORMERS_OFFLINE"))
    lib_offline = bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
    if env_offline:
        reason = "Offline mode is on (HF_HUB_OFFLINE=1)"
    elif lib_offline:
        reason = (
            "Offline mode is on (huggingface_hub was imported while HF_HUB_OFFLINE was set; "
            "restart the application without it to go online)"
        )
    else:
        reason = ""
    return _Settings(endpoint=endpoint, cache_dir=cache, offline=env_offline or lib_offline, offline_reason=reason)


def _storage_folder(settings: _Settings, repo_id: str) -> Path:
    return settings.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _describe(repo_id: str, filename: Optional[str], revision: Optional[str]) -> str:
    rev = f" (revision '{revision}')" if revision else ""
    return f"'{filename}' in repository '{repo_id}'{rev}" if filename else f"repository '{repo_id}'{rev}"


def _status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _hub_error(exc: BaseException, *, repo_id: str, filename: Optional[str], revision: Optional[str],
               endpoint: str) -> Optional[SAMMed3DError]:
    """A SAMMed3DError for errors that retrying or the cache cannot fix; None for the others."""
    if isinstance(exc, HFValidationError):
        return SAMMed3DError(
            f"'{repo_id}' is not a valid Hugging Face repo id ({exc}). Use 'owner/name', e.g. 'blueyo0/SAM-Med3D'."
        )
    if isinstance(exc, GatedRepoError):
        return DownloadError(
            f"Repository '{repo_id}' on {endpoint} is gated: accept its conditions on its web page, then log in "
            "(`hf auth login`, or set HF_TOKEN) and try again."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"Repository '{repo_id}' was not found on {endpoint}. Check the repo id (owner/name); if the "
            "repository is private, log in (`hf auth login`, or set HF_TOKEN)."
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(
            f"Revision '{revision or 'main'}' does not exist in repository '{repo_id}' on {endpoint}. "
            "Use an existing branch, tag or commit."
        )
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return DownloadError(
            f"File '{filename}' does not exist in repository '{repo_id}' (revision '{revision or 'main'}') on "
            f"{endpoint}. Check the file name against the repository's file list."
        )
    if isinstance(exc, HfHubHTTPError) and _status(exc) == 404:
        return DownloadError(
            f"{_describe(repo_id, filename, revision)} was not found on {endpoint} (HTTP 404). Check the repo "
            "id and file name; if HF_ENDPOINT points to a mirror, check that the mirror has it."
        )
    if isinstance(exc, HfHubHTTPError) and _status(exc) in (401, 403):
        return DownloadError(
            f"Access to {_describe(repo_id, filename, revision)} on {endpoint} was refused "
            f"(HTTP {_status(exc)}). Log in with an account that may read it (`hf auth login`, or set HF_TOKEN)."
        )
    return None


def _unreachable_reason(exc: Exception, endpoint: str, *, repo_id: str, filename: Optional[str], revision) -> str:
    """For a failed Hub request: raise the user-facing error it means, or, when the server
    cannot be reached, return the reason to fall back on the cache. Unknown errors propagate."""
    error = _hub_error(exc, repo_id=repo_id, filename=filename, revision=revision, endpoint=endpoint)
    if error is not None:
        raise error from exc
    if _is_unreachable(exc):
        return f"Cannot reach {endpoint} ({type(exc).__name__}: {exc})"
    raise exc


def _is_unreachable(exc: BaseException) -> bool:
    """No usable answer from the server: network down, timeout, server error, not a Hub."""
    if isinstance(exc, (OfflineModeIsEnabled, FileMetadataError)):
        return True
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is None or status in (408, 429) or status >= 500
    # Transport errors of whichever HTTP client this huggingface_hub version uses.
    for module_name, class_names in (
        ("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        module = sys.modules.get(module_name)
        for class_name in class_names:
            cls = getattr(module, class_name, None) if module is not None else None
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def _not_available_offline(reason: str, what: str, settings: _Settings, get_hint: str) -> DownloadError:
    return DownloadError(
        f"{reason}, and {what} is not in the local cache ({settings.cache_dir}). To get it: download it on "
        f"a machine with internet access ({get_hint}) and copy the file (or that machine's Hugging Face "
        "cache folder) here, then pass the file's path instead; or set HF_ENDPOINT to a Hub mirror you can "
        "reach; or reconnect and try again."
        + (" Unset HF_HUB_OFFLINE to allow downloads." if "HF_HUB_OFFLINE" in reason else "")
    )


# --------------------------------------------------------------------------------------------
# Remote metadata and the cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFileInfo:
    """What the server says about a file before downloading it. ``size`` is in bytes (None if the
    server did not say); ``etag`` is the content id (the SHA-256 for LFS files); ``commit`` is the
    40-hex commit the revision points to; ``url`` is where the bytes come from; ``xet`` is True
    when the file is stored in Xet."""

    size: Optional[int]
    etag: Optional[str]
    commit: Optional[str]
    url: str = ""
    xet: bool = False


def _fetch_metadata(repo_id: str, filename: str, revision: Optional[str], endpoint: str) -> RemoteFileInfo:
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if not meta.commit_hash or not meta.etag:
        raise FileMetadataError(
            f"{endpoint} answered without the commit or ETag header a Hugging Face Hub server sends, "
            "so it does not look like a Hub (check HF_ENDPOINT, proxy and firewall settings)"
        )
    return RemoteFileInfo(
        size=meta.size, etag=meta.etag, commit=meta.commit_hash, url=meta.location or url,
        xet=getattr(meta, "xet_file_data", None) is not None,
    )


def remote_file_info(repo_id: str, filename: str, revision: Optional[str] = None) -> RemoteFileInfo:
    """Size, ETag and commit of a file on the Hub (one HEAD request through ``HF_ENDPOINT``), so a
    GUI can show the size and ask before a large download. Offline or unreachable servers raise
    DownloadError (see :func:`cached_file` for what is already on disk)."""
    settings = _settings()
    if settings.offline:
        raise DownloadError(
            f"{settings.offline_reason}: the size of {_describe(repo_id, filename, revision)} cannot be asked "
            "for. Unset HF_HUB_OFFLINE to go online."
        )
    try:
        return _fetch_metadata(repo_id, filename, revision, settings.endpoint)
    except Exception as exc:
        error = _hub_error(exc, repo_id=repo_id, filename=filename, revision=revision, endpoint=settings.endpoint)
        if error is not None:
            raise error from exc
        if _is_unreachable(exc):
            raise DownloadError(
                f"Cannot reach {settings.endpoint} to look up {_describe(repo_id, filename, revision)} "
                f"({type(exc).__name__}: {exc}). Check the internet connection and proxy settings, or set "
                "HF_ENDPOINT to a Hub mirror you can reach."
            ) from exc
        raise


def cached_file(repo_id: str, filename: str, *, revision: Optional[str] = None,
                cache_dir: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The cached copy of a file for ``revision`` (default ``main``), or None. No network."""
    settings = _settings(cache_dir)
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(settings.cache_dir), revision=revision)
    except (HFValidationError, ValueError):
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


# --------------------------------------------------------------------------------------------
# Progress and cancel
# --------------------------------------------------------------------------------------------


def _terminal_wanted() -> bool:
    stream = sys.stderr
    try:
        interactive = stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        return False
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:  # pragma: no cover - older huggingface_hub
        return True
    return not are_progress_bars_disabled()


def _raise_if_cancelled(cancel: Optional[threading.Event], what: str, kept: bool = False) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError(
            f"Download of {what} was cancelled."
            + (" The part already downloaded is kept; downloading again resumes from there." if kept else "")
        )


class _Reporter:
    """Progress and cancel state of one file download, driven by the tqdm class below."""

    def __init__(self, what: str, callback: Optional[ProgressCallback], cancel: Optional[threading.Event],
                 terminal: bool) -> None:
        self.what = what
        self.callback = callback
        self.cancel = cancel
        self.terminal = terminal
        self.done = 0
        self.total = 0
        self.partial_kept = False
        self.label = ""

    def check(self) -> None:
        _raise_if_cancelled(self.cancel, self.what, self.partial_kept)

    def start(self, total: Optional[float], initial: Optional[float]) -> None:
        self.total = int(total or 0)
        self.done = int(initial or 0)
        self.emit()

    def advance(self, n: Optional[float], total: Optional[float]) -> None:
        self.check()  # before the chunk is written: the kept part stays a clean prefix
        if total:
            self.total = int(total)
        self.done += int(n or 0)
        self.emit()

    def emit(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)


def _bar_class(reporter: _Reporter) -> type:
    """A tqdm class that reports to ``reporter``: the bar of :func:`_stream_to_blob`, and the
    ``tqdm_class`` given to ``hf_hub_download`` for files that ``hf_xet`` downloads."""

    class _HubProgressBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = not reporter.terminal
            if reporter.label:
                kwargs["desc"] = reporter.label  # the library shows the (CDN) URL otherwise
            super().__init__(*args, **kwargs)
            reporter.start(kwargs.get("total"), kwargs.get("initial", 0))

        def update(self, n=1):
            reporter.advance(n, self.total)
            return super().update(n)

        # Xet downloads report network bytes separately; defining these makes huggingface_hub
        # use one bar for both (no double counting).
        def update_transfer(self, n=1):
            reporter.check()

        def set_transfer_postfix_str(self, *args, **kwargs):
            pass

    return _HubProgressBar


class _TerminalBar:
    """One terminal bar over several files (bundle downloads)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)
        self._shown = 0

    def show(self, done: int) -> None:
        if done != self._shown:
            self._bar.update(done - self._shown)
            self._shown = done

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------------------------------
# Checking content
# --------------------------------------------------------------------------------------------


def _sha256(path: Path, cancel: Optional[threading.Event], what: str) -> str:
    try:
        return file_sha256(path, cancel=cancel)
    except CancelledError:
        raise CancelledError(f"Download of {what} was cancelled (while its SHA-256 was checked).") from None


def _discard_cached(path: Path, blob: Optional[Path] = None) -> None:
    """Delete a cached file: its snapshot entry and the blob behind it."""
    targets = []
    if path.is_symlink():
        targets.append(Path(os.path.realpath(path)))
    targets.append(path)
    if blob is not None:
        targets += [blob, blob.with_name(blob.name + _PARTIAL_SUFFIX)]
    for target in targets:
        try:
            target.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - permissions
            logger.warning("Could not delete %s: %s", target, exc)


def _check_content(path: Path, *, expected: Optional[str], server_sha: Optional[str], fresh: bool,
                   repo_id: str, filename: str, blob: Optional[Path], cancel: Optional[threading.Event],
                   warn_unverified: bool) -> Optional[str]:
    """Verify a downloaded or cached file; returns its SHA-256 when it was computed."""
    what = _describe(repo_id, filename, None)
    want = expected or (server_sha if fresh else None)
    if want is None and not fresh:
        return None
    digest = _sha256(path, cancel, what)
    if want is not None and digest != want:
        _discard_cached(path, blob)
        source = "the checksum recorded in the model catalog" if expected else "the checksum the server announced"
        raise DownloadError(
            f"{'Downloaded' if fresh else 'Cached'} file {what} is corrupt or not the expected file: its SHA-256 is "
            f"{digest}, but {source} is {want}. The bad copy was deleted from the cache; download it again. If "
            "this happens again, the server or mirror (HF_ENDPOINT) serves a different file: if the model was "
            "updated upstream, update the catalog entry, or pass the path of a file you trust."
        )
    if expected is None and warn_unverified:
        if server_sha is not None and digest == server_sha:
            logger.info("%s matches the server's SHA-256 %s", what, digest)
        else:
            logger.warning(
                "%s was not verified against a known checksum (none was given and the server announced none). "
                "Its SHA-256 is %s.", what, digest,
            )
    return digest


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def download_file(
    repo_id: str,
    filename: str,
    *,
    revision: Optional[str] = None,
    sha256: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> Path:
    """Download ``filename`` from Hub repo ``repo_id`` into the Hugging Face cache (or reuse the cached
    copy) and return its local path (the snapshot path, which keeps the file name).

    ``sha256``: the expected checksum; without it a new download is checked against the server's
    LFS checksum when there is one. ``progress(done_bytes, total_bytes)`` is called from the downloading
    thread; without it a terminal bar is shown when stderr is a terminal. ``cancel``: set the event
    to stop; the download then raises CancelledError and keeps the partial file for the next call.
    Offline or without a network, a cached copy is used (with a warning) if there is one.
    """
    path, _ = _fetch_file(
        repo_id, filename, revision=revision, sha256=sha256, progress=progress, cancel=cancel,
        cache_dir=cache_dir, terminal=progress is None and _terminal_wanted(), warn_unverified=True,
    )
    return path


def _fetch_file(repo_id: str, filename: str, *, revision: Optional[str], sha256: Optional[str],
                progress: Optional[ProgressCallback], cancel: Optional[threading.Event],
                cache_dir: Union[str, os.PathLike, None], terminal: bool,
                warn_unverified: bool) -> tuple[Path, Optional[str]]:
    settings = _settings(cache_dir)
    what = _describe(repo_id, filename, revision)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.fullmatch(sha256):
            raise SAMMed3DError(f"Expected SHA-256 for {what} is not 64 hexadecimal digits: {sha256!r}.")
    _raise_if_cancelled(cancel, what)

    def use_cache(reason: str) -> tuple[Path, Optional[str]]:
        found = cached_file(repo_id, filename, revision=revision, cache_dir=settings.cache_dir)
        if found is None:
            hint = f"`hf download {repo_id} {filename}" + (f" --revision {revision}" if revision else "") + "`"
            raise _not_available_offline(reason, what, settings, hint)
        logger.warning("%s: using the cached copy of %s: %s", reason, what, found)
        digest = _check_content(found, expected=sha256, server_sha=None, fresh=False, repo_id=repo_id,
                                filename=filename, blob=None, cancel=cancel, warn_unverified=warn_unverified)
        _final_progress(progress, found)
        return found, digest

    if settings.offline:
        return use_cache(settings.offline_reason)

    storage = _storage_folder(settings, repo_id)
    if revision is not None and _COMMIT_RE.fullmatch(revision):
        pinned = storage / "snapshots" / revision / filename
        if pinned.is_file():  # a commit never changes: no need to ask the server
            digest = _check_content(pinned, expected=sha256, server_sha=None, fresh=False, repo_id=repo_id,
                                    filename=filename, blob=None, cancel=cancel, warn_unverified=warn_unverified)
            _final_progress(progress, pinned)
            return pinned, digest

    try:
        meta = _fetch_metadata(repo_id, filename, revision, settings.endpoint)
    except Exception as exc:
        return use_cache(_unreachable_reason(exc, settings.endpoint, repo_id=repo_id, filename=filename, revision=revision))

    etag = str(meta.etag)
    if not _ETAG_RE.fullmatch(etag):  # it names a file in the cache: never a path
        raise DownloadError(f"{settings.endpoint} answered with an unusable ETag {etag[:80]!r} for {what}; "
                            "check HF_ENDPOINT (it does not look like a Hugging Face Hub).")
    blob = storage / "blobs" / etag
    partial = blob.with_name(etag + _PARTIAL_SUFFIX)
    pointer = storage / "snapshots" / str(meta.commit) / filename
    fresh = not blob.exists() and not pointer.exists()
    server_sha = etag.lower() if SHA256_RE.fullmatch(etag.lower()) else None
    # hf_xet downloads Xet files itself (with its own chunk cache); the .partial files are for HTTP.
    plain_http = not (meta.xet and _xet_available())

    reporter = _Reporter(what, progress, cancel, terminal)
    reporter.label = filename.rsplit("/", 1)[-1]
    try:
        if fresh and plain_http:
            _stream_to_blob(meta, blob, partial, settings, repo_id, reporter)
        # Links the blob into the snapshot (or, for Xet files, downloads it with hf_xet).
        path = Path(hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=str(settings.cache_dir),
            endpoint=settings.endpoint, tqdm_class=_bar_class(reporter),
        ))
    except SAMMed3DError:
        raise
    except Exception as exc:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"Download of {what} was cancelled.") from exc
        error = _hub_error(exc, repo_id=repo_id, filename=filename, revision=revision, endpoint=settings.endpoint)
        if error is not None:
            raise error from exc
        if _is_unreachable(exc) or isinstance(exc, OSError):
            kept = partial.is_file() and partial.stat().st_size > 0
            raise DownloadError(
                f"Download of {what} from {settings.endpoint} failed: {type(exc).__name__}: {exc}. "
                "Check the connection and run it again"
                + (" (it resumes from the part already downloaded)." if kept else ".")
            ) from exc
        if isinstance(exc, ValueError):  # e.g. a file name that leaves the repo ('../x')
            raise SAMMed3DError(f"Cannot download {what}: {exc}") from exc
        raise
    finally:
        if blob.exists():  # finished (here or by another process): the kept part is no longer needed
            partial.unlink(missing_ok=True)

    # Cancelled while the last chunk arrived (or a downloader ignored the exception): the file is
    # cached and complete, but the caller asked to stop.
    _raise_if_cancelled(cancel, what)
    digest = _check_content(path, expected=sha256, server_sha=server_sha, fresh=fresh, repo_id=repo_id,
                            filename=filename, blob=blob, cancel=cancel, warn_unverified=warn_unverified)
    _final_progress(progress, path)
    return path, digest


def _xet_available() -> bool:
    try:
        from huggingface_hub.utils._runtime import is_xet_available
    except ImportError:  # pragma: no cover - other huggingface_hub versions
        return False
    return bool(is_xet_available())


def _final_progress(progress: Optional[ProgressCallback], path: Path) -> None:
    if progress is not None:
        size = os.path.getsize(path)
        progress(size, size)


def _stream_to_blob(meta: RemoteFileInfo, blob: Path, partial: Path, settings: _Settings, repo_id: str,
                    reporter: _Reporter) -> None:
    """Download the file into ``blobs/<etag>.partial`` (continuing what an earlier, interrupted
    call left there, with ``Range``) and move it to ``blobs/<etag>``, where ``hf_hub_download``
    finds it. Holds the lock file ``hf_hub_download`` takes for the same blob.

    The body is read in ``_CHUNK_BYTES`` pieces, each reported to ``reporter`` (progress, cancel)
    before it is written. huggingface_hub's own reader uses ``constants.DOWNLOAD_CHUNK_SIZE``
    (10 MiB), a process-wide setting that other extensions in the same process share, so this
    module reads the body itself instead of changing it. A connection that drops mid-way is
    resumed from the last byte written, up to ``_DROPS_RESUMED`` times per call."""
    lock = settings.cache_dir / ".locks" / repo_folder_name(repo_id=repo_id, repo_type="model") / f"{blob.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(str(lock)):
        if blob.exists():
            return
        have = partial.stat().st_size if partial.is_file() else 0
        if meta.size is not None and have > meta.size:
            partial.unlink()
            have = 0
        if have:
            logger.info("Resuming %s at byte %d of %s", reporter.what, have, meta.size)
            reporter.partial_kept = True
        headers = build_hf_headers()
        if _origin(meta.url) != _origin(settings.endpoint):
            headers.pop("authorization", None)  # never send the token to a CDN
        bar = _bar_class(reporter)(total=meta.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024)
        try:
            with open(partial, "ab") as out:
                for attempt in range(_DROPS_RESUMED + 1):
                    start = out.tell()
                    try:
                        _stream_body(meta.url, headers, start, out, bar, reporter)
                        break
                    except Exception as exc:
                        if not _is_unreachable(exc) or attempt == _DROPS_RESUMED:
                            raise
                        logger.warning("Connection lost while downloading %s (%s); resuming at byte %d",
                                       reporter.what, type(exc).__name__, out.tell())
                        if out.tell() == start:
                            time.sleep(1.0)  # no byte came: give the server a moment
        finally:
            bar.close()
        size = partial.stat().st_size
        if meta.size is not None and size != meta.size:
            raise OSError(f"received {size} bytes, but the server announced {meta.size}")
        os.replace(partial, blob)


def _stream_body(url: str, headers: dict, start: int, out, bar, reporter: _Reporter) -> None:
    """Append the body of ``url`` from byte ``start`` to ``out``, one chunk at a time."""
    request_headers = {**headers, "Range": f"bytes={start}-"} if start else headers
    with get_session().stream("GET", url, headers=request_headers, follow_redirects=True) as response:
        hf_raise_for_status(response)
        if start and response.status_code != 206:  # the server ignored Range: start over
            out.seek(0)
            out.truncate()
            bar.reset(total=bar.total)
            reporter.start(bar.total, 0)
        for chunk in response.iter_bytes(chunk_size=_CHUNK_BYTES):
            if chunk:
                bar.update(len(chunk))  # checks cancel before the chunk is written
                out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _origin(url: str) -> tuple[str, str, Optional[int]]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


# --------------------------------------------------------------------------------------------
# Bundle folders (whole repos)
# --------------------------------------------------------------------------------------------


def download_snapshot(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    allow_patterns: Union[str, Iterable[str], None] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> Path:
    """Download the files of Hub repo ``repo_id`` (those matching ``allow_patterns``, default all) into
    the cache and return the snapshot folder. Each file goes through :func:`download_file` (resume,
    verification of LFS files against the listed SHA-256, cancel); ``progress`` counts the bytes of
    all files together. Offline or without a network, a cached snapshot is used if there is one."""
    settings = _settings(cache_dir)
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else (
        list(allow_patterns) if allow_patterns is not None else None)
    what = _describe(repo_id, None, revision)
    _raise_if_cancelled(cancel, what)

    def use_cache(reason: str) -> Path:
        try:
            folder = Path(snapshot_download(
                repo_id, revision=revision, cache_dir=str(settings.cache_dir), local_files_only=True,
                allow_patterns=patterns,
            ))
        except HFValidationError as exc:
            raise _hub_error(exc, repo_id=repo_id, filename=None, revision=revision,
                             endpoint=settings.endpoint) from exc
        except (OSError, ValueError) as exc:
            hint = f"`hf download {repo_id}" + (f" --revision {revision}" if revision else "") + "`"
            raise _not_available_offline(reason, what, settings, hint) from exc
        if not any(p.is_file() for p in folder.rglob("*")):
            hint = f"`hf download {repo_id}`"
            raise _not_available_offline(reason, what, settings, hint)
        logger.warning("%s: using the cached copy of %s: %s", reason, what, folder)
        return folder

    if settings.offline:
        return use_cache(settings.offline_reason)

    api = HfApi(endpoint=settings.endpoint)
    try:
        commit = api.repo_info(repo_id, revision=revision, repo_type="model").sha
        if not commit:
            raise FileMetadataError(f"{settings.endpoint} did not tell the commit of {what}")
        listing = [entry for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(entry, RepoFile)]  # files only, not folders
    except Exception as exc:
        return use_cache(_unreachable_reason(exc, settings.endpoint, repo_id=repo_id, filename=None, revision=revision))
    files = list(filter_repo_objects(listing, allow_patterns=patterns, key=lambda entry: entry.path))
    if not files:
        raise DownloadError(
            f"{what} on {settings.endpoint} has no files"
            + (f" matching {patterns}" if patterns else "") + ". Check the repo id and the patterns."
        )

    grand_total = sum(int(entry.size or 0) for entry in files)
    bar = _TerminalBar(grand_total, repo_id, enabled=progress is None and _terminal_wanted())
    finished = 0
    try:
        for entry in files:
            def file_progress(done: int, _total: int, base: int = finished) -> None:
                bar.show(base + done)
                if progress is not None:
                    progress(base + done, grand_total)

            lfs = getattr(entry, "lfs", None)
            expected = getattr(lfs, "sha256", None) if lfs is not None else None
            path, _ = _fetch_file(
                repo_id, entry.path, revision=commit, sha256=expected, progress=file_progress, cancel=cancel,
                cache_dir=settings.cache_dir, terminal=False, warn_unverified=False,
            )
            finished += os.path.getsize(path)
    finally:
        bar.close()

    storage = _storage_folder(settings, repo_id)
    ref = revision or "main"
    if not _COMMIT_RE.fullmatch(ref):  # remember which commit "main" (etc.) is, for offline use
        ref_path = storage / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_name(f".{ref_path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit, encoding="utf-8")
        os.replace(tmp, ref_path)
    return storage / "snapshots" / commit


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------


def resolve_model(
    spec: Union[str, os.PathLike],
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    catalog: Optional[Mapping[str, CatalogEntry]] = None,
) -> Path:
    """The local path of a model, downloading it if needed. ``spec`` is a catalog name
    (``sam-med3d-turbo``), a local checkpoint file (.pth/.pt/.safetensors), a local bundle folder
    (with config.json), a Hub repo id ``owner/name`` (a bundle) or ``owner/name/path/file.pth``
    (one checkpoint file). ``catalog`` replaces the packaged catalog."""
    text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not text:
        raise SAMMed3DError(f"No model given ({spec!r}). Give a catalog name, a local path or a Hub repo id.")
    entries = load_catalog() if catalog is None else dict(catalog)
    if text in entries:
        return _resolve_entry(entries[text], progress=progress, cancel=cancel)

    local = Path(os.path.expanduser(text))
    if local.exists():
        return _local_model(local)
    names = ", ".join(sorted(entries)) or "(none)"
    form = spec_form(text)
    if form == "local":
        raise SAMMed3DError(
            f"Model file or folder not found: {local}. Check the path, or use a catalog name ({names}) "
            "or a Hub repo id 'owner/name' (bundle) or 'owner/name/file.pth' (checkpoint)."
        )
    if form in ("hub-file", "hub-repo"):
        try:
            if form == "hub-file":
                owner, name, filename = text.split("/", 2)
                return download_file(f"{owner}/{name}", filename, progress=progress, cancel=cancel)
            folder = download_snapshot(text, progress=progress, cancel=cancel)
            return _require_bundle(folder, origin=f"Hub repository '{text}'")
        except CancelledError:
            raise
        except SAMMed3DError as exc:  # same class (a DownloadError stays one), with how the spec was read
            raise type(exc)(
                f"'{text}' is not a catalog name ({names}) or an existing local path, so it was looked up "
                f"on the Hub: {exc}"
            ) from exc
    raise SAMMed3DError(
        f"Unknown model '{text}': it is not a catalog name ({names}) and no such file or folder exists. "
        "Give a catalog name, a local .pth/.safetensors file or bundle folder, or a Hub repo id "
        "'owner/name' (bundle) or 'owner/name/file.pth' (checkpoint)."
    )


def _local_model(path: Path) -> Path:
    path = path.resolve()
    if path.is_dir():
        return _require_bundle(path, origin=f"Folder {path}")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise SAMMed3DError(
            f"{path} is not a checkpoint file: expected one of {', '.join(CHECKPOINT_SUFFIXES)}, "
            "or a bundle folder with config.json."
        )
    return path


def _require_bundle(folder: Path, *, origin: str) -> Path:
    if not (folder / BUNDLE_CONFIG).is_file():
        raise SAMMed3DError(
            f"{origin} is not a model bundle: it has no {BUNDLE_CONFIG}. Give a bundle folder, a checkpoint "
            "file, or 'owner/name/file.pth' for a single checkpoint file in a Hub repo."
        )
    return folder


def _resolve_entry(entry: CatalogEntry, *, progress: Optional[ProgressCallback],
                   cancel: Optional[threading.Event]) -> Path:
    if entry.kind == "packaged":
        return _require_bundle(entry.local_path, origin=f"Catalog model '{entry.name}' (shipped at {entry.local_path})")
    if entry.kind == "bundle":
        folder = download_snapshot(entry.repo_id, revision=entry.revision, progress=progress, cancel=cancel)
        return _require_bundle(folder, origin=f"Catalog model '{entry.name}' (Hub repository '{entry.repo_id}')")
    assert entry.filename is not None
    path, digest = _fetch_file(
        entry.repo_id, entry.filename, revision=entry.revision, sha256=entry.sha256, progress=progress,
        cancel=cancel, cache_dir=None, terminal=progress is None and _terminal_wanted(), warn_unverified=False,
    )
    if entry.sha256 is None:
        digest = digest or _sha256(path, cancel, entry.name)
        logger.warning(
            "Catalog model '%s' has no recorded SHA-256, so %s was not verified against a known checksum. "
            "Its SHA-256 is %s.", entry.name, path, digest,
        )
    return path

