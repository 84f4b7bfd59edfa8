"""``python -m SAMMed3DMoELib``: the same command line as ``sammed3d-moe``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
