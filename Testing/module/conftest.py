"""Fixtures for testing the Slicer module without the Slicer application.

The module's own code (``PRISMRT/PRISMRTModule``, MRML only) runs against slicer-core (the MRML library of Slicer,
without Qt); its .ui files are loaded by PySide6. ``PRISMRT/PRISMRT.py`` itself (module, widget, self-test) needs
the application; ``test_module_logic`` loads it once with stand-ins for Slicer's GUI base classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "PRISMRT"
MODULE_FILE = MODULE_DIR / "PRISMRT.py"
UI_DIR = MODULE_DIR / "Resources" / "UI"
UI_FILE = UI_DIR / "PRISMRT.ui"
SCREENSHOT_DIR = Path(__file__).resolve().parent / "screenshots"

# PRISMRTLib from the source tree, and the module's package as Slicer puts it on the path (next to PRISMRT.py).
for path in (REPO, MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def import_slicer_core():
    """``import slicer`` from slicer-core, or skip (another PyPI package, unrelated, is also named slicer)."""
    from prismrt_testing import slicer_core_or_skip

    return slicer_core_or_skip()


@pytest.fixture
def scene():
    slicer = import_slicer_core()
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)
