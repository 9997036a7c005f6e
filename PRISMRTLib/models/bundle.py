"""Inference bundles: a folder with ``config.json``, ``model.safetensors`` and (with a CLIP teacher) ``vocab.txt``.

Two kinds share the format:

- ``teachers``: one teacher per role (``sam``, ``dino``, ``clip``: any subset), each named in the teacher registry
  (:mod:`PRISMRTLib.models.registry`) with its architecture config;
- ``prismrt``: the student (backbone + translators) plus the teachers' light parts it reuses: the SAM teacher's
  prompt encoder and mask decoder, the CLIP teacher's text tower, visual projection and logit scale.

Modules are rebuilt from the JSON config and filled from safetensors (no pickle anywhere). A bundle whose tensors
do not match what its config builds is refused with a message naming the differences.

A bundle may hold only some of its tensors and name a ``base`` model for the rest (``"base": {"model", "version",
"components", "tensors_sha256"}``): the prompt heads fine-tuned for clicks ship this way on top of LiteMedSAM's image
encoder, which each user converts from the released checkpoint; the base tensors' digest must match.
``components`` is a list of prefixes the base holds under the same names, or a mapping from this bundle's prefix
to the base's (the student with a LiteMedSAM trunk takes ``student.backbone`` from ``sam.image_encoder``).

Format version 2 (this one) names teachers by role; version 1 bundles (``medsam``/``dinov3``/``biomedclip``
components, no teacher names) are read too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import PrismRTError
from .registry import (ROLES, TeacherSpec, get_teacher, spec_from_record, spec_record, teacher_set,
                       tensor_digest)

BUNDLE_FORMAT = "prismrt-bundle"
BUNDLE_FORMAT_VERSION = 2
CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE = "config.json", "model.safetensors", "vocab.txt"
KINDS = ("prismrt", "teachers")
_V1_ROLES = {"medsam": "sam", "dinov3": "dino", "biomedclip": "clip"}


class BundleError(PrismRTError):
    """A bundle is missing, corrupt, of another version, or inconsistent with its config."""


class TextHeads(nn.Module):
    """The CLIP teacher's parts the student reuses: text tower, the visual projection, the logit scale."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.text = clip.text
        self.visual_proj = clip.visual.head.proj
        self.logit_scale = clip.logit_scale


@dataclass
class Bundle:
    """Loaded bundle: ``modules`` by component name; ``teachers`` the specs by role; ``tokenizer`` reads
    ``vocab.txt`` (None without a CLIP teacher)."""

    kind: str
    name: str
    version: str
    configs: dict
    modules: dict[str, nn.Module]
    tokenizer: object | None
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.teachers)


def preset_configs(teachers: "str | dict[str, TeacherSpec]" = "official", student: str | None = None,
                   **student_kw) -> dict:
    """A bundle's ``configs``: the teachers (a registry set's name or role -> spec), plus a student aimed at them."""
    from .student import make_student_config

    specs = teacher_set(teachers) if isinstance(teachers, str) else dict(teachers)
    configs = {"teachers": {role: spec_record(spec) for role, spec in specs.items()}}
    if student:
        configs["student"] = make_student_config(student, specs, **student_kw).to_dict()
    return configs


def teacher_specs(configs: dict) -> dict[str, TeacherSpec]:
    return {role: spec_from_record(rec) for role, rec in configs.get("teachers", {}).items()}


def components_of(kind: str, configs: dict) -> tuple[str, ...]:
    roles = [r for r in ROLES if r in configs.get("teachers", {})]
    if kind == "teachers":
        return tuple(roles)
    if kind == "prismrt":
        return ("student",) + (("prompt_encoder", "mask_decoder") if "sam" in roles else ()) + \
            (("clip_heads",) if "clip" in roles else ())
    raise BundleError(f"unknown bundle kind '{kind}': expected one of {KINDS}")


def build_components(kind: str, configs: dict) -> dict[str, nn.Module]:
    """Randomly initialised modules of a bundle, as its config describes them."""
    from .student import StudentConfig, build_student

    specs = teacher_specs(configs)
    if kind == "teachers":
        if not specs:
            raise BundleError("a 'teachers' bundle needs at least one teacher")
        return {role: spec.build() for role, spec in specs.items()}
    if kind == "prismrt":
        modules: dict[str, nn.Module] = {"student": build_student(StudentConfig.from_dict(configs["student"]))}
        if "sam" in specs:
            sam = specs["sam"].build()
            modules.update(prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder)
        if "clip" in specs:
            modules["clip_heads"] = TextHeads(specs["clip"].build())
        return modules
    raise BundleError(f"unknown bundle kind '{kind}': expected one of {KINDS}")


