"""The exceptions users see. Every message says what was wrong and what to do about it.

The command line prints one line and exits with the class's ``exit_code`` (documented in the
README and ``sammed3d-moe --help``); the Slicer module shows the message in a dialog. Catch
:class:`SAMMed3DError` for all of them.

================================  ====  ==========================================
class                             exit  meaning
================================  ====  ==========================================
:class:`SAMMed3DError`            2     bad input: a file, an argument, a prompt, a model
:class:`UnsafeCheckpointError`    2     a checkpoint file that carries code (refused, nothing ran)
:class:`DownloadError`            3     a download failed or was refused: network, offline mode,
                                        missing on the Hub, checksum mismatch
:class:`OutOfMemoryError`         4     the device (or the CPU) ran out of memory
:class:`ConsentDeclined`          5     the user declined a download (or another action asked first)
:class:`CancelledError`           130   cancelled by the caller (as Ctrl-C is)
================================  ====  ==========================================

:func:`exception_text` is the one place where an exception from another library (ITK, PyTorch,
safetensors) is turned into the short text quoted inside these messages.
"""

import re


class SAMMed3DError(ValueError):
    """Bad input or an unusable model/file, with a message that tells the user what to do."""

    exit_code = 2


class UnsafeCheckpointError(SAMMed3DError):
    """A checkpoint that would run code when unpickled; it was refused and nothing in it ran."""


class DownloadError(SAMMed3DError):
    """A download failed or was refused (no network, offline mode, not on the Hub, checksum)."""

    exit_code = 3


class OutOfMemoryError(SAMMed3DError):
    """The compute device (or the CPU) ran out of memory, even after the fallbacks."""

    exit_code = 4


class ConsentDeclined(SAMMed3DError):
    """The user said no when asked (e.g. before a large download); nothing was done."""

    exit_code = 5


class CancelledError(SAMMed3DError):
    """Long work (a download, an inference job) was cancelled by the caller."""

    exit_code = 130


_LIBRARY_NOISE = re.compile(r"^Exception thrown in SimpleITK|trouble reading|trouble$|_read:$")
_ADDRESS = re.compile(r"\(0x[0-9a-fA-F]+\)")


def exception_text(exc: BaseException, *, first_line_only: bool = False, limit: int = 300) -> str:
    """``exc``'s message on one line for quoting in a user message: ITK's source-file preamble and
    object addresses dropped, lines joined with '; ' (or only the first one, for libraries such
    as PyTorch whose later lines are advice meant for programmers), at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [_ADDRESS.sub("", ln) for ln in lines if not _LIBRARY_NOISE.search(ln)]
    if first_line_only:
        lines = lines[:1]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
