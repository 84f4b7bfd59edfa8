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
"""


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
