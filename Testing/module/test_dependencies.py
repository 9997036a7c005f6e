"""One requirement list, ``PRISMRTLib/requirements.txt``, for pip (through pyproject.toml) and for the Slicer module's
installer (``PRISMRTModule.dependencies``): it covers every import of PRISMRTLib and has no stale entry, and the
installer asks once for everything missing, PyTorch through the PyTorch extension and never through pip.

The list checks need no Slicer (``dependencies`` imports ``slicer`` only in its installers); the installer tests run
against slicer-core with the GUI and pip replaced by stand-ins.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import types
import warnings
from pathlib import Path

import pytest

from PRISMRTModule import dependencies

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "PRISMRTLib"
REQUIREMENTS_FILE = LIB / "requirements.txt"
PYPROJECT = REPO / "pyproject.toml"

# Listed but not imported by PRISMRTLib, and why (canonical name -> reason).
NOT_IMPORTED = {
    "torchvision": "timm and open_clip import it; listed so that pip and the PyTorch extension install the build that "
                   "matches torch",
}
# Extras of pyproject.toml that are not features of PRISM-RT (their packages are not imported by PRISMRTLib).
DEVELOPMENT_EXTRAS = {"test", "slicer-test"}
_IMPORT_FUNCTIONS = {"import_module", "find_spec", "__import__"}


# ---- what PRISMRTLib imports ----------------------------------------------------------------------------------------
def _module_level_nodes(tree: ast.Module) -> set:
    """ids of the nodes that run when the module is imported (everything outside function bodies)."""
    found, stack = set(), list(tree.body)
    while stack:
        node = stack.pop()
        found.add(id(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack += node.decorator_list if not isinstance(node, ast.Lambda) else []
            continue
        stack += list(ast.iter_child_nodes(node))
    return found


def _imported_modules(node: ast.AST) -> list:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.level == 0 and node.module else []  # relative: PRISMRTLib itself
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in _IMPORT_FUNCTIONS:  # importlib.import_module("x"), importlib.util.find_spec("x"), __import__("x")
            return [node.args[0].value]
    return []


def third_party_imports() -> dict:
    """Top-level names PRISMRTLib imports, beyond the standard library and itself: name -> {"file:line": runs when
    the module is imported}. Absolute imports anywhere (functions included) and constant names given to
    ``import_module`` / ``find_spec``."""
    uses: dict = {}
    for path in sorted(LIB.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        moduleLevel = _module_level_nodes(tree)
        for node in ast.walk(tree):
            for module in _imported_modules(node):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "PRISMRTLib":
                    continue
                uses.setdefault(top, {})[f"{path.relative_to(REPO).as_posix()}:{node.lineno}"] = \
                    id(node) in moduleLevel
    return uses


def optional_requirements() -> dict:
    """import name -> (extra, requirement) of the optional features' extras in pyproject.toml."""
    extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"].get("optional-dependencies", {})
    found = {}
    for extra, requirements in extras.items():
        if extra in DEVELOPMENT_EXTRAS:
            continue
        for requirement in requirements:
            found[dependencies.parseRequirement(requirement).importName] = (extra, requirement)
    return found


def _where(uses: dict) -> str:
    places = sorted(uses)
    return ", ".join(places[:4]) + (f" and {len(places) - 4} more" if len(places) > 4 else "")


# ---- the list against the imports -----------------------------------------------------------------------------------
def test_the_scan_sees_imports_inside_functions():
    uses = third_party_imports()
    assert "torch" in uses and "numpy" in uses
    assert not any(uses["transformers"].values()), "transformers is imported inside functions only"
    assert "json" not in uses and "PRISMRTLib" not in uses


def test_requirement_list_covers_every_import():
    listed = {r.importName for r in dependencies.REQUIREMENTS}
    optional = optional_requirements()
    uncovered = {name: uses for name, uses in third_party_imports().items() if name not in listed | set(optional)}
    assert not uncovered, "PRISMRTLib imports modules that no requirement provides:\n" + "\n".join(
        f"  {name} ({_where(uses)}): add its distribution to PRISMRTLib/requirements.txt, and map it in "
        "PRISMRTModule/dependencies.py IMPORT_NAMES if it is imported under another name" for name, uses in
        sorted(uncovered.items()))


def test_optional_features_import_their_packages_on_use():
    """An extra's package (matplotlib for ``prismrt overview``) is imported only where the feature runs, so that
    PRISMRTLib imports without it."""
    listed = {r.importName for r in dependencies.REQUIREMENTS}
    eager = {}
    for name, uses in third_party_imports().items():
        if name in optional_requirements() and name not in listed:
            places = [place for place, moduleLevel in uses.items() if moduleLevel]
            if places:
                eager[name] = places
    assert not eager, "packages of optional extras imported when a module of PRISMRTLib is imported (move the " \
                      f"import into the function that needs it, or list the package in requirements.txt): {eager}"


