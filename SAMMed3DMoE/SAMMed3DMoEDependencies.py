"""Installing what the module needs, only with the user's consent, only on the main thread.

* PyTorch comes from the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA build that fits
  the NVIDIA driver). Its ``installTorch`` signature changed between versions, so the keyword
  arguments it accepts are detected at run time (:func:`install_torch`).
* The other packages (``Resources/requirements.txt``) go through ``slicer.packaging.pip_ensure``
  on Slicer 5.12 and later, ``slicer.util.pip_install`` before.
* What Slicer ships (numpy, SimpleITK, VTK) and the PyTorch just installed are pinned by a pip
  constraints file, so a dependency can never replace them.
* pip never runs from a worker thread (it hangs Slicer 5.12) and never on import: only when the
  user loads a model and agrees.
* If Slicer must restart in between, a setting remembers it and
  :meth:`DependencyInstaller.resume_after_restart` continues when the module is next opened.

Nothing here runs at import time; ``slicer.util``/``qt`` are imported inside the functions that
need the application.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, List, Optional

REQUIREMENTS_FILE = Path(__file__).resolve().parent / "Resources" / "requirements.txt"
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")
"""Shipped with Slicer: pinned to the installed version during every install."""
TORCH_REQUIREMENT = ">=2.6"  # the engine's range (pyproject.toml)
PENDING_SETTING = "SAMMed3DMoE/PendingDependencyInstall"
REQUESTER = "SAM-Med3D-MoE"


class DependencyError(RuntimeError):
    """Installation could not proceed (message says what to do)."""


def read_requirements(path: Path = REQUIREMENTS_FILE) -> List[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # very old environments: presence is all we can check
        name = requirement.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(version, prereleases=True)


def missing_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements not satisfied by the installed distributions."""
    return [r for r in requirements if not _satisfied(r)]


def protected_constraints(extra: Iterable[str] = ("torch",)) -> List[str]:
    """``name==version`` for what must not be replaced: Slicer's own packages and ``extra``."""
    pins = []
    for name in list(PROTECTED_DISTRIBUTIONS) + list(extra):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def install_torch(pytorch_utils_logic, ask: bool = True):
    """Install PyTorch through the PyTorch extension's logic; returns the ``torch`` module or
    None when the user declined. Only the keyword arguments this version of ``installTorch``
    accepts are passed (older ones have no version requirement argument)."""
    if pytorch_utils_logic.torchInstalled():
        return importlib.import_module("torch")
    wanted = {"askConfirmation": ask, "torchVersionRequirement": TORCH_REQUIREMENT}
    parameters = inspect.signature(pytorch_utils_logic.installTorch).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in wanted.items() if accepts_any or k in parameters}
    return pytorch_utils_logic.installTorch(**kwargs)


def assert_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise DependencyError(
            "Python packages can only be installed from Slicer's main thread (pip from a worker thread hangs "
            "Slicer). This is a bug in the caller; please report it."
        )


def _write_constraints(pins: List[str]) -> str:
    handle, path = tempfile.mkstemp(prefix="sammed3dmoe-constraints-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write("\n".join(pins) + "\n")
    return path


def install_requirements(requirements: List[str], ask: bool = True) -> None:
    """Install ``requirements`` with Slicer's tools (``pip_ensure`` on 5.12+, ``pip_install``
    before), never replacing Slicer's numpy/SimpleITK/VTK or the installed PyTorch."""
    assert_main_thread()
    missing = missing_requirements(requirements)
    if not missing:
        return
    constraints = _write_constraints(protected_constraints())
    try:
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(missing, constraints=constraints, prompt_install=ask, requester=REQUESTER)
            except RuntimeError as exc:  # declined in pip_ensure's own dialog
                raise DependencyError(f"Installation declined: {exc}") from exc
        else:
            import slicer.util

            if ask and not slicer.util.confirmOkCancelDisplay(
                    "SAM-Med3D-MoE needs these Python packages:\n\n" + "\n".join(missing)
                    + "\n\nInstall them now? This modifies Slicer's Python environment.",
                    windowTitle=f"{REQUESTER} - Install Python packages"):
                raise DependencyError("Installation declined.")
            slicer.util.pip_install(["-c", constraints] + missing)
    finally:
        os.unlink(constraints)


class DependencyInstaller:
    """The whole first-run install: PyTorch, then the requirements; resumable after a restart.

    Consent is asked by the tools that install: ``PyTorchUtils`` (``askConfirmation``) for
    PyTorch, ``pip_ensure`` (or this module's dialog on Slicer < 5.12) for the rest.

    ``settings``: an object with ``value(key)``, ``setValue(key, value)`` and ``remove(key)``
    (``qt.QSettings()`` in Slicer). ``pytorch_utils``: a callable returning the PyTorch
    extension's ``PyTorchUtilsLogic`` (None when the extension is missing)."""

    def __init__(self, settings, pytorch_utils: Callable[[], object], requirements: Optional[List[str]] = None) -> None:
        self.settings = settings
        self.pytorch_utils = pytorch_utils
        self.requirements = read_requirements() if requirements is None else list(requirements)

    def needed(self) -> List[str]:
        """Human-readable list of what is missing (empty when everything is installed)."""
        items = [] if torch_available() else [f"torch{TORCH_REQUIREMENT} (through the PyTorch extension; 1-3 GB)"]
        return items + missing_requirements(self.requirements)

    @property
    def pending(self) -> bool:
        return str(self.settings.value(PENDING_SETTING) or "").lower() in ("1", "true")

    def ensure(self, ask: bool = True) -> bool:
        """Install what is missing, each step after the user's consent; False if they declined.
        Main thread only."""
        assert_main_thread()
        if not self.needed():
            self.settings.remove(PENDING_SETTING)
            return True
        self.settings.setValue(PENDING_SETTING, "true")  # survives a restart in the middle
        try:
            if not torch_available():
                logic = self.pytorch_utils()
                if logic is None:
                    raise DependencyError(
                        "PyTorch is missing and the 'PyTorch' extension is not installed. Install the PyTorch "
                        "extension from the Extensions Manager, restart Slicer, and load the model again."
                    )
                if install_torch(logic, ask=ask) is None:
                    self.settings.remove(PENDING_SETTING)
                    return False
            install_requirements(self.requirements, ask=ask)
        except DependencyError:
            self.settings.remove(PENDING_SETTING)
            raise
        self.settings.remove(PENDING_SETTING)
        return True

    def resume_after_restart(self) -> bool:
        """Continue an install the user started before Slicer restarted (the module calls this
        when it is opened). The install tools ask again for what is still missing, because the
        earlier answer may have been for another step. True if an install was resumed."""
        if not self.pending:
            return False
        return self.ensure(ask=True)
