"""What the command line prints: one-line messages, warnings, a stage bar, exit codes."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Dict, Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _stdin_is_terminal() -> bool:
    try:
        return bool(sys.stdin is not None and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return False


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "warning" if record.levelno >= logging.WARNING else record.levelname.lower()
            _err(f"{level}: {_one_line(record.getMessage())}")
        except Exception:  # pragma: no cover - never fail because of a log line
            self.handleError(record)


@contextmanager
def _console(debug: bool):
    """Library warnings and log warnings as one 'warning: ...' line each on stderr."""
    logger = logging.getLogger("SAMMed3DMoELib")
    handler = _WarningHandler(logging.DEBUG if debug else logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    if debug:
        logger.setLevel(logging.DEBUG)
    with warnings.catch_warnings():
        if not debug:
            def show(message, category, filename, lineno, file=None, line=None):
                _err(f"warning: {_one_line(message)}")

            warnings.showwarning = show
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


class _Stages:
    """A tqdm bar over the named steps of a command (stderr, terminals only) that also records
    how long each step took."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.timings_ms: Dict[str, float] = {}
        self._bar = tqdm(total=total, file=sys.stderr, leave=False, disable=not _stderr_is_terminal(),
                         bar_format="{desc} [{n_fmt}/{total_fmt} steps, {elapsed}]")

    @contextmanager
    def step(self, label: str, key: str):
        self._bar.set_description_str(label)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[key] = round((time.perf_counter() - start) * 1e3, 2)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _format_bytes(size: Optional[float]) -> str:
    if size is None:
        return "size unknown"
    size = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} TB"  # pragma: no cover

