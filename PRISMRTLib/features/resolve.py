"""Which models a backend runs when the user names none, and :func:`open_backend`, which gets one ready.

Defaults, in order of preference per role (the first one available on this machine wins; if none is, the first one
the manifest knows is downloaded or converted):

- ``prismrt``: the distilled student (``prismrt-student``, shipped: LiteMedSAM's encoder with litemedsam-clicks'
  heads for delineation, distilled DINO- and CLIP-role translators);
- ``teachers``: for ``sam`` (delineation) LiteMedSAM with prompt heads fine-tuned for clicks, then the user's
  converted official teachers, the released LiteMedSAM, the shipped stand-in; for ``dino`` and ``clip`` the
  converted official teachers, then the shipped stand-ins.

``backend="auto"`` (the default everywhere) is the student when one is installed, else the teachers.
"""

from __future__ import annotations

from pathlib import Path

import logging

from ..models.bundle import BundleError, load_bundle, read_bundle_config
from ..models.registry import ROLES
from .backends import BACKENDS, StudentBackend, Teacher, TeacherBackend, teachers_of

log = logging.getLogger("prismrt")
BACKEND_CHOICES = ("auto",) + BACKENDS
DEFAULT_MODELS = {
    "prismrt": ("prismrt-student",),
    "sam": ("litemedsam-clicks", "teachers-official", "litemedsam", "teachers-standin-openkbp"),
    "dino": ("teachers-official", "teachers-standin-openkbp"),
    "clip": ("teachers-official", "teachers-standin-openkbp"),
}
DEFAULT_HELP = ("auto = the distilled student ('prismrt': LiteMedSAM's encoder and click-tuned heads, one pass for "
                "every role) when it is installed, otherwise the teachers (delineation: LiteMedSAM, fine-tuned for "
                "clicks)")


def _default(key: str, progress=None, cancel=None) -> Path:
    """The folder of the preferred available model for ``key`` (a role, or "prismrt")."""
    from ..weights import UnknownModelError, default_manifest, ensure_model, is_available

    from ..weights import WeightsError

    manifest = default_manifest()
    known = [n for n in DEFAULT_MODELS[key] if n in manifest.models]
    for name in known:
        if is_available(name, manifest):
            try:
                return ensure_model(name, progress=progress, cancel=cancel, manifest=manifest)
            except WeightsError as exc:  # present but unusable (e.g. a source that fails its SHA-256): the next
                log.warning("PRISM-RT: model '%s' cannot be used (%s); trying the next default", name, exc)
    if not known:
        what = "the 'prismrt' backend" if key == "prismrt" else f"the teachers' {key} role"
        raise UnknownModelError(
            f"no model for {what} is published yet ({', '.join(DEFAULT_MODELS[key])}): pass a bundle folder with "
            "--model, or use --backend teachers"
        )
    return ensure_model(known[0], progress=progress, cancel=cancel, manifest=manifest)


def default_backend() -> str:
    """"prismrt" when a student model is available on this machine, else "teachers"."""
    from ..weights import default_manifest, is_available

    manifest = default_manifest()
    return "prismrt" if any(is_available(n, manifest) for n in DEFAULT_MODELS["prismrt"]) else "teachers"


def model_folder(model: str, progress=None, cancel=None) -> Path:
    """A bundle folder given as a path, or a manifest name (fetched, converted or verified as needed)."""
    from ..weights import ensure_model

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    return ensure_model(model, progress=progress, cancel=cancel)


class _RoleLoader:
    """Loads one role's teacher from the default models when the backend first needs it."""

    def __init__(self, role: str, bundles: dict, progress, cancel):
        self.role, self._bundles, self._progress, self._cancel = role, bundles, progress, cancel
        self.model = f"default ({DEFAULT_MODELS[role][0]}, ...)"

    def __call__(self) -> Teacher:
        folder = _default(self.role, self._progress, self._cancel)
        key = str(folder.resolve())
        if key not in self._bundles:
            self._bundles[key] = load_bundle(folder)
        bundle = self._bundles[key]
        if self.role not in bundle.teachers:
            raise BundleError(f"the default model in '{folder}' has no {self.role} teacher")
        teacher = teachers_of(bundle)[self.role]
        self.model = teacher.model
        return teacher



def open_backend(
    backend: str = "auto",
    model: str | None = None,
    device: str = "auto",
    *,
    progress=None,
    cancel=None,
    eager: bool = False,
    **kw,
):
    """Get a backend ready to run: weights from the cache (or shipped, or converted), fetched on first use.

    ``backend``: "auto" (the student when installed, else the teachers), "prismrt" or "teachers". ``model``: a
    manifest name or a bundle folder; for the teachers backend its roles replace the defaults' (the other roles keep
    theirs, loaded when first used, or now with ``eager``). ``device`` "auto" picks CUDA when present, else the CPU.
    """
    from ..device import resolve_device

    if backend not in BACKEND_CHOICES:
        raise BundleError(f"unknown backend '{backend}': use one of {', '.join(BACKEND_CHOICES)}")
    folder = model_folder(model, progress, cancel) if model is not None else None
    if backend == "auto":
        backend = read_bundle_config(folder)["kind"] if folder is not None else default_backend()
    device = resolve_device(device)
    if backend == "prismrt":
        folder = folder if folder is not None else _default("prismrt", progress, cancel)
        bundle = load_bundle(folder)
        if bundle.kind != "prismrt":
            raise BundleError(f"model '{model or folder}' is a '{bundle.kind}' bundle, not one for the 'prismrt' "
                              "backend: choose a 'prismrt' model (prismrt models list), or --backend teachers")
        return StudentBackend(bundle, device, **kw)
    teachers: dict = {}
    bundles: dict = {}
    if folder is not None:
        bundle = load_bundle(folder)
        if bundle.kind != "teachers":
            raise BundleError(f"model '{model}' is a '{bundle.kind}' bundle, not one for the 'teachers' backend: "
                              "choose a 'teachers' model (prismrt models list), or --backend prismrt")
        bundles[str(Path(folder).resolve())] = bundle
        teachers.update(teachers_of(bundle))
    for role in ROLES:
        if role not in teachers:
            teachers[role] = _RoleLoader(role, bundles, progress, cancel)
    out = TeacherBackend(teachers, device, **kw)
    if eager:
        for role in out.roles:
            out.teacher(role)
    return out
