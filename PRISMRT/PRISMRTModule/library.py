"""PRISMRTLib, imported on first use: never when Slicer loads the module, so the module loads even when a
dependency of PRISMRTLib is not installed yet (the panel installs them on first use)."""

import importlib
import importlib.util
import os
import sys


def ensurePRISMRTLibOnPath() -> None:
    """Make PRISMRTLib importable when the module runs from a source tree.

    An installed extension has PRISMRTLib next to PRISMRT.py (a module path, hence on sys.path). In the repository
    it lives two levels up from this file, at ``PRISMRT/../PRISMRTLib``.
    """
    if importlib.util.find_spec("PRISMRTLib") is not None:
        return
    sourceRoot = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(sourceRoot, "PRISMRTLib", "__init__.py")) and sourceRoot not in sys.path:
        sys.path.append(sourceRoot)


def importPRISMRTLib(name: str = "PRISMRTLib"):
    """Import PRISMRTLib or one of its submodules (e.g. ``"PRISMRTLib.imaging"``)."""
    ensurePRISMRTLibOnPath()
    return importlib.import_module(name)


def invalidImage(message: str) -> Exception:
    """PRISMRTLib's user-facing error for an image that cannot be used."""
    return importPRISMRTLib("PRISMRTLib.errors").InvalidImageError(message)


def prismrtError(message: str) -> Exception:
    """PRISMRTLib's user-facing error (one line that says what to do)."""
    return importPRISMRTLib("PRISMRTLib.errors").PrismRTError(message)