def test_every_listed_requirement_is_imported():
    imported = third_party_imports()
    stale = [r.requirement for r in dependencies.REQUIREMENTS
             if r.importName not in imported and dependencies.canonicalName(r.name) not in NOT_IMPORTED]
    assert not stale, (f"PRISMRTLib/requirements.txt lists {', '.join(stale)}, which PRISMRTLib never imports: remove "
                       "each, or say in NOT_IMPORTED of this test why it is needed anyway")
    listed = {dependencies.canonicalName(r.name): r for r in dependencies.REQUIREMENTS}
    for name in NOT_IMPORTED:
        assert name in listed, f"NOT_IMPORTED names {name}, which requirements.txt does not list"
        assert listed[name].importName not in imported, f"{name} is imported now: drop it from NOT_IMPORTED"


def test_import_names_match_the_installed_distributions():
    """Where a listed distribution is installed here, it really provides the module the mapping says."""
    provided = importlib.metadata.packages_distributions()
    checked = 0
    for r in dependencies.REQUIREMENTS:
        try:
            importlib.metadata.distribution(r.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        canonical = dependencies.canonicalName
        modules = sorted(m for m, names in provided.items() if canonical(r.name) in map(canonical, names))
        assert r.importName in modules, (f"{r.name} does not provide a top-level module '{r.importName}' (it "
                                         f"provides {modules}): fix IMPORT_NAMES in PRISMRTModule/dependencies.py")
        checked += 1
    if checked == 0:
        pytest.skip("none of the listed distributions is installed here")


# ---- one list: the file, the module's parse and pyproject.toml ------------------------------------------------------
def _file_lines() -> list:
    lines = (line.strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_module_reads_the_file_next_to_prismrtlib():
    assert Path(dependencies.requirementsFile()).samefile(REQUIREMENTS_FILE)
    assert [r.requirement for r in dependencies.REQUIREMENTS] == _file_lines()


def test_file_is_what_pip_and_slicer_packaging_accept():
    """Each line is one PEP 508 requirement (what setuptools and ``slicer.packaging.load_requirements`` parse), and
    the module's reading of it agrees with ``packaging``'s."""
    packaging_requirements = pytest.importorskip("packaging.requirements")
    for line, parsed in zip(_file_lines(), dependencies.REQUIREMENTS):
        requirement = packaging_requirements.Requirement(line)  # raises on a trailing comment or a pip option
        assert dependencies.canonicalName(requirement.name) == dependencies.canonicalName(parsed.name)
        assert str(requirement.specifier) == str(packaging_requirements.Requirement(f"x{parsed.specifier}").specifier)
        assert (str(requirement.marker) if requirement.marker else "") == parsed.marker.replace("'", '"')


def test_pyproject_declares_the_file_as_its_dependencies():
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    project, setuptools_table = pyproject["project"], pyproject["tool"]["setuptools"]
    assert "dependencies" in project["dynamic"] and "dependencies" not in project, \
        "pyproject.toml must take its dependencies from PRISMRTLib/requirements.txt, not list them again"
    files = setuptools_table["dynamic"]["dependencies"]["file"]
    assert len(files) == 1 and (REPO / files[0]).samefile(dependencies.requirementsFile())
    assert "requirements.txt" in setuptools_table["package-data"]["PRISMRTLib"], \
        "the wheel must carry requirements.txt too: the module's installer reads it next to PRISMRTLib"


def test_setuptools_reads_the_same_list():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' notes on its own features are not this test's business
        configuration = pyprojecttoml.read_configuration(str(PYPROJECT), expand=True)
    assert configuration["project"]["dependencies"] == _file_lines()


def test_installed_metadata_matches_when_installed_from_this_checkout():
    # the installed one (a build's prismrt.egg-info at the top of the checkout is on sys.path here too)
    installed = [d for d in importlib.metadata.distributions(name="prismrt")
                 if f'"{REPO.as_uri()}"' in (d.read_text("direct_url.json") or "")]
    if not installed:
        pytest.skip("prismrt is not installed from this checkout")
    distribution = installed[0]
    runtime = [r for r in distribution.requires or [] if "extra ==" not in r]
    assert runtime == _file_lines(), ("the installed metadata is older than PRISMRTLib/requirements.txt: reinstall "
                                      "(make env, or pip install -c constraints.txt -e '.[report,test,slicer-test]')")


def test_installers_are_chosen_from_the_list():
    by_name = {dependencies.canonicalName(r.name): r for r in dependencies.REQUIREMENTS}
    for name in dependencies.SLICER_SHIPS | set(dependencies.PYTORCH_EXTENSION):
        assert name in by_name, f"dependencies.py names {name}, which PRISMRTLib/requirements.txt does not list"
    extras = {dependencies.canonicalName(dependencies.parseRequirement(r).name)
              for _extra, r in optional_requirements().values()}
    for name in dependencies.IMPORT_NAMES:  # an import name is known for what is installed: listed or an extra
        assert name in set(by_name) | extras, \
            f"dependencies.py names {name}, which neither requirements.txt nor an extra of pyproject.toml lists"
    pip = [requirement for _module, requirement in dependencies.PYTHON_REQUIREMENTS]
    assert pip == [r.requirement for r in dependencies.REQUIREMENTS if r.installer == "pip"]
    assert not {"numpy", "simpleitk", "torch", "torchvision"} & {dependencies.canonicalName(
        dependencies.parseRequirement(r).name) for r in pip}, "Slicer's own packages and PyTorch are never pip's"
    assert dict(dependencies.PYTHON_REQUIREMENTS)["open_clip"] == by_name["open-clip-torch"].requirement
    assert [module for module, _r in dependencies.TORCH_REQUIREMENTS] == ["torch", "torchvision"]
    assert dependencies.TORCH_VERSION_REQUIREMENT == by_name["torch"].specifier
    assert dependencies.TORCHVISION_VERSION_REQUIREMENT == by_name["torchvision"].specifier


@pytest.mark.parametrize("line", ["numpy>=1.24  # a trailing comment", "foo @ https://example.org/foo.whl",
                                  "-r other.txt"])
def test_lines_the_other_readers_would_refuse_are_refused(tmp_path, line):
    path = tmp_path / "requirements.txt"
    path.write_text(f"# fine\nnumpy>=1.24\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"requirements.txt:3"):
        dependencies.readRequirements(str(path))


# ---- the installer: one question, PyTorch through its extension -----------------------------------------------------
FAKE_PIP = {"timm>=1.0": "prismrt_fake_timm", "tqdm>=4.60": "prismrt_fake_tqdm"}
FAKE_TORCH = {"torch>=2.1": "prismrt_fake_torch", "torchvision>=0.16": "prismrt_fake_torchvision"}


class Installer:
    """slicer.util's dialog and pip, and the PyTorch extension, replaced by stand-ins that record the calls and
    "install" a requirement by writing its (fake) module into a folder on sys.path."""

    def __init__(self, monkeypatch, site: Path, answer: bool = True, torch_extension: bool = True):
        slicer = _slicer_core()
        self.site, self.answer, self.calls = site, answer, []
        site.mkdir()
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setattr(dependencies, "PYTHON_REQUIREMENTS", tuple((m, r) for r, m in FAKE_PIP.items()))
        monkeypatch.setattr(dependencies, "TORCH_REQUIREMENTS", tuple((m, r) for r, m in FAKE_TORCH.items()))
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", self.confirm)
        monkeypatch.setattr(slicer.util, "pip_install", self.pip_install)
        monkeypatch.setattr(dependencies, "_slicerPackaging", lambda: None)  # a Slicer before slicer.packaging
        if torch_extension:
            monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=self.torch_logic))
        else:
            monkeypatch.delitem(sys.modules, "PyTorchUtils", raising=False)

    def install(self, requirement: str) -> None:
        (self.site / f"{ {**FAKE_PIP, **FAKE_TORCH}[requirement]}.py").write_text("", encoding="utf-8")

    def confirm(self, text, windowTitle=None, **kwargs):
        self.calls.append(("confirm", text))
        return self.answer

    def pip_install(self, args):
        constraints = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8") if "-c" in args else ""
        requirements = [a for i, a in enumerate(args) if a != "-c" and (i == 0 or args[i - 1] != "-c")]
        self.calls.append(("pip", requirements, constraints))
        for requirement in requirements:
            self.install(requirement)

    def torch_logic(self):
        installer = self

        class PyTorchUtilsLogic:
            def torchInstalled(self):
                return (installer.site / "prismrt_fake_torch.py").exists()

            @property
            def torch(self):
                return "torch"

            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                installer.calls.append(("pytorch", askConfirmation, torchVersionRequirement,
                                        torchvisionVersionRequirement))
                for requirement in FAKE_TORCH:
                    installer.install(requirement)
                return "torch"

        return PyTorchUtilsLogic()

    def kinds(self) -> list:
        return [call[0] for call in self.calls]


def _slicer_core():
    from prismrt_testing import slicer_core_or_skip

    return slicer_core_or_skip()


def test_installer_asks_once_then_installs_pytorch_through_its_extension_and_the_rest_with_pip(monkeypatch, tmp_path):
    installer = Installer(monkeypatch, tmp_path / "site")
    assert dependencies.installPythonPackages(askConfirmation=True) is True
    assert installer.kinds() == ["confirm", "pytorch", "pip"], "one question, then PyTorch first, then pip"
    question = installer.calls[0][1]
    for requirement in [*FAKE_PIP, *FAKE_TORCH]:
        assert requirement in question, f"the one question does not name {requirement}: {question!r}"
    assert "PyTorch extension" in question
    assert installer.calls[1] == ("pytorch", False, ">=2.1", ">=0.16"), "the extension must not ask again"
    _kind, pip_requirements, constraints = installer.calls[2]
    assert pip_requirements == list(FAKE_PIP), "pip gets the pip packages only, never torch or torchvision"
    installed_torch = importlib.metadata.version("torch") if _installed("torch") else None
    if installed_torch:
        assert f"torch=={installed_torch}" in constraints.splitlines(), "pip must keep the installed torch"
    # everything is there now: neither a second question nor a second installation
    assert dependencies.installPythonPackages(askConfirmation=True) is True
    assert dependencies.installTorch(askConfirmation=True) == "torch"
    assert installer.kinds() == ["confirm", "pytorch", "pip"]


def test_installer_declined_installs_nothing(monkeypatch, tmp_path):
    installer = Installer(monkeypatch, tmp_path / "site", answer=False)
    assert dependencies.installPythonPackages(askConfirmation=True) is False
    assert installer.kinds() == ["confirm"]
    assert dependencies.missingPythonPackages() == list(FAKE_PIP)


def test_installer_without_pytorch_missing_does_not_need_the_extension(monkeypatch, tmp_path):
    installer = Installer(monkeypatch, tmp_path / "site", torch_extension=False)
    for requirement in FAKE_TORCH:
        installer.install(requirement)
    assert dependencies.installPythonPackages(askConfirmation=True) is True
    assert installer.kinds() == ["confirm", "pip"]
    assert "PyTorch" not in installer.calls[0][1]


def test_installer_says_to_install_the_pytorch_extension_before_asking(monkeypatch, tmp_path):
    installer = Installer(monkeypatch, tmp_path / "site", torch_extension=False)
    from PRISMRTLib.errors import PrismRTError

    with pytest.raises(PrismRTError, match="'PyTorch' extension"):
        dependencies.installPythonPackages(askConfirmation=True)
    assert installer.calls == [], "no question (and nothing installed) when PyTorch cannot be installed"


def test_installer_uses_slicer_packaging_where_slicer_has_it(monkeypatch, tmp_path):
    installer = Installer(monkeypatch, tmp_path / "site")
    ensured = []

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        ensured.append(dict(requirements=list(requirements), prompt_install=prompt_install, requester=requester,
                            skip_in_testing=skip_in_testing,
                            constraints=Path(constraints).read_text(encoding="utf-8") if constraints else ""))
        for requirement in requirements:
            installer.install(requirement)

    packaging = types.SimpleNamespace(pip_ensure=pip_ensure)
    monkeypatch.setattr(dependencies, "_slicerPackaging", lambda: packaging)
    assert dependencies.installPythonPackages(askConfirmation=True) is True
    assert installer.kinds() == ["confirm", "pytorch"], "slicer.util.pip_install is not used where pip_ensure is"
    assert len(ensured) == 1
    call = ensured[0]
    assert call["requirements"] == list(FAKE_PIP)
    assert call["prompt_install"] is False, "pip_ensure must not ask a second time"
    assert call["skip_in_testing"] is False and call["requester"] == "PRISM-RT"
    if _installed("torch"):
        assert f"torch=={importlib.metadata.version('torch')}" in call["constraints"].splitlines()


def test_slicer_packaging_is_found_only_with_pip_ensure(monkeypatch):
    slicer = _slicer_core()
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(GuardedImports=object))
    monkeypatch.setattr(slicer, "packaging", sys.modules["slicer.packaging"], raising=False)
    assert dependencies._slicerPackaging() is None, "an early slicer.packaging without pip_ensure is not used"
    helpers = types.SimpleNamespace(pip_ensure=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "slicer.packaging", helpers)
    monkeypatch.setattr(slicer, "packaging", helpers)
    assert dependencies._slicerPackaging() is helpers


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
