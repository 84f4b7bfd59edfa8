"""The ``sammed3d-moe`` command line (also ``python -m SAMMed3DMoELib``).

Subcommands::

    sammed3d-moe segment IMAGE --model M (--point R,A,S | --point-ijk I,J,K | --box ...) --out MASK
    sammed3d-moe download MODEL
    sammed3d-moe convert CHECKPOINT BUNDLE_DIR [--overwrite]
    sammed3d-moe info MODEL_OR_BUNDLE [--json]
    sammed3d-moe catalog [--json]

Exit status: 0 success; 2 bad input (any :class:`~SAMMed3DMoELib.errors.SAMMed3DError`, bad
arguments included), reported as ONE line ``error: <message>`` on stderr; 130 when interrupted
(Ctrl-C) or cancelled (a declined download); 1 for an unexpected failure (one line, or the full
traceback with ``--debug``).

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

from ..errors import CancelledError, SAMMed3DError
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
            _err(f"cancelled: {_one_line(exc)}")
            return EXIT_INTERRUPTED
        except SAMMed3DError as exc:
            if debug:
                import traceback

                traceback.print_exc(file=sys.stderr)
            _err(f"error: {_one_line(exc)}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if debug:
                raise
            _err(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)")
            return EXIT_FAILURE

