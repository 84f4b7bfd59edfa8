"""First-run dependency installation of the Slicer module (SAMMed3DMoEDependencies.py).

Stand-ins, and why: the PyTorch extension's ``PyTorchUtilsLogic`` and Qt's ``QSettings`` exist
only inside the Slicer application, so two small classes with their documented interfaces
stand in for them (two ``installTorch`` signatures that PyTorchUtils has had). Nothing here
runs pip: the real installed distributions are read to decide what is missing.
"""

from __future__ import annotations

import importlib.metadata
import threading
import tomllib
from pathlib import Path

import pytest

import slicer_helpers  # noqa: F401  (puts the module folder on sys.path)
import SAMMed3DMoEDependencies as deps

REPO = Path(__file__).resolve().parent.parent


class Settings:
    """Stand-in for qt.QSettings (value / setValue / remove)."""

    def __init__(self):
        self.values = {}

    def value(self, key):
        return self.values.get(key)

    def setValue(self, key, value):
        self.values[key] = value

    def remove(self, key):
        self.values.pop(key, None)


class PyTorchUtilsLogic2021:
    """installTorch as in PyTorchUtils before version requirements existed."""

    def __init__(self, answer="torch"):
        self.calls = []
        self.answer = answer

    @staticmethod
    def torchInstalled():
        return False

    def installTorch(self, askConfirmation=False, forceComputationBackend=None):
        self.calls.append(dict(askConfirmation=askConfirmation, forceComputationBackend=forceComputationBackend))
        return self.answer


class PyTorchUtilsLogic2023(PyTorchUtilsLogic2021):
    """installTorch with version requirements (PyTorchUtils since mid 2023)."""

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        self.calls.append(dict(askConfirmation=askConfirmation, torchVersionRequirement=torchVersionRequirement))
        return self.answer


def test_requirements_are_the_engines_ranges_and_never_what_slicer_ships():
    requirements = deps.read_requirements()
    assert requirements, "Resources/requirements.txt is empty"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    declared = set(pyproject["project"]["dependencies"])
    for line in requirements:
        assert line in declared, f"{line} is not the range pyproject.toml declares"
        name = line.split(">")[0].split("=")[0].split("<")[0].lower()
        assert name not in ("numpy", "simpleitk", "vtk", "torch"), f"{name} must not be installed by pip here"
    assert f"torch{deps.TORCH_REQUIREMENT}" in declared  # what PyTorchUtils is asked for


@pytest.mark.parametrize("logic_class, passed", [
    (PyTorchUtilsLogic2021, {"askConfirmation": True, "forceComputationBackend": None}),
    (PyTorchUtilsLogic2023, {"askConfirmation": True, "torchVersionRequirement": deps.TORCH_REQUIREMENT}),
])
def test_install_torch_passes_only_what_this_pytorchutils_accepts(logic_class, passed):
    logic = logic_class()
    assert deps.install_torch(logic, ask=True) == "torch"
    assert logic.calls == [passed]


def test_install_torch_reports_a_refusal_and_skips_when_installed():
    declined = PyTorchUtilsLogic2023(answer=None)
    assert deps.install_torch(declined, ask=True) is None

    class Installed(PyTorchUtilsLogic2023):
        @staticmethod
        def torchInstalled():
            return True

    installed = Installed()
    assert deps.install_torch(installed).__name__ == "torch" and installed.calls == []


def test_constraints_pin_slicers_own_packages_and_torch():
    pins = deps.protected_constraints()
    for name in ("numpy", "SimpleITK", "vtk", "torch"):
        assert f"{name}=={importlib.metadata.version(name)}" in pins


def test_missing_requirements_reads_the_installed_versions():
    numpy_version = importlib.metadata.version("numpy")
    assert deps.missing_requirements([f"numpy=={numpy_version}", "numpy>=1.0"]) == []
    assert deps.missing_requirements(["numpy<1.0"]) == ["numpy<1.0"]
    assert deps.missing_requirements(["sammed3d-no-such-package>=1"]) == ["sammed3d-no-such-package>=1"]
    assert deps.missing_requirements(['numpy<1.0; python_version < "3.0"']) == []  # marker does not apply


def test_installs_run_only_on_the_main_thread():
    errors = []

    def worker():
        try:
            deps.install_requirements(["sammed3d-no-such-package>=1"])
        except deps.DependencyError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_installer_with_nothing_missing_clears_a_pending_install():
    settings = Settings()
    installer = deps.DependencyInstaller(settings, pytorch_utils=lambda: None, requirements=deps.read_requirements())
    assert installer.needed() == []  # this environment has the engine's dependencies
    assert not installer.resume_after_restart()  # nothing was pending
    settings.setValue(deps.PENDING_SETTING, "true")  # an install interrupted by a restart
    assert installer.pending
    assert installer.resume_after_restart()
    assert not installer.pending and deps.PENDING_SETTING not in settings.values
