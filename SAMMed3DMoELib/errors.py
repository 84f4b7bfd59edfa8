"""The one exception type users see for bad input.

Every message says what was wrong and what to do about it; the command line prints it as one
line and exits with status 2, the Slicer module shows it in a message box.
"""


class SAMMed3DError(ValueError):
    """Bad input or an unusable model/file, with a message that tells the user what to do."""


class CancelledError(SAMMed3DError):
    """Long work (a download, an inference job) was cancelled by the caller."""
