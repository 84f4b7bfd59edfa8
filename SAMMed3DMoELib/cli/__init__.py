"""The ``sammed3d-moe`` command line (also ``python -m SAMMed3DMoELib``).

Subcommands::

    sammed3d-moe segment IMAGE --model M (--point R,A,S | --point-ijk I,J,K | --box ...) --out MASK
    sammed3d-moe download MODEL
    sammed3d-moe convert CHECKPOINT BUNDLE_DIR [--overwrite]
    sammed3d-moe info MODEL_OR_BUNDLE [--json]
    sammed3d-moe catalog [--json]

Exit status (also in ``--help`` and the README), each with ONE line on stderr (a traceback only
with ``--debug``)::

    0    success
    1    unexpected failure (a bug: run again with --debug and report the traceback)
    2    bad input: a file, an argument, a prompt or a model that cannot be used; a checkpoint
         that carries code
    3    a download failed or was refused: no network, offline mode, not on the Hub, access
         refused, checksum mismatch
    4    out of memory (the GPU or the CPU)
    5    the user declined (a download asked for consent)
    130  interrupted (Ctrl-C) or cancelled

Coordinates are RAS millimetres (the convention of 3D Slicer and nibabel: the coordinates grow
toward the patient's right, anterior and superior; ITK and DICOM use LPS, with the first two
negated), or voxel indices of IMAGE with ``--point-ijk``. Values may be separated by commas
and/or spaces; a value that starts with a minus sign may follow the option directly
(``--point -20,5,30``).

Heavy modules (torch, SimpleITK, huggingface_hub) are imported only by the commands that need
them, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import CancelledError, ConsentDeclined, OutOfMemoryError, SAMMed3DError
from .console import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    _console,
    _err,
    _one_line,
)
from .parser import _glue_negative_values, _UsageError, build_parser

__all__ = ["main", "build_parser"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(_glue_negative_values(argv))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    except _UsageError as exc:
        _err(f"error: {_one_line(exc)}")
        return EXIT_BAD_INPUT
    debug = debug or bool(getattr(args, "debug", False))
    with _console(debug):
        try:
            return int(args.func(args) or EXIT_OK)
        except CancelledError as exc:
            return _report(exc, "cancelled", debug)
        except ConsentDeclined as exc:
            return _report(exc, "declined", debug)
        except SAMMed3DError as exc:
            if _out_of_memory(exc) and not isinstance(exc, OutOfMemoryError):
                exc = OutOfMemoryError(str(exc))
            return _report(exc, "error", debug)
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if _out_of_memory(exc):
                return _report(OutOfMemoryError(
                    f"out of memory ({_one_line(exc)}); use --device cpu, close other programs, or segment a "
                    "smaller region (fewer --max-windows)"), "error", debug)
            if debug:
                raise
            _err(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)")
            return EXIT_FAILURE


def _report(exc: SAMMed3DError, label: str, debug: bool) -> int:
    """One line ``label: message`` on stderr (after the traceback with --debug); the class's exit status."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    _err(f"{label}: {_one_line(exc)}")
    return int(exc.exit_code)


def _out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` or what it was raised from is an allocation failure on any device (the one
    rule, :func:`SAMMed3DMoELib.device.is_out_of_memory`), however it was wrapped on the way out."""
    if "torch" in sys.modules:  # loaded by any command that ran a model; --help stays light
        from ..device import is_out_of_memory
    else:
        def is_out_of_memory(e: BaseException) -> bool:
            return isinstance(e, MemoryError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutOfMemoryError) or is_out_of_memory(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
