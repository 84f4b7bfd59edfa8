"""SAM-Med3D-MoE engine: the SAM-Med3D network, its mixture of expert decoders, checkpoints and
bundles, geometry, the interactive session, Hub downloads and the command line.

Pure Python + PyTorch: this package never imports Slicer, Qt or VTK.
"""

from .errors import (
    CancelledError,
    ConsentDeclined,
    DownloadError,
    OutOfMemoryError,
    SAMMed3DError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"
__all__ = [
    "SAMMed3DError", "CancelledError", "ConsentDeclined", "DownloadError", "OutOfMemoryError",
    "UnsafeCheckpointError", "__version__",
]
