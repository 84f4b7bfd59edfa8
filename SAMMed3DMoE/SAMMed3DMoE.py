"""SAM-Med3D-MoE: interactive 3D segmentation in 3D Slicer.

The module (title, help), its parameter node, a thin Widget (GUI <-> parameter node, progress,
keyboard shortcuts) and the in-Slicer self-test. Everything that is not GUI lives in
the ``SAMMed3DMoELogic`` package (MRML <-> engine, testable without Qt) and the engine package
``SAMMed3DMoELib`` (installed beside this file). Dependencies (PyTorch and a few packages) are
installed on first use, with consent, by ``SAMMed3DMoEDependencies.py``.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_TREE = os.path.dirname(_HERE)
if os.path.isdir(os.path.join(_SOURCE_TREE, "SAMMed3DMoELib")) and _SOURCE_TREE not in sys.path:
    # module path added from a source checkout: the engine package is the folder's sibling
    sys.path.append(_SOURCE_TREE)

import SAMMed3DMoEDependencies as dependencies  # noqa: E402
from SAMMed3DMoELogic import (  # noqa: E402
    AUTO,
    CPU_WARNING,
    DEVICES,
    PromptNodes,
    SAMMed3DMoELogic,
    Target,
    is_segment_locked,
    set_segment_locked,
)

LOCAL_SOURCE = "Local file or bundle folder"
HUB_SOURCE = "Hugging Face Hub repository"

# (button, key sequence(s), what it does): the one table for shortcuts and their tooltips.
SHORTCUTS = (
    ("positiveButton", ("P",), "Place positive points: click on the object"),
    ("negativeButton", ("N",), "Place negative points: click on what is not the object"),
    ("togglePolarityButton", ("T",), "Switch between placing positive and negative points"),
    ("boxButton", ("B",), "Draw a box around the object"),
    ("clearButton", ("C",), "Remove all prompts and their result (undoable)"),
    ("undoButton", ("Z", "Ctrl+Z"), "Undo the last change: the prompts and every segment it touched"),
    ("redoButton", ("Y", "Ctrl+Y"), "Redo"),
    ("segmentButton", ("R",), "Segment now with the current prompts"),
    ("newSegmentButton", ("Shift+N",), "Add a new empty segment and start fresh prompts"),
    ("acceptNextButton", ("A",), "Accept this segment (marked completed) and start the next one"),
    ("lockSegmentButton", ("L",), "Lock the selected segment: this module never changes it"),
    ("showIn3DCheckBox", ("D",), "Show the segmentation in the 3D view"),
)

TEXT_INPUT_CLASSES = ("QLineEdit", "QTextEdit", "QPlainTextEdit", "QAbstractSpinBox", "ctkConsole")


#
# Module
#


class SAMMed3DMoE(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SAM-Med3D-MoE"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SAM-Med3D-MoE for 3D Slicer developers"]
        self.parent.helpText = """
Interactive 3D segmentation with SAM-Med3D and a mixture of expert decoders. Place positive and
negative points (or a box) on a CT or MR volume and get a 3D segment; each click after the first
in a region takes only tens of milliseconds. See the
<a href="https://github.com/sammed3d-moe/SlicerSAMMed3DMoE/blob/main/SAMMed3DMoE/README.md">module documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on SAM-Med3D (Wang et al., ECCV) and SAM-Med3D-MoE (Wang et al., MICCAI 2024).
Model weights have their own licences, shown in the module before download.
"""


#
# Parameter node
#


@parameterNodeWrapper
class SAMMed3DMoEParameterNode:
    """Everything the user chose. Markups nodes hold the prompts; the segment is written into
    ``segmentation``/``segmentID`` of ``inputVolume``'s grid."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    modelSource: str = "Demo (offline)"  # the packaged demo model: works offline
    modelPath: str = ""
    hubRepoId: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = AUTO
    expert: str = AUTO
    tau: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    autoUpdate: bool = True
    showIn3D: bool = False


#
# Widget
#


