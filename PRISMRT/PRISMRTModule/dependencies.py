"""The Python packages PRISMRTLib needs beyond what Slicer ships, and their installer (inside the application).

The list is ``PRISMRTLib/requirements.txt``, the one that pip reads through ``pyproject.toml`` too: the extension
ships it next to PRISMRTLib. This file only knows how each requirement is installed in Slicer:

- Slicer ships NumPy, SimpleITK, SciPy, pydicom and requests (with urllib3): left to Slicer, never pip-installed;
- torch and torchvision come from the PyTorch extension (SlicerPyTorch), which picks the build for the GPU driver;
- the rest with pip (``slicer.packaging`` where this Slicer has it, else ``slicer.util.pip_install``), after
  PyTorch and with the installed torch pinned, so that pip never replaces it with another build.

``installPythonPackages`` asks once for all that is missing. ``slicer`` is imported only where the installers use it,
so the list can be read (and tested) without Slicer.
"""

import importlib
import importlib.util
import inspect
import logging
import os
import re
import tempfile
from typing import NamedTuple

from .library import ensurePRISMRTLibOnPath, prismrtError

REQUIREMENTS_FILE_NAME = "requirements.txt"

# How each requirement gets into Slicer's Python (by canonical name; the rest: pip).
SLICER_SHIPS = frozenset({"numpy", "simpleitk", "scipy", "pydicom", "requests", "urllib3"})
PYTORCH_EXTENSION = ("torch", "torchvision")
# Top-level import name where it is not the distribution name with "-" and "." as "_" (canonical name -> import).
IMPORT_NAMES = {
    "open-clip-torch": "open_clip",
    "itk-elastix": "itk",
}

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def canonicalName(name: str) -> str:
    """PEP 503 normalised distribution name: ``open_clip_torch`` -> ``open-clip-torch``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def importName(name: str) -> str:
    """The top-level module a distribution provides: ``open_clip_torch`` -> ``open_clip``, ``SimpleITK`` ->
    ``SimpleITK``, ``segment-anything`` -> ``segment_anything``."""
    return IMPORT_NAMES.get(canonicalName(name), re.sub(r"[-.]", "_", name))


class PythonRequirement(NamedTuple):
    requirement: str  # as written in the file, e.g. "open_clip_torch>=2.24" (what pip gets)
    name: str  # distribution name as written: "open_clip_torch"
    importName: str  # "open_clip"
    specifier: str  # version part without the marker: ">=2.24"
    marker: str  # environment marker after ";", or ""
    installer: str  # "slicer" (Slicer ships it), "pytorch" (the PyTorch extension) or "pip"


def parseRequirement(line: str) -> PythonRequirement:
    """One line of the requirement file (a PEP 508 requirement without a URL)."""
    match = _NAME.match(line)
    if match is None:
        raise ValueError(f"not a requirement: {line!r}")
    name = match.group(0)
    rest, _sep, marker = line[match.end():].partition(";")
    specifier = re.sub(r"^\s*\[[^\]]*\]", "", rest).strip()  # extras are pip's business
    if not re.fullmatch(r"[\s<>=!~.,*+0-9A-Za-z]*", specifier) or "#" in marker:
        raise ValueError(f"unsupported requirement {line!r}: a name, a version specifier and a marker only (no URL; "
                         "a comment goes on its own line)")
    canonical = canonicalName(name)
    installer = "slicer" if canonical in SLICER_SHIPS else "pytorch" if canonical in PYTORCH_EXTENSION else "pip"
    return PythonRequirement(line, name, importName(name), re.sub(r"\s+", "", specifier), marker.strip(), installer)


def requirementsFile() -> str:
    """Path of ``requirements.txt`` in the PRISMRTLib package (found, not imported)."""
    ensurePRISMRTLibOnPath()
    spec = importlib.util.find_spec("PRISMRTLib")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, REQUIREMENTS_FILE_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"PRISMRTLib/{REQUIREMENTS_FILE_NAME} is missing: reinstall the PRISM-RT extension")


def readRequirements(path: str = None) -> tuple:
    """The requirements of the file, in its order. Comments go on their own lines; pip options are refused (setuptools
    and ``slicer.packaging.load_requirements`` read the same file)."""
    path = path or requirementsFile()
    requirements = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("-"):
                raise ValueError(f"{path}:{number}: pip options are not allowed here: {line!r}")
            try:
                requirements.append(parseRequirement(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return tuple(requirements)


try:
    REQUIREMENTS, _READ_ERROR = readRequirements(), None
except OSError as error:  # a broken installation: the module still loads, and the installer says what is wrong
    logging.error(f"PRISM-RT cannot read its requirement list: {error}")
    REQUIREMENTS, _READ_ERROR = (), error
# (import name, pip requirement) of what pip installs inside Slicer
PYTHON_REQUIREMENTS = tuple((r.importName, r.requirement) for r in REQUIREMENTS if r.installer == "pip")
# (import name, requirement) of torch and torchvision, installed through the PyTorch extension
TORCH_REQUIREMENTS = tuple((r.importName, r.requirement) for r in REQUIREMENTS if r.installer == "pytorch")
_SPECIFIERS = {canonicalName(r.name): r.specifier for r in REQUIREMENTS}
TORCH_VERSION_REQUIREMENT = _SPECIFIERS.get("torch", "")
TORCHVISION_VERSION_REQUIREMENT = _SPECIFIERS.get("torchvision", "")


def _(text):
    try:
        from slicer.i18n import tr
    except ImportError:  # slicer-core (no application): no translations
        return text
    return tr(text)


def _applies(requirement: str) -> bool:
    """False when the requirement's environment marker excludes this Python (needs ``packaging``, which Slicer has)."""
    _name, _sep, marker = requirement.partition(";")
    if not marker.strip():
        return True
    try:
        from packaging.markers import Marker
    except ImportError:
        return True
    return Marker(marker.strip()).evaluate()


