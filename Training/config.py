"""Command-line options with a config file: ``--config FILE`` (JSON, or YAML when PyYAML is
installed) gives defaults for any option (keys are the option names, with '-' or '_'); options
given on the command line win."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from SAMMed3DMoELib.errors import SAMMed3DError


def read_config_file(path) -> Dict[str, Any]:
    """A JSON or YAML mapping from ``path``."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SAMMed3DError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SAMMed3DError(f"{path} is YAML, which needs PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SAMMed3DError(f"{path} is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SAMMed3DError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise SAMMed3DError(f"{path} must hold a mapping of option names to values, not {type(data).__name__}")
    return data


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from ``--config`` (which the parser must define)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = read_config_file(known.config)
        dests = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests or dest in ("help", "config"):
                raise SAMMed3DError(
                    f"{known.config}: unknown option {key!r}; see '{parser.prog} --help' for the option names")
            action = dests[dest]
            if isinstance(value, str) and action.type is not None:
                value = action.type(value)
            defaults[dest] = value
            action.required = False  # the file gives it
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def as_list(value: Any, cast=str) -> List[Any]:
    """'a,b' / ['a', 'b'] / None -> a list (of ``cast`` values)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [cast(v) for v in value]


def jsonable(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed options as JSON-friendly values (paths as strings)."""
    out = {}
    for key, value in vars(args).items():
        if callable(value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[key] = value
    return out


def run_script(main) -> None:
    """``raise SystemExit(main())``, with a SAMMed3DError shown as one 'error:' line (exit 2)."""
    try:
        raise SystemExit(main())
    except SAMMed3DError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
