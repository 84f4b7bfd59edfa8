"""SAM-Med3D-MoE engine: the SAM-Med3D network, its mixture of expert decoders, weights,
geometry, the interactive session, Hub downloads and the command line.

Pure Python + PyTorch: this package never imports Slicer, Qt or VTK.
"""

from .errors import CancelledError, SAMMed3DError

__version__ = "0.1.0"
__all__ = ["SAMMed3DError", "CancelledError", "__version__"]