class SAMMed3DMoEWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI <-> parameter node, progress, shortcuts. All work is in the Logic and the engine."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._updateRequested = False
        self._restoringPrompts = False
        self._job = None  # (future, what, on_done) for downloads and model loading
        self._progress = None
        self._catalog = {}

    # ------------------------------------------------------------------ set up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMMed3DMoE.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.moduleLogic = SAMMed3DMoEModuleLogic()
        self.logic = self.moduleLogic.logic

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionModeChanged)

        self._fillModelSources()
        self.ui.modelSourceComboBox.currentIndexChanged.connect(self.onModelSourceChanged)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelPathChanged)
        self.ui.downloadButton.clicked.connect(self.onDownload)
        self.ui.cancelDownloadButton.clicked.connect(self.onCancelJob)
        self.ui.importCheckpointButton.clicked.connect(self.onImportCheckpoint)
        self.ui.loadModelButton.clicked.connect(self.onLoadModel)

        self.ui.segmentSelector.currentNodeChanged.connect(self.onSegmentationSelected)
        self.ui.segmentSelector.currentSegmentChanged.connect(self.onSegmentSelected)
        self.ui.newSegmentButton.clicked.connect(lambda: self.onNextSegment(accept=False))
        self.ui.acceptNextButton.clicked.connect(lambda: self.onNextSegment(accept=True))
        self.ui.lockSegmentButton.toggled.connect(self.onLockSegment)
        self.ui.overwriteComboBox.currentIndexChanged.connect(self.onOverwriteChanged)

        self.ui.positiveButton.toggled.connect(lambda on: self.onPlace("positive", on))
        self.ui.negativeButton.toggled.connect(lambda on: self.onPlace("negative", on))
        self.ui.boxButton.toggled.connect(lambda on: self.onPlace("box", on))
        self.ui.togglePolarityButton.clicked.connect(self.onTogglePolarity)
        self.ui.clearButton.clicked.connect(self.onClear)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.redoButton.clicked.connect(self.onRedo)
        self.ui.segmentButton.clicked.connect(self.requestUpdate)
        self.ui.expertComboBox.currentIndexChanged.connect(self.onExpertChanged)
        self.ui.showIn3DCheckBox.toggled.connect(self.onShowIn3D)

        for buttonName, keys, text in SHORTCUTS:
            getattr(self.ui, buttonName).toolTip = f"{text} ({' or '.join(keys)})"

        self._timer = qt.QTimer()
        self._timer.setInterval(30)
        self._timer.timeout.connect(self.onTimer)
        self._timer.start()

        self.initializeParameterNode()
        self._resumeInstallAfterRestart()

    def cleanup(self) -> None:
        self._timer.stop()
        self.uninstallShortcuts()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()
            SAMMed3DMoEModuleLogic._shared = None  # a reloaded module starts a fresh Logic

    def enter(self) -> None:
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.uninstallShortcuts()
        self._stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(SAMMed3DMoEParameterNode(self.moduleLogic.getParameterNode()))
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.positivePoints or not p.negativePoints or not p.box:
            nodes = self.logic.create_prompt_nodes()
            p.positivePoints, p.negativePoints, p.box = nodes.positive, nodes.negative, nodes.box

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._observePromptNodes(False)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._observePromptNodes(True)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """What the parameterNodeWrapper cannot bind: dynamic combo boxes, the segment selector,
        button states."""
        p = self._parameterNode
        if p is None:
            return
        self.logic.device = p.device
        self.logic.expert = p.expert if p.expert in self.logic.expert_choices() else AUTO
        self.logic.tau = p.tau
        self._setComboText(self.ui.modelSourceComboBox, p.modelSource)
        self.ui.modelPathLineEdit.currentPath = p.modelPath
        self._updateModelSourceWidgets()
        self.ui.segmentSelector.setCurrentNode(p.segmentation)
        if p.segmentID:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentID)
        editorNode = self.logic.segment_editor_node()
        overwriteModes = [editorNode.OverwriteNone, editorNode.OverwriteVisibleSegments, editorNode.OverwriteAllSegments]
        with _SignalsBlocked(self.ui.overwriteComboBox):
            self.ui.overwriteComboBox.currentIndex = overwriteModes.index(editorNode.GetOverwriteMode())
        self._updateDeviceWarning()
        self._updateButtons()

    @staticmethod
    def _setComboText(combo, text) -> None:
        index = combo.findText(text)
        if index >= 0 and combo.currentIndex != index:
            with _SignalsBlocked(combo):
                combo.currentIndex = index

    # ------------------------------------------------------------------ model
    def _fillModelSources(self) -> None:
        try:
            from SAMMed3DMoELib.catalog import load_catalog

            self._catalog = load_catalog()
        except Exception as exc:  # a broken catalog must not break the module
            logging.error(f"SAM-Med3D-MoE: model catalog not readable: {exc}")
            self._catalog = {}
        combo = self.ui.modelSourceComboBox
        combo.clear()
        for name, entry in self._catalog.items():
            combo.addItem(entry.title)  # e.g. "Demo (offline)"; _catalogEntry maps it back to the name
            combo.setItemData(combo.count - 1, entry.description, qt.Qt.ToolTipRole)
        combo.addItem(LOCAL_SOURCE)
        combo.addItem(HUB_SOURCE)

    def onModelSourceChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.modelSource = self.ui.modelSourceComboBox.currentText

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def _catalogEntry(self, source: str):
        """The catalog entry shown as ``source`` in the model chooser (its title or name), or None."""
        return next((e for e in self._catalog.values() if source in (e.title, e.name)), None)

    def _modelSpec(self) -> str:
        p = self._parameterNode
        if p.modelSource == LOCAL_SOURCE:
            return p.modelPath
        if p.modelSource == HUB_SOURCE:
            return p.hubRepoId.strip()
        entry = self._catalogEntry(p.modelSource)
        return entry.name if entry is not None else p.modelSource

    @staticmethod
    def _modelCard(entry) -> str:
        if entry.homepage:
            return entry.homepage
        return f"https://huggingface.co/{entry.repo_id}" if entry.repo_id else ""

    def _updateModelSourceWidgets(self) -> None:
        source = self._parameterNode.modelSource
        entry = self._catalogEntry(source)
        self.ui.modelPathLineEdit.visible = source == LOCAL_SOURCE
        self.ui.importCheckpointButton.visible = source == LOCAL_SOURCE
        self.ui.hubRepoLineEdit.visible = source == HUB_SOURCE
        self.ui.downloadButton.visible = (entry is not None and entry.kind != "packaged") or source == HUB_SOURCE
        if entry is not None and entry.kind == "packaged":
            self.ui.modelInfoLabel.text = (
                f"{entry.description}<br>Ships with the extension (no download) · Licence: {entry.license or 'see the README'}")
        elif entry is not None:
            size = f"{entry.size_mb:.0f} MB" if entry.size_mb else "size shown before download"
            licence = entry.license or "see the model card"
            self.ui.modelInfoLabel.text = (
                f"{entry.description}<br>Size: {size} · Licence: {licence} · "
                f"<a href='{self._modelCard(entry)}'>model card</a>")
        elif source == HUB_SOURCE:
            self.ui.modelInfoLabel.text = "A model bundle on the Hugging Face Hub, 'owner/name'. Its licence is on its model card."
        else:
            self.ui.modelInfoLabel.text = "A checkpoint (.pth, .safetensors) or a bundle folder with config.json."

    def _ensureDependencies(self) -> bool:
        installer = _installer()
        try:
            if installer.ensure(ask=True):
                return True
        except dependencies.DependencyError as exc:
            slicer.util.errorDisplay(str(exc))
            return False
        slicer.util.infoDisplay("The model cannot be used until its Python packages are installed.")
        return False

    def _resumeInstallAfterRestart(self) -> None:
        installer = _installer()
        if installer.pending:
            slicer.util.infoDisplay("Continuing the installation of SAM-Med3D-MoE's Python packages started before the restart.")
            try:
                installer.resume_after_restart()
            except dependencies.DependencyError as exc:
                slicer.util.errorDisplay(str(exc))

    def onDownload(self) -> None:
        if self._job is not None or not self._ensureDependencies():
            return
        spec = self._modelSpec()
        entry = self._catalog.get(spec)
        if entry is not None and entry.kind == "packaged":
            return  # nothing to download: it ships with the extension
        from SAMMed3DMoELib import hub

        if entry is not None and entry.filename:
            self._startJob(lambda cancel=None: hub.remote_file_info(entry.repo_id, entry.filename, entry.revision),
                           "Asking the Hub for the size", lambda info: self._confirmDownload(spec, info.size))
        else:
            self._confirmDownload(spec, None)

    def _confirmDownload(self, spec, size) -> None:
        entry = self._catalog.get(spec)
        sizeText = f"{size / 1e6:.0f} MB" if size else (f"about {entry.size_mb:.0f} MB" if entry and entry.size_mb else "unknown size")
        licence = entry.license if entry else None
        where = self._modelCard(entry) if entry else f"https://huggingface.co/{spec}"
        if not slicer.util.confirmOkCancelDisplay(
                f"Download '{spec}' ({sizeText}) from {where}?\n\nLicence: {licence or 'see the model card at ' + where}.\n"
                "The file is kept in the Hugging Face cache and reused next time.", windowTitle="Download model"):
            return
        from SAMMed3DMoELib.hub import resolve_model

        self._startJob(lambda cancel: resolve_model(spec, progress=self._onProgress, cancel=cancel),
                       f"Downloading {spec}", lambda path: self._setStatus(f"Downloaded to {path}"))

    def onImportCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import a checkpoint file", "",
                                              "Checkpoints (*.pth *.pt *.ckpt *.safetensors)")
        if not path or not self._ensureDependencies():
            return
        from SAMMed3DMoELib.model_info import checkpoint_info

        def done(info):
            if not info["loadable"]:
                slicer.util.errorDisplay(f"{os.path.basename(path)} cannot be used: {info['architecture']} ({info['problem']}).")
                return
            self._parameterNode.modelSource = LOCAL_SOURCE
            self._parameterNode.modelPath = path
            self._setStatus(f"Imported {os.path.basename(path)}: {info['sha256_note']}. Press 'Load model'.")

        self._startJob(lambda cancel=None: checkpoint_info(Path(path), self._catalog), "Checking the checkpoint", done)

    def onLoadModel(self) -> None:
        if self._job is not None or not self._ensureDependencies():
            return
        spec = self._modelSpec()
        if not spec:
            slicer.util.errorDisplay("Choose a model: a catalog entry, a local file or folder, or a Hub repository id.")
            return
        entry = self._catalog.get(spec)
        if entry is not None and entry.filename:
            from SAMMed3DMoELib.hub import cached_file

            if cached_file(entry.repo_id, entry.filename, revision=entry.revision) is None:
                self.onDownload()  # asks first; load again when it is done
                return
        elif self._parameterNode.modelSource == HUB_SOURCE and not slicer.util.confirmOkCancelDisplay(
                f"Load '{spec}' from the Hugging Face Hub? Files not in the cache are downloaded.",
                windowTitle="Load model"):
            return
        device = self._parameterNode.device
        self._startJob(lambda cancel: self.logic.load_model(spec, device, progress=self._onProgress, cancel=cancel),
                       f"Loading {spec}", lambda model: self._modelLoaded(model, spec))

    def _modelLoaded(self, model, spec) -> None:
        self.logic.set_model(model, spec)
        self._parameterNode.tau = float(model.tau)  # the bundle's own threshold is the starting point
        device = next(model.parameters()).device
        self._setStatus(f"Model '{spec}' loaded on {device}.")
        self._fillExperts()
        self._updateDeviceWarning(device.type)
        self._updateButtons()

    def _fillExperts(self) -> None:
        combo = self.ui.expertComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in self.logic.expert_choices():
            combo.addItem({"auto": "Auto (gate chooses)", "general": "General only"}.get(name, name), name)
        index = combo.findData(self._parameterNode.expert)
        combo.currentIndex = max(index, 0)
        combo.blockSignals(wasBlocked)
        self.ui.tauSliderWidget.enabled = len(self.logic.expert_choices()) > 2

    def onExpertChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.expert = self.ui.expertComboBox.itemData(index)
            self.requestUpdate()

    def _updateDeviceWarning(self, resolved=None) -> None:
        """The CPU warning, with the expected click times, whenever the model runs (or will run) there."""
        device = resolved or self._parameterNode.device
        if device == AUTO and "torch" in sys.modules:
            device = _bestDevice()
        self.ui.deviceWarningLabel.text = CPU_WARNING
        self.ui.deviceWarningLabel.visible = device == "cpu"

    # ------------------------------------------------------------------ background jobs
    def _startJob(self, fn, what, onDone) -> None:
        self._progress = None
        future = self.logic.worker.submit(fn, key="model", pass_cancel=True)
        self._job = (future, what, onDone)
        self.ui.downloadProgressBar.visible = True
        self.ui.downloadProgressBar.setRange(0, 0)
        self.ui.cancelDownloadButton.visible = True
        self._setStatus(what + " ...")

    def _onProgress(self, done, total) -> None:  # called on the worker thread
        self._progress = (done, total)

    def onCancelJob(self) -> None:
        if self._job is not None:
            # a no-op under the same key supersedes the download or load (it stops at its next chunk)
            self.logic.worker.submit(lambda: None, key="model")

    def _pollJob(self) -> None:
        future, what, onDone = self._job
        if self._progress and self._progress[1]:
            done, total = self._progress
            self.ui.downloadProgressBar.setRange(0, 1000)
            self.ui.downloadProgressBar.value = int(1000 * done / total)
            self.ui.downloadProgressBar.format = f"{done / 1e6:.0f} / {total / 1e6:.0f} MB"
        if not future.done():
            return
        self._job = None
        self.ui.downloadProgressBar.visible = False
        self.ui.cancelDownloadButton.visible = False
        if future.cancelled():
            self._setStatus(f"{what}: cancelled.")
            return
        error = future.exception()
        if error is not None:
            self._setStatus(f"{what}: failed.")
            slicer.util.errorDisplay(str(error))
            return
        try:
            onDone(future.result())
        except Exception as exc:
            slicer.util.errorDisplay(str(exc))

    def _setStatus(self, text) -> None:
        self.ui.modelStatusLabel.text = text

    # ------------------------------------------------------------------ target
    def _target(self):
        p = self._parameterNode
        if p is None or p.segmentation is None or not p.segmentID:
            return None
        return Target(p.segmentation, p.segmentID)

    def _promptNodes(self) -> PromptNodes:
        p = self._parameterNode
        return PromptNodes(p.positivePoints, p.negativePoints, p.box)

    def _ensureTarget(self):
        p = self._parameterNode
        target = self._target()
        if target is None or target.segmentation.GetSegmentation().GetSegment(target.segment_id) is None:
            if not p.inputVolume:
                raise ValueError("Choose the input volume first.")
            target = self.logic.new_target(p.inputVolume, p.segmentation)
            p.segmentation, p.segmentID = target.segmentation, target.segment_id
        return target

    def onSegmentationSelected(self, node) -> None:
        if self._parameterNode and self._parameterNode.segmentation is not node:
            self._parameterNode.segmentation = node

    def onSegmentSelected(self, segmentID) -> None:
        if self._parameterNode and self._parameterNode.segmentID != segmentID:
            self._parameterNode.segmentID = segmentID or ""
            self.logic.forget_history()
            self._updateButtons()

    def onNextSegment(self, accept) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start a new segment.", waitCursor=True):
            self._restoringPrompts = True
            try:
                target = self._target()
                if target is None or not p.inputVolume:
                    target = self._ensureTarget()
                else:
                    target = self.logic.next_segment(p.inputVolume, target, self._promptNodes(), accept=accept)
            finally:
                self._restoringPrompts = False
            p.segmentation, p.segmentID = target.segmentation, target.segment_id
            self.ui.resultInfoLabel.text = ""

    def onLockSegment(self, locked) -> None:
        target = self._target()
        if target is not None and is_segment_locked(target.segmentation, target.segment_id) != locked:
            set_segment_locked(target.segmentation, target.segment_id, locked)
        self._updateButtons()

    def onOverwriteChanged(self, index) -> None:
        editorNode = self.logic.segment_editor_node()
        editorNode.SetOverwriteMode([editorNode.OverwriteNone, editorNode.OverwriteVisibleSegments,
                                     editorNode.OverwriteAllSegments][index])

    # ------------------------------------------------------------------ prompts
    def _observePromptNodes(self, observe) -> None:
        p = self._parameterNode
        events = (vtkMRMLMarkupsFiducialNode.PointPositionDefinedEvent, vtkMRMLMarkupsFiducialNode.PointRemovedEvent,
                  vtkMRMLMarkupsFiducialNode.PointEndInteractionEvent)
        for node in (p.positivePoints, p.negativePoints, p.box):
            if node is None:
                continue
            # a box is resized with its handles: follow its changes (requests are debounced and
            # repeated ones are dropped by the Logic)
            for event in events + ((vtk.vtkCommand.ModifiedEvent,) if node is p.box else ()):
                if observe and not self.hasObserver(node, event, self.onPromptsChanged):
                    self.addObserver(node, event, self.onPromptsChanged)
                elif not observe:
                    self.removeObserver(node, event, self.onPromptsChanged)

    def onPromptsChanged(self, caller=None, event=None) -> None:
        if self._restoringPrompts:
            return
        if self._parameterNode.autoUpdate:
            self._updateRequested = True  # sent on the next timer tick (one request per burst)

    def requestUpdate(self) -> None:
        self._updateRequested = True

    def _sendRequest(self) -> None:
        p = self._parameterNode
        try:
            if not p.inputVolume:
                raise ValueError("Choose the input volume first.")
            target = self._ensureTarget()
            self.logic.request(p.inputVolume, target, self._promptNodes())
            self.ui.predictionProgressBar.visible = True
        except Exception as exc:
            self.ui.resultInfoLabel.text = f"<span style='color:#c0392b'>{exc}</span>"

    def onPlace(self, role, on) -> None:
        p = self._parameterNode
        node = {"positive": p.positivePoints, "negative": p.negativePoints, "box": p.box}[role]
        buttons = {"positive": self.ui.positiveButton, "negative": self.ui.negativeButton, "box": self.ui.boxButton}
        if not on:
            if not any(b.checked for b in buttons.values()):
                self._stopPlacing()
            return
        for other, button in buttons.items():
            if other != role:
                with _SignalsBlocked(button):
                    button.checked = False
        if role == "box":
            self._restoringPrompts = True
            node.RemoveAllControlPoints()  # a new box replaces the old one
            self._restoringPrompts = False
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(0 if role == "box" else 1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onInteractionModeChanged(self, caller, event) -> None:
        """Placement ended in a view (Escape, or the last box corner): release the place buttons."""
        if caller.GetCurrentInteractionMode() != caller.Place:
            for button in (self.ui.positiveButton, self.ui.negativeButton, self.ui.boxButton):
                with _SignalsBlocked(button):
                    button.checked = False

    def _stopPlacing(self) -> None:
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)

    def onTogglePolarity(self) -> None:
        if self.ui.negativeButton.checked:
            self.ui.positiveButton.checked = True
        else:
            self.ui.negativeButton.checked = True

    def onClear(self) -> None:
        p = self._parameterNode
        target = self._target()
        with slicer.util.tryWithErrorDisplay("Could not clear the prompts.", waitCursor=True):
            self._restoringPrompts = True
            try:
                if target is None or not p.inputVolume:
                    self._promptNodes().clear()
                else:
                    self.logic.clear(p.inputVolume, target, self._promptNodes())
            finally:
                self._restoringPrompts = False
            self.ui.resultInfoLabel.text = ""
        self._updateButtons()

    def onUndo(self) -> None:
        self._undoRedo(self.logic.undo)

    def onRedo(self) -> None:
        self._undoRedo(self.logic.redo)

    def _undoRedo(self, action) -> None:
        self._updateRequested = False
        self._restoringPrompts = True
        try:
            action(self._promptNodes())
        finally:
            self._restoringPrompts = False
        self._updateButtons()

    def onShowIn3D(self, show) -> None:
        if self._parameterNode and self._parameterNode.segmentation:
            self.logic.show_in_3d(self._parameterNode.segmentation, show)

    # ------------------------------------------------------------------ timer: results and jobs
    def onTimer(self) -> None:
        if self._job is not None:
            self._pollJob()
        if self.logic is None or self._parameterNode is None:
            return
        if self._updateRequested and self.logic.model is not None:
            self._updateRequested = False
            self._sendRequest()
        result = self.logic.poll()
        if result.state == "running":
            return
        self.ui.predictionProgressBar.visible = False
        if result.state == "applied":
            notes = "<br>".join(result.notes)
            self.ui.resultInfoLabel.text = result.message + (f"<br><small>{notes}</small>" if notes else "")
            if self._parameterNode.showIn3D:
                self.logic.show_in_3d(self._parameterNode.segmentation, True)
            self._updateButtons()
        elif result.state == "error":
            self.ui.resultInfoLabel.text = f"<span style='color:#c0392b'>{result.message}</span>"

    def _updateButtons(self) -> None:
        p = self._parameterNode
        ready = self.logic.model is not None and bool(p and p.inputVolume)
        for name in ("positiveButton", "negativeButton", "boxButton", "togglePolarityButton", "segmentButton"):
            getattr(self.ui, name).enabled = ready
        self.ui.undoButton.enabled = self.logic.can_undo
        self.ui.redoButton.enabled = self.logic.can_redo
        target = self._target()
        with _SignalsBlocked(self.ui.lockSegmentButton):
            self.ui.lockSegmentButton.checked = bool(target and target.segmentation.GetSegmentation().GetSegment(target.segment_id)
                                                     and is_segment_locked(target.segmentation, target.segment_id))

    # ------------------------------------------------------------------ shortcuts
    def installShortcuts(self) -> None:
        """Shortcuts live only while the module is shown, and never act while a text field has focus."""
        self.uninstallShortcuts()
        mainWindow = slicer.util.mainWindow()
        for buttonName, keys, _text in SHORTCUTS:
            for key in keys:
                shortcut = qt.QShortcut(qt.QKeySequence(key), mainWindow)
                shortcut.connect("activated()", lambda name=buttonName: self._onShortcut(name))
                self._shortcuts.append(shortcut)

    def uninstallShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
        self._shortcuts = []

    def _onShortcut(self, buttonName) -> None:
        focus = qt.QApplication.focusWidget()
        if focus is not None and any(focus.inherits(name) for name in TEXT_INPUT_CLASSES):
            return  # typing in a text field: the key is text, not a command
        button = getattr(self.ui, buttonName)
        if button.enabled:
            button.click()