def _missing(pairs) -> list:
    return [requirement for moduleName, requirement in pairs
            if _applies(requirement) and importlib.util.find_spec(moduleName) is None]


def missingPythonPackages() -> list:
    """Pip requirements of PRISMRTLib that are not installed in this Python environment."""
    return _missing(PYTHON_REQUIREMENTS)


def missingTorchPackages() -> list:
    """torch and torchvision requirements that are not installed (the PyTorch extension installs them)."""
    return _missing(TORCH_REQUIREMENTS)


def _pyTorchUtilsLogic():
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise prismrtError(
            "PRISM-RT needs the 'PyTorch' extension: install it in the Extensions Manager, restart Slicer "
            "and try again."
        ) from None
    return PyTorchUtils.PyTorchUtilsLogic()


def installPythonPackages(askConfirmation: bool = True) -> bool:
    """Install all that PRISMRTLib misses, after one confirmation: PyTorch through the PyTorch extension first, then
    the rest with pip.

    Returns True when everything is installed, False when the user declined.
    """
    import slicer

    if _READ_ERROR is not None:
        raise RuntimeError(f"PRISM-RT cannot tell which Python packages it needs ({_READ_ERROR}): reinstall the "
                           "PRISM-RT extension.")
    missing = missingPythonPackages()
    torchMissing = missingTorchPackages()
    if not missing and not torchMissing:
        return True
    if torchMissing:
        _pyTorchUtilsLogic()  # says what to do before asking, when the extension is not there
    if askConfirmation:
        lines = [f"- {requirement}" for requirement in missing]
        if torchMissing:
            lines.insert(0, _("- PyTorch ({packages}), through the PyTorch extension").format(
                packages=", ".join(torchMissing)))
        if not slicer.util.confirmOkCancelDisplay(
            _("PRISM-RT needs these Python packages, which are not installed yet:\n{packages}\n\n"
              "Install them now? This needs a network connection and may take a few minutes.").format(
                packages="\n".join(lines)),
            windowTitle=_("PRISM-RT: install Python packages"),
        ):
            logging.info("PRISM-RT: installation of Python packages declined by the user")
            return False
    if torchMissing:
        installTorch(askConfirmation=False)  # before pip: timm and open_clip would bring PyPI's torch otherwise
    if missing:
        _pipInstall(missing)
    importlib.invalidate_caches()
    stillMissing = missingPythonPackages()
    if stillMissing:
        raise RuntimeError(f"pip did not install {', '.join(stillMissing)}; see the Python console for its output.")
    return True


def _slicerPackaging():
    """Slicer's ``slicer.packaging`` (Slicer 5.12 and later), or None on older Slicer versions."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def _installedTorchPins() -> list:
    """``torch==<installed version>`` (and torchvision's), so that pip keeps the PyTorch extension's build."""
    import importlib.metadata

    pins = []
    for name in PYTORCH_EXTENSION:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def _pipInstall(requirements: list) -> None:
    import slicer

    with tempfile.TemporaryDirectory(prefix="prismrt-") as folder:
        constraints = None
        pins = _installedTorchPins()
        if pins:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as f:
                f.write("\n".join(pins) + "\n")
        packaging = _slicerPackaging()
        if packaging is not None:
            # the user has already confirmed (ours is the one question); this is not a test run's choice to skip
            packaging.pip_ensure(list(requirements), constraints=constraints, prompt_install=False,
                                 requester="PRISM-RT", skip_in_testing=False)
        else:
            slicer.util.pip_install(list(requirements) + (["-c", constraints] if constraints else []))


def installTorch(askConfirmation: bool = True):
    """Return the ``torch`` module, installing PyTorch through the PyTorch extension if needed.

    Raises a PrismRTError that says what to do when the extension is missing or the user declines.
    """
    torchLogic = _pyTorchUtilsLogic()
    if torchLogic.torchInstalled() and not missingTorchPackages():
        return torchLogic.torch
    options = {"askConfirmation": askConfirmation, "torchVersionRequirement": TORCH_VERSION_REQUIREMENT}
    try:
        if "torchvisionVersionRequirement" in inspect.signature(torchLogic.installTorch).parameters:
            options["torchvisionVersionRequirement"] = TORCHVISION_VERSION_REQUIREMENT
    except (TypeError, ValueError):  # no signature to read: the options every version has
        pass
    torch = torchLogic.installTorch(**options)
    if torch is None:
        raise prismrtError(
            "PyTorch was not installed, so the AI tools cannot run: install it in the 'PyTorch Utils' module "
            f"(version {TORCH_VERSION_REQUIREMENT}) and try again."
        )
    return torch
