"""The module's Qt Designer files, loaded offscreen by PySide6: the panel (PRISMRT/Resources/UI/PRISMRT.ui) and one
per task section (PRISMRTDelineation.ui).

Slicer's loader knows the CTK and MRML widgets (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget); PySide6's
does not, so small stand-ins with the same class names and properties are registered. With PRISMRT_SCREENSHOTS=1 the
panel is also rendered to docs/images/ (stand-ins drawn as plain Qt widgets).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

QtCore = pytest.importorskip("PySide6.QtCore", reason="PySide6 is not installed (pip install PySide6-Essentials)")
QtGui = pytest.importorskip("PySide6.QtGui", reason="PySide6 is not installed (pip install PySide6-Essentials)")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed (pip install PySide6-Essentials)")
QtUiTools = pytest.importorskip("PySide6.QtUiTools", reason="PySide6 has no QtUiTools (pip install PySide6-Essentials)")

Property, Signal, Slot = QtCore.Property, QtCore.Signal, QtCore.Slot

REPO = Path(__file__).resolve().parents[2]
UI_DIR = REPO / "PRISMRT" / "Resources" / "UI"
MODULE_DIR = REPO / "PRISMRT"
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "docs" / "images"

# Each .ui: the code that uses it (self.ui.<name>), and the names and Qt classes that code relies on.
PANELS = {
    "PRISMRT.ui": {
        "top": "PRISMRT",
        "code": [MODULE_DIR / "PRISMRT.py"],
        "widgets": {
            "inputSelector": "qMRMLNodeComboBox",
            "checkButton": "QPushButton",
            "checkResultText": "QPlainTextEdit",
            "windowPresetComboBox": "QComboBox",
        },
        "scene_to": "inputSelector",
    },
    "PRISMRTDelineation.ui": {
        "top": "PRISMRTDelineation",
        "code": [MODULE_DIR / "PRISMRTModule" / "delineationSection.py"],
        "widgets": {
            "delineationBackendComboBox": "QComboBox",
            "outputSegmentationSelector": "qMRMLNodeComboBox",
            "segmentNameLineEdit": "QLineEdit",
            "startDelineationButton": "QPushButton",
            "positivePointButton": "QPushButton",
            "negativePointButton": "QPushButton",
            "boxButton": "QPushButton",
            "propagateButton": "QPushButton",
            "undoButton": "QPushButton",
            "redoButton": "QPushButton",
            "jobProgressBar": "QProgressBar",
            "cancelJobButton": "QPushButton",
            "delineationStatusLabel": "QLabel",
        },
        "scene_to": "outputSegmentationSelector",
    },
    "PRISMRTRegistration.ui": {
        "top": "PRISMRTRegistration",
        "code": [MODULE_DIR / "PRISMRTModule" / "registrationSection.py"],
        "widgets": {
            "fixedVolumeSelector": "qMRMLNodeComboBox",
            "movingVolumeSelector": "qMRMLNodeComboBox",
            "fixedMaskSelector": "qMRMLNodeComboBox",
            "fixedSegmentationSelector": "qMRMLNodeComboBox",
            "movingSegmentationSelector": "qMRMLNodeComboBox",
            "registrationMethodComboBox": "QComboBox",
            "methodStatusLabel": "QLabel",
            "smoothnessSlider": "QSlider",
            "smoothnessSpinBox": "QDoubleSpinBox",
            "smoothnessHintLabel": "QLabel",
            "inverseConsistencyCheckBox": "QCheckBox",
            "multimodalCheckBox": "QCheckBox",
            "runRegistrationButton": "QPushButton",
            "cancelRegistrationButton": "QPushButton",
            "registrationProgressBar": "QProgressBar",
            "registrationStatusLabel": "QLabel",
            "showFusionButton": "QPushButton",
            "showCheckerboardButton": "QPushButton",
            "showJacobianButton": "QPushButton",
            "showQATableButton": "QPushButton",
        },
        "scene_to": "fixedVolumeSelector",
    },
    "PRISMRTChat.ui": {
        "top": "PRISMRTChat",
        "code": [MODULE_DIR / "PRISMRTModule" / "chatSection.py"],
        "widgets": {
            "chatVolumeSelector": "qMRMLNodeComboBox",
            "chatContextLabel": "QLabel",
            "chatHistoryBrowser": "QTextBrowser",
            "chatQuestionLineEdit": "QLineEdit",
            "askButton": "QPushButton",
            "chatProgressBar": "QProgressBar",
            "cancelAskButton": "QPushButton",
            "chatStatusLabel": "QLabel",
            "clearChatButton": "QPushButton",
        },
        "scene_to": "chatVolumeSelector",
    },
}


# --- stand-ins for Slicer's custom widgets (class names must match the .ui) ----------------------------------


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - the .ui's class name
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self):
        return self.title()

    def _set_text(self, text):
        self.setTitle(text)

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, collapsed):
        self._collapsed = bool(collapsed)

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    def __init__(self, parent=None):
        super().__init__(parent)
        self._node_types = []
        self._flags = {}
        self.scene = None

    def _get_node_types(self):
        return self._node_types

    def _set_node_types(self, types):
        self._node_types = list(types)

    def _flag(name):  # noqa: N805 - property factory used in the class body
        return Property(bool, lambda self: self._flags.get(name, False),
                        lambda self, value: self._flags.__setitem__(name, bool(value)))

    nodeTypes = Property("QStringList", _get_node_types, _set_node_types)
    showChildNodeTypes = _flag("showChildNodeTypes")
    noneEnabled = _flag("noneEnabled")
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    noneDisplay = Property(str, lambda self: self._flags.get("noneDisplay", ""),
                           lambda self, value: self._flags.__setitem__("noneDisplay", value))

    @Slot(object)
    def setMRMLScene(self, scene):
        self.scene = scene


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    mrmlSceneChanged = Signal(object)


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def _expected_messages(top, receiver):
    """PySide6 cannot declare a signal with Slicer's C++ argument type, so each .ui's scene connection cannot be made
    here (it is checked in the XML instead). Any other message from the loader is a defect of the .ui."""
    return ("QObject::connect: No such signal qMRMLWidget::mrmlSceneChanged(vtkMRMLScene*)",
            f"QObject::connect:  (sender name:   '{top}')",
            f"QObject::connect:  (receiver name: '{receiver}')")


def _load(name):
    loader = QtUiTools.QUiLoader()
    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):
        loader.registerCustomWidget(cls)
    messages = []
    previous = QtCore.qInstallMessageHandler(lambda mode, context, message: messages.append(message))
    try:
        ui_file = QtCore.QFile(str(UI_DIR / name))
        assert ui_file.open(QtCore.QFile.ReadOnly)
        widget = loader.load(ui_file)
        ui_file.close()
    finally:
        QtCore.qInstallMessageHandler(previous)
    assert widget is not None, loader.errorString()
    return widget, messages


@pytest.fixture(scope="module")
def loaded(app):
    """Per .ui: (widget, messages Qt printed while loading it)."""
    widgets = {name: _load(name) for name in PANELS}
    yield widgets
    for widget, _ in widgets.values():
        widget.deleteLater()


@pytest.fixture(scope="module")
def panel(loaded):
    return loaded["PRISMRT.ui"][0]


@pytest.fixture(scope="module")
def section(loaded):
    return loaded["PRISMRTDelineation.ui"][0]


@pytest.mark.parametrize("name", PANELS)
def test_ui_loads_with_the_names_and_classes_the_code_uses(loaded, name):
    widget, _ = loaded[name]
    spec = PANELS[name]
    assert widget.objectName() == spec["top"] and type(widget).__name__ == "qMRMLWidget"
    for child_name, class_name in spec["widgets"].items():
        child = widget.findChild(QtWidgets.QWidget, child_name)
        assert child is not None, f"{child_name} missing from {name}"
        assert child.metaObject().className() == class_name or type(child).__name__ == class_name


@pytest.mark.parametrize("name", PANELS)
def test_every_ui_attribute_in_the_code_exists_in_its_ui(name):
    spec = PANELS[name]
    used = set().union(*(re.findall(r"self\.ui\.(\w+)", f.read_text()) for f in spec["code"]))
    declared = {w.get("name") for w in ET.parse(UI_DIR / name).getroot().iter("widget")}
    assert used, f"{spec['code']} no longer use self.ui: update this test"
    assert used <= declared, f"the code uses widgets {name} lacks: {sorted(used - declared)}"


def test_panel_widget_settings(panel):
    selector = panel.findChild(QtWidgets.QWidget, "inputSelector")
    assert list(selector.property("nodeTypes")) == ["vtkMRMLScalarVolumeNode"]
    assert selector.property("showChildNodeTypes") is False  # label maps are not CTs
    assert selector.property("addEnabled") is False and selector.property("removeEnabled") is False
    result = panel.findChild(QtWidgets.QPlainTextEdit, "checkResultText")
    assert result.isReadOnly()
    # enabled by the module once a volume is selected / presets are loaded
    assert not panel.findChild(QtWidgets.QPushButton, "checkButton").isEnabled()
    assert not panel.findChild(QtWidgets.QComboBox, "windowPresetComboBox").isEnabled()
    titles = [b.title() for b in panel.findChildren(ctkCollapsibleButton)]
    assert titles == ["Input", "Volume check", "Display"]  # the task sections are their own .ui files


def test_delineation_section_settings(section):
    assert [b.title() for b in section.findChildren(ctkCollapsibleButton)] == ["Delineation"]
    backends = section.findChild(QtWidgets.QComboBox, "delineationBackendComboBox")
    from PRISMRTLib.features import BACKEND_CHOICES

    items = [backends.itemText(i) for i in range(backends.count())]
    assert tuple(items) == BACKEND_CHOICES and items[0] == "auto"  # the default: the best installed model
    output = section.findChild(QtWidgets.QWidget, "outputSegmentationSelector")
    assert list(output.property("nodeTypes")) == ["vtkMRMLSegmentationNode"]
    assert output.property("noneEnabled") and output.property("addEnabled") and not output.property("removeEnabled")
    for name in ("positivePointButton", "negativePointButton", "boxButton"):
        assert section.findChild(QtWidgets.QPushButton, name).isCheckable()
    for name in ("startDelineationButton", "positivePointButton", "negativePointButton", "boxButton",
                 "propagateButton", "undoButton", "redoButton"):
        assert not section.findChild(QtWidgets.QPushButton, name).isEnabled()
    # the job row shows only while a job runs
    assert section.findChild(QtWidgets.QProgressBar, "jobProgressBar").isHidden()
    assert section.findChild(QtWidgets.QPushButton, "cancelJobButton").isHidden()


@pytest.mark.parametrize("name", PANELS)
def test_ui_loads_without_unexpected_messages(loaded, name):
    _, messages = loaded[name]
    expected = _expected_messages(PANELS[name]["top"], PANELS[name]["scene_to"])
    assert [m for m in messages if m not in expected] == []


@pytest.mark.parametrize("name", PANELS)
def test_no_dynamic_properties(loaded, name):
    """A property the widget class does not have becomes a silent dynamic property: a misspelling, or a binding
    (SlicerParameterName) that nothing reads since the parameter node is bound by hand."""
    widget, _ = loaded[name]
    for child in [widget, *widget.findChildren(QtWidgets.QWidget)]:
        dynamic = {bytes(n).decode() for n in child.dynamicPropertyNames()}
        dynamic = {n for n in dynamic if not n.startswith("_")}  # PySide's own bookkeeping
        assert not dynamic, f"{child.objectName()}: unknown properties {sorted(dynamic)}"


def test_every_parameter_the_code_uses_exists_in_the_parameter_node():
    """The widgets are bound to the parameter node by hand: every parameter the code reads or writes exists."""
    from PRISMRTModule.parameters import PRISMRTParameters

    known = set(PRISMRTParameters.STRINGS) | set(PRISMRTParameters.NODES)
    code = "".join(f.read_text() for spec in PANELS.values() for f in spec["code"])
    used = set(re.findall(r"parameters\.(\w+)", code)) | set(re.findall(r'_setParameter\(\s*"(\w+)"', code))
    used -= {"node"}
    assert used and used <= known, f"unknown parameters: {sorted(used - known)}"


@pytest.mark.parametrize("name", PANELS)
def test_mrml_scene_is_passed_to_the_node_selectors(name):
    root = ET.parse(UI_DIR / name).getroot()
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in root.iter("connection")]
    spec = PANELS[name]
    assert (spec["top"], "mrmlSceneChanged(vtkMRMLScene*)", spec["scene_to"], "setMRMLScene(vtkMRMLScene*)") in \
        connections


@pytest.mark.parametrize("name", PANELS)
def test_custom_widgets_are_declared_for_slicers_loader(name):
    root = ET.parse(UI_DIR / name).getroot()
    declared = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {n for n in used if not n.startswith("Q")}
    assert custom <= {"qMRMLWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox"}
    for n in custom:
        assert declared.get(n) == f"{n}.h"


def test_the_extension_lists_every_module_file():
    """Slicer's build installs only what PRISMRT/CMakeLists.txt names: every file of the module's package and every
    .ui must be listed."""
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for path in sorted((MODULE_DIR / "PRISMRTModule").glob("*.py")):
        assert f"PRISMRTModule/{path.name}" in cmake, f"{path.name} is not in PRISMRT/CMakeLists.txt"
    for path in sorted(UI_DIR.glob("*.ui")):
        assert f"Resources/UI/{path.name}".replace("PRISMRT", "${MODULE_NAME}", 1) in cmake or \
            f"Resources/UI/{path.name}" in cmake, f"{path.name} is not in PRISMRT/CMakeLists.txt"


@pytest.mark.skipif(os.environ.get("PRISMRT_SCREENSHOTS") != "1", reason="set PRISMRT_SCREENSHOTS=1 to render")
def test_render_screenshot(panel, section):
    """Render the panel as it looks after checking the repository's sample CT (stand-in custom widgets)."""
    import sys

    sys.path.insert(0, str(REPO))
    import SimpleITK as sitk

    from PRISMRTLib.imaging import WINDOW_PRESETS, check_volume

    sample = REPO / "Testing" / "Data" / "openkbp_pt_226" / "ct.nii.gz"
    selector = panel.findChild(QtWidgets.QComboBox, "inputSelector")
    selector.addItem("openkbp_pt_226 CT")
    presets = panel.findChild(QtWidgets.QComboBox, "windowPresetComboBox")
    presets.addItems(list(WINDOW_PRESETS))
    presets.setCurrentText("head-and-neck")
    presets.setEnabled(True)
    panel.findChild(QtWidgets.QPushButton, "checkButton").setEnabled(True)
    result = panel.findChild(QtWidgets.QPlainTextEdit, "checkResultText")
    result.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.FixedFont))  # as PRISMRTWidget.setup does
    result.setPlainText(check_volume(sitk.ReadImage(str(sample))).to_text())
    section.findChild(QtWidgets.QPushButton, "startDelineationButton").setEnabled(True)  # a volume is selected
    section.findChild(QtWidgets.QComboBox, "outputSegmentationSelector").addItem("Create new on Start")

    host = QtWidgets.QWidget()  # as the module's layout holds them: the panel, then each task section
    layout = QtWidgets.QVBoxLayout(host)
    layout.addWidget(panel)
    layout.addWidget(section)
    layout.addStretch(1)
    host.resize(520, 780)
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    path = SCREENSHOT_DIR / "PRISMRT-panel-offscreen.png"
    try:
        assert host.grab().save(str(path))
    finally:  # the fixtures own the two widgets
        for widget in (panel, section):
            layout.removeWidget(widget)
            widget.setParent(None)
    assert path.stat().st_size > 1000
