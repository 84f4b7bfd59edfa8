"""The Slicer module's files that cannot run here (the Qt GUI needs the Slicer application):
the .ui file, the Widget's use of it, the parameter node's bindings, the shortcuts, the extension
CMake files, the Extensions Index entry and the icon. Read as files and parsed, not executed.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "SAMMed3DMoE"
MODULE_FILE = MODULE_DIR / "SAMMed3DMoE.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAMMed3DMoE.ui"


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()  # fails on malformed XML


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _widgets(ui):
    return {w.get("name"): w for w in ui.iter("widget")}


def _class_node(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _shortcuts(tree):
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SHORTCUTS")
    return ast.literal_eval(node.value)


def test_ui_is_well_formed_with_unique_object_names(ui):
    assert ui.tag == "ui" and ui.find("class").text == "SAMMed3DMoE"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "SAMMed3DMoE"
    names = [e.get("name") for e in ui.iter() if e.tag in ("widget", "layout", "spacer")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, duplicates
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared
    receivers = {c.find("receiver").text for c in ui.iter("connection") if c.find("signal").text.startswith("mrmlSceneChanged")}
    assert {n for n, w in _widgets(ui).items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")} <= receivers


def test_every_widget_the_module_uses_is_in_the_ui(ui, module_tree):
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    used |= {button for button, _keys, _text in _shortcuts(module_tree)}
    used |= {c.value for c in ast.walk(module_tree) if isinstance(c, ast.Constant) and isinstance(c.value, str)
             and re.fullmatch(r"[a-z]\w*(Button|CheckBox|ComboBox|Label|LineEdit|Selector|SliderWidget|ProgressBar)", c.value)}
    missing = sorted(used - set(_widgets(ui)))
    assert not missing, f"used by SAMMed3DMoE.py but not in the .ui: {missing}"
    assert len(used) > 25


# parameterNodeWrapper's GUI connectors: which widget class can show which field type
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "str_choice": {"QComboBox"},
    "str": {"QLineEdit"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "node": {"qMRMLNodeComboBox"},
}


def _field_kinds(tree):
    kinds = {}
    for stmt in _class_node(tree, "SAMMed3DMoEParameterNode").body:
        if isinstance(stmt, ast.AnnAssign):
            text = ast.unparse(stmt.annotation)
            if text.startswith("vtkMRML"):
                kind = "node"
            elif "Choice" in text:
                kind = "str_choice"
            else:
                kind = re.sub(r"Annotated\[(\w+).*", r"\1", text)
            kinds[stmt.target.id] = kind
    return kinds


def test_parameter_names_in_the_ui_are_fields_with_a_matching_widget(ui, module_tree):
    kinds = _field_kinds(module_tree)
    bound = {}
    for w in ui.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert bound, "no widget is bound to the parameter node"
    for name, widget_class in bound.items():
        assert name in kinds, f"{name} is not a field of SAMMed3DMoEParameterNode"
        assert widget_class in CONNECTABLE[kinds[name]], f"{name} ({kinds[name]}) cannot be shown by a {widget_class}"
    assert {"inputVolume", "device", "tau", "autoUpdate", "showIn3D"} <= set(bound)


def test_shortcuts_are_unique_and_on_the_tooltips(module_tree):
    shortcuts = _shortcuts(module_tree)
    keys = [k for _b, ks, _t in shortcuts for k in ks]
    assert len(keys) == len(set(keys)), keys
    buttons = [b for b, _k, _t in shortcuts]
    assert len(buttons) == len(set(buttons))
    source = MODULE_FILE.read_text(encoding="utf-8")
    # tooltips are written from the same table, so each names its key(s)
    assert "getattr(self.ui, buttonName).toolTip = f\"{text} ({' or '.join(keys)})\"" in source
    # installed on enter, removed on exit, and inert while a text field has focus
    widget = _class_node(module_tree, "SAMMed3DMoEWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "self.installShortcuts()" in methods["enter"] and "self.uninstallShortcuts()" in methods["exit"]
    assert "TEXT_INPUT_CLASSES" in methods["_onShortcut"]
    for action in ("positiveButton", "negativeButton", "togglePolarityButton", "boxButton", "clearButton",
                   "undoButton", "redoButton", "newSegmentButton", "acceptNextButton", "showIn3DCheckBox"):
        assert action in buttons


def test_module_file_imports_no_engine_or_torch_at_load_time(module_tree):
    """Slicer imports every module at startup: before the first-run install there is no torch."""
    top = []
    for node in module_tree.body:
        if isinstance(node, ast.Import):
            top += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append(node.module)
    assert not [n for n in top if n.startswith(("torch", "SAMMed3DMoELib"))], top
    for path in list(MODULE_DIR.glob("*.py")) + list(MODULE_DIR.glob("SAMMed3DMoELogic/*.py")):
        if path == MODULE_FILE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith(("torch", "SAMMed3DMoELib", "qt", "ctk"))], (path.name, names)


def test_extension_cmake_builds_the_module_and_installs_the_engine_beside_it():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and 'set(EXTENSION_CATEGORY "Segmentation")' in top
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(SAMMed3DMoE)" in top
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in top and "Slicer_EXTENSION_CPACK" in top
    icon_url = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"', top).group(1)
    assert icon_url.endswith("/SAMMed3DMoE/Resources/Icons/SAMMed3DMoE.png")

    module = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    listed = {"SAMMed3DMoE" + s for s in re.findall(r"\$\{MODULE_NAME\}([\w/]*\.py)", module)}
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py")}
    assert listed == on_disk
    for resource in re.findall(r"(Resources/\S+)", module):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "SAMMed3DMoE")).is_file(), resource
    assert "SAMMed3DMoELib/*.py" in module and "SAMMed3DMoELib/catalog.json" in module
    assert (REPO / "SAMMed3DMoELib" / "catalog.json").is_file()


SCHEMA_V102 = {  # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (properties, types)
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool, "tier": int,
}


def test_extensions_index_entry_follows_schema_v1_0_2():
    entry = json.loads((REPO / "SAMMed3DMoE.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert {"$schema", "category", "scm_url"} <= set(entry)
    for key, value in entry.items():
        assert key in SCHEMA_V102, f"{key} is not allowed (additionalProperties: false)"
        assert isinstance(value, SCHEMA_V102[key]), key
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert 1 <= entry["tier"] <= 5 and entry["scm_url"].endswith(".git") and entry["scm_revision"]


def test_icon_is_a_128_pixel_png():
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "SAMMed3DMoE.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
