"""Fixtures for testing the Slicer module (PRISMRT/PRISMRT.py) without the Slicer application.

The module's logic runs against slicer-core (the MRML library of Slicer, without Qt); its .ui is loaded by PySide6.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "PRISMRT" / "PRISMRT.py"
UI_FILE = REPO / "PRISMRT" / "Resources" / "UI" / "PRISMRT.ui"
SCREENSHOT_DIR = Path(__file__).resolve().parent / "screenshots"

# PRISMRTLib from the source tree (PRISMRT.py finds it on its own; the tests import it directly too).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def import_slicer_core():
    """``import slicer`` from slicer-core, or skip (another PyPI package, unrelated, is also named slicer)."""
    from prismrt_testing import slicer_core_or_skip

    return slicer_core_or_skip()


@pytest.fixture(scope="session")
def prismrt_module():
    """PRISMRT/PRISMRT.py loaded as a module named PRISMRT (not added to sys.modules)."""
    import_slicer_core()
    spec = importlib.util.spec_from_file_location("PRISMRT", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def logic(prismrt_module):
    return prismrt_module.PRISMRTLogic()


@pytest.fixture
def scene():
    slicer = import_slicer_core()
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)