def flatten(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            out[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def _held_by_base(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _base_names(components) -> dict[str, str]:
    """A base's ``components`` (a list of shared prefixes, or own prefix -> the base's) as a mapping."""
    return dict(components) if isinstance(components, dict) else {p: p for p in components}


def _in_base(key: str, names: dict[str, str]) -> str:
    for own, theirs in names.items():
        if key == own or key.startswith(own + "."):
            return theirs + key[len(own):]
    raise KeyError(key)


def save_bundle(
    folder: "str | os.PathLike",
    kind: str,
    configs: dict,
    modules: dict[str, nn.Module],
    vocab_file: "str | os.PathLike | None" = None,
    *,
    name: str,
    version: str,
    meta: dict | None = None,
    overwrite: bool = False,
    float_dtype: torch.dtype | None = None,
    base: dict | None = None,
) -> Path:
    """Write a bundle folder atomically (a temporary folder renamed into place).

    ``float_dtype`` (e.g. ``torch.float16``) stores floating-point tensors at that precision to save space; they are
    loaded back into the modules' own precision. ``base`` = ``{"model", "version", "components"}``: the tensors under
    those component prefixes (e.g. ``"sam.image_encoder"``) are not stored but taken from that model when loading;
    their digest is recorded so a different base is refused.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise BundleError(f"'{folder}' already exists: choose another folder or allow overwriting")
    expected = components_of(kind, configs)
    if set(modules) != set(expected):
        raise BundleError(f"a '{kind}' bundle of these teachers needs the components {expected}, got {sorted(modules)}")
    if "clip" in configs.get("teachers", {}) and vocab_file is None:
        raise BundleError("a bundle with a CLIP teacher needs its tokenizer vocabulary (vocab_file)")
    tensors = flatten(modules)
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "version": version,
        **configs,
        "meta": meta or {},
    }
    if base:
        components = base["components"]
        prefixes = dict(components) if isinstance(components, dict) else list(components)
        held = {k: v for k, v in tensors.items() if _held_by_base(k, prefixes)}
        if not held:
            raise BundleError(f"no tensor lies under the base components {list(prefixes)}")
        config["base"] = {"model": base["model"], "version": str(base.get("version", "")), "components": prefixes,
                          "tensors_sha256": tensor_digest(held)}
        tensors = {k: v for k, v in tensors.items() if k not in held}
    # tied or shared tensors must be stored once each under their own key
    tensors = {k: (v.to(float_dtype) if float_dtype is not None and v.is_floating_point() else v).clone()
               for k, v in tensors.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT, "kind": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if vocab_file is not None:
            shutil.copyfile(vocab_file, tmp / VOCAB_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _upgrade_v1(config: dict) -> dict:
    """A version 1 config (``configs`` with medsam/dinov3/biomedclip presets) in version 2's terms."""
    from .biomedclip import BIOMEDCLIP_PRESETS
    from .dinov3 import DINOV3_PRESETS
    from .medsam import MEDSAM_PRESETS

    presets = {"medsam": MEDSAM_PRESETS, "dinov3": DINOV3_PRESETS, "biomedclip": BIOMEDCLIP_PRESETS}
    names = {"medsam": {"standin": "medsam-standin", "tiny": "medsam-tiny"},
             "dinov3": {"standin": "dinov3-standin", "tiny": "dinov3-tiny"},
             "biomedclip": {"standin": "biomedclip-standin", "tiny": "biomedclip-tiny"}}
    old = config.get("configs", {})
    teachers = {}
    for key, role in _V1_ROLES.items():
        if key not in old:
            continue
        name = next((n for preset, n in names[key].items() if presets[key][preset].to_dict() == old[key]), key)
        teachers[role] = {"name": name, "config": old[key]}
    out = {k: v for k, v in config.items() if k != "configs"}
    out["teachers"] = teachers
    if "student" in old:
        student = dict(old["student"])
        rename = {"medsam": "sam_embedding"}
        student["targets"] = {rename.get(k, k): v for k, v in student.get("targets", {}).items()}
        out["student"] = student
    # stored tensor names: version 1 components (teachers) and translator names (students) -> version 2's
    out["v1_renames"] = ({f"{key}.": f"{role}." for key, role in _V1_ROLES.items()} if config.get("kind") == "teachers"
                         else {"student.translators.medsam.": "student.translators.sam_embedding."})
    return out


def read_bundle_config(folder: "str | os.PathLike") -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"'{folder}' is not a PRISM-RT bundle ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read ({exc}): download or import the model again") from None
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a PRISM-RT bundle config")
    version = int(config.get("format_version", -1))
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"the bundle in '{folder}' has format version {config.get('format_version')}, newer than this PRISM-RT "
            f"reads ({BUNDLE_FORMAT_VERSION}): update PRISM-RT"
        )
    if config.get("kind") not in KINDS:
        raise BundleError(f"{path}: unknown bundle kind '{config.get('kind')}'")
    if version < 2:
        config = _upgrade_v1(config)
    for record in config.get("teachers", {}).values():
        get_teacher(record["name"])  # a clear error for a teacher this version does not know
    return config


def _configs(config: dict) -> dict:
    return {k: config[k] for k in ("teachers", "student") if k in config}


def load_bundle(folder: "str | os.PathLike", device: "str | torch.device" = "cpu",
                resolve_base: Callable[[str], Path] | None = None) -> Bundle:
    """Rebuild a bundle's modules from its config and load its safetensors weights (strictly).

    ``resolve_base(model_name)`` gives the folder of a ``base`` model (default: a folder path as it is, else the
    weights cache's :func:`~PRISMRTLib.weights.ensure_model`, which converts or downloads it on first use).
    """
    from .biomedclip import VocabTokenizer

    folder = Path(folder)
    config = read_bundle_config(folder)
    configs = _configs(config)
    modules = build_components(config["kind"], configs)
    expected = {k: tuple(v.shape) for k, v in flatten(modules).items()}
    tensors = _read_tensors(folder, config, expected)
    base = config.get("base")
    if base:
        if resolve_base is None:
            resolve_base = _default_base
        base_folder = Path(resolve_base(base["model"]))
        base_config = read_bundle_config(base_folder)
        names = _base_names(base["components"])
        wanted = {k: s for k, s in expected.items() if _held_by_base(k, names)}
        theirs = {_in_base(k, names): k for k in wanted}
        base_tensors = _read_tensors(base_folder, base_config, {t: wanted[k] for t, k in theirs.items()}, subset=True)
        base_tensors = {theirs[t]: v for t, v in base_tensors.items()}
        if tensor_digest(base_tensors) != base.get("tensors_sha256"):
            raise BundleError(
                f"the bundle in '{folder}' was trained on other weights of '{base['model']}' than the ones in "
                f"'{base_folder}': it cannot be used with them. Use a version of '{config.get('name', folder.name)}' "
                f"made for this '{base['model']}' (update PRISM-RT), or choose another model with --model"
            )
        tensors.update(base_tensors)
    _check_matches(folder, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        module.to(device).eval()
    specs = teacher_specs(configs)
    tokenizer = None
    if "clip" in specs:
        tokenizer = VocabTokenizer(folder / VOCAB_FILE, specs["clip"].config.context_length)
    return Bundle(
        kind=config["kind"], name=config.get("name", folder.name), version=str(config.get("version", "")),
        configs=configs, modules=modules, tokenizer=tokenizer, teachers=specs, path=folder,
        meta=config.get("meta", {}),
    )


def _default_base(model: str) -> Path:
    """A base named by a bundle folder (local runs, tests) or a manifest name (converted or fetched on first use)."""
    from ..weights import ensure_model

    path = Path(model).expanduser()
    return path if path.is_dir() else Path(ensure_model(model))


def _read_tensors(folder: Path, config: dict, expected: dict, subset: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's weights file under version 2 names; only ``expected``'s keys when ``subset``."""
    from safetensors import SafetensorError, safe_open

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"'{weights}' is missing: download or import the model again")
    renames = config.get("v1_renames", {})

    def v2(key: str) -> str:
        for old, new in renames.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = {v2(k): k for k in f.keys()}
            if subset:
                missing = sorted(set(expected) - set(keys))
                if missing:
                    raise BundleError(f"'{weights}' lacks {len(missing)} tensors of its base role (e.g. {missing[0]})")
                keys = {k: keys[k] for k in expected}
            else:
                shapes = {k: tuple(f.get_slice(raw).get_shape()) for k, raw in keys.items()}
                held_by_base = config.get("base", {}).get("components", [])
                _check_matches(folder, {k: s for k, s in expected.items() if not _held_by_base(k, held_by_base)},
                               shapes)
            return {k: f.get_tensor(raw) for k, raw in keys.items()}
    except SafetensorError as exc:
        raise BundleError(f"'{weights}' is not a valid safetensors file ({exc}): download or import it again") from None


def _check_matches(folder: Path, expected: dict, stored: dict) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {stored[k]} in the file, {expected[k]} by the config)")
    raise BundleError(
        f"the bundle in '{folder}' does not match its config.json: " + "; ".join(parts)
        + ". The files are from different models or versions: download or import the model again"
    )