class _SignalsBlocked:
    def __init__(self, widget):
        self.widget = widget

    def __enter__(self):
        self.was = self.widget.blockSignals(True)

    def __exit__(self, *exc):
        self.widget.blockSignals(self.was)


def _bestDevice() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _installer():
    def pytorchUtils():
        try:
            import PyTorchUtils
        except ImportError:
            return None
        return PyTorchUtils.PyTorchUtilsLogic()

    return dependencies.DependencyInstaller(qt.QSettings(), pytorchUtils)


#
# Logic (Slicer's module-logic wrapper around the MRML-only Logic)
#


class SAMMed3DMoEModuleLogic(ScriptedLoadableModuleLogic):
    """Slicer's ``ScriptedLoadableModuleLogic`` (parameter node) holding the one
    :class:`SAMMed3DMoELogic` of the application scene (the model and sessions are shared)."""

    _shared = None

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        if SAMMed3DMoEModuleLogic._shared is None:
            SAMMed3DMoEModuleLogic._shared = SAMMed3DMoELogic(slicer.mrmlScene)
        self.logic = SAMMed3DMoEModuleLogic._shared


#
# Self-test (runs inside Slicer: synthetic volume, tiny random-weight model, no download, CPU)
#


class SAMMed3DMoETest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_click_writes_an_undoable_segment()

    def test_click_writes_an_undoable_segment(self):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed: the module installs it on first use, with consent")
        import SAMMed3DMoESelfTest

        SAMMed3DMoESelfTest.run(slicer.mrmlScene, log=self.delayDisplay)
