"""Inference bundles: a folder with ``config.json``, ``model.safetensors`` and (for text) ``vocab.txt``.

Two kinds share the format:

- ``prismrt``: the student (backbone + translators) plus the teachers' light parts it reuses: MedSAM's prompt
  encoder and mask decoder, BiomedCLIP's text tower, visual projection and logit scale.
- ``teachers``: the three full teachers (MedSAM, DINOv3, BiomedCLIP).

Modules are rebuilt from the JSON config and filled from safetensors (no pickle anywhere). A bundle whose tensors
do not match what its config builds is refused with a message naming the differences.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PrismRTError
from .biomedclip import BiomedCLIP, BiomedCLIPConfig, VocabTokenizer, build_biomedclip
from .dinov3 import DinoV3Config, build_dinov3
from .medsam import MedSAMConfig, build_medsam
from .student import StudentConfig, build_student

BUNDLE_FORMAT = "prismrt-bundle"
BUNDLE_FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE = "config.json", "model.safetensors", "vocab.txt"
COMPONENTS = {
    "prismrt": ("student", "prompt_encoder", "mask_decoder", "clip_heads"),
    "teachers": ("medsam", "dinov3", "biomedclip"),
}
KINDS = tuple(COMPONENTS)


class BundleError(PrismRTError):
    """A bundle is missing, corrupt, of another version, or inconsistent with its config."""


class TextHeads(nn.Module):
    """BiomedCLIP's parts the student reuses: text tower, the visual projection, the logit scale."""

    def __init__(self, clip: BiomedCLIP):
        super().__init__()
        self.text = clip.text
        self.visual_proj = clip.visual.head.proj
        self.logit_scale = clip.logit_scale


@dataclass
class Bundle:
    """Loaded bundle: ``modules`` holds nn.Modules by component name; ``tokenizer`` reads ``vocab.txt``."""

    kind: str
    name: str
    version: str
    configs: dict
    modules: dict[str, nn.Module]
    tokenizer: VocabTokenizer
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def medsam_config(self) -> MedSAMConfig:
        return MedSAMConfig.from_dict(self.configs["medsam"])

    @property
    def clip_config(self) -> BiomedCLIPConfig:
        return BiomedCLIPConfig.from_dict(self.configs["biomedclip"])


def build_components(kind: str, configs: dict) -> dict[str, nn.Module]:
    """Randomly initialised modules of a bundle, as its config describes them."""
    medsam = build_medsam(MedSAMConfig.from_dict(configs["medsam"]))
    clip = build_biomedclip(BiomedCLIPConfig.from_dict(configs["biomedclip"]))
    if kind == "teachers":
        return {"medsam": medsam, "dinov3": build_dinov3(DinoV3Config.from_dict(configs["dinov3"])), "biomedclip": clip}
    if kind == "prismrt":
        return {
            "student": build_student(StudentConfig.from_dict(configs["student"])),
            "prompt_encoder": medsam.prompt_encoder,
            "mask_decoder": medsam.mask_decoder,
            "clip_heads": TextHeads(clip),
        }
    raise BundleError(f"unknown bundle kind '{kind}': expected one of {KINDS}")


def _flatten(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            out[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def save_bundle(
    folder: "str | os.PathLike",
    kind: str,
    configs: dict,
    modules: dict[str, nn.Module],
    vocab_file: "str | os.PathLike",
    *,
    name: str,
    version: str,
    meta: dict | None = None,
    overwrite: bool = False,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write a bundle folder atomically (a temporary folder renamed into place).

    ``float_dtype`` (e.g. ``torch.float16``) stores floating-point tensors at that precision to save space; they are
    loaded back into the modules' own precision.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise BundleError(f"'{folder}' already exists: choose another folder or allow overwriting")
    if kind not in COMPONENTS or set(modules) != set(COMPONENTS[kind]):
        raise BundleError(f"a '{kind}' bundle needs the components {COMPONENTS.get(kind)}, got {sorted(modules)}")
    tensors = _flatten(modules)
    # tied or shared tensors must be stored once each under their own key
    tensors = {k: (v.to(float_dtype) if float_dtype is not None and v.is_floating_point() else v).clone()
               for k, v in tensors.items()}
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "version": version,
        "configs": configs,
        "meta": meta or {},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT, "kind": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(vocab_file, tmp / VOCAB_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


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
    if int(config.get("format_version", -1)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"the bundle in '{folder}' has format version {config.get('format_version')}, newer than this PRISM-RT "
            f"reads ({BUNDLE_FORMAT_VERSION}): update PRISM-RT"
        )
    if config.get("kind") not in KINDS:
        raise BundleError(f"{path}: unknown bundle kind '{config.get('kind')}'")
    return config


def load_bundle(folder: "str | os.PathLike", device: "str | torch.device" = "cpu") -> Bundle:
    """Rebuild a bundle's modules from its config and load its safetensors weights (strictly)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = read_bundle_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"'{weights}' is missing: download or import the model again")
    modules = build_components(config["kind"], config["configs"])
    expected = {k: tuple(v.shape) for k, v in _flatten(modules).items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            _check_matches(folder, expected, stored)
            tensors = {k: f.get_tensor(k) for k in stored}
    except SafetensorError as exc:
        raise BundleError(f"'{weights}' is not a valid safetensors file ({exc}): download or import it again") from None
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        module.to(device).eval()
    tokenizer = VocabTokenizer(folder / VOCAB_FILE, BiomedCLIPConfig.from_dict(config["configs"]["biomedclip"]).context_length)
    return Bundle(
        kind=config["kind"], name=config.get("name", folder.name), version=str(config.get("version", "")),
        configs=config["configs"], modules=modules, tokenizer=tokenizer, path=folder, meta=config.get("meta", {}),
    )


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


TEACHER_SETS = {
    # the real teachers: MedSAM (SAM ViT-B, 1024 px), DINOv3 ViT-B/16, BiomedCLIP ViT-B/16 + PubMedBERT
    "official": {"medsam": "vit_b", "dinov3": "vit_base", "biomedclip": "vit_base"},
    # small teachers of the same architectures trained on OpenKBP head-and-neck CT (not for clinical use)
    "standin": {"medsam": "standin", "dinov3": "standin", "biomedclip": "standin"},
    # the same architectures, tiny: for tests
    "tiny": {"medsam": "tiny", "dinov3": "tiny", "biomedclip": "tiny"},
}


def preset_configs(teachers: str = "official", student: str | None = "vit_base", **student_kw) -> dict:
    """Config dicts for a bundle: the teacher set's three configs, plus a student aimed at them if ``student``."""
    from .biomedclip import BIOMEDCLIP_PRESETS
    from .dinov3 import DINOV3_PRESETS
    from .medsam import MEDSAM_PRESETS
    from .student import make_student_config

    names = TEACHER_SETS[teachers]
    configs = {
        "medsam": MEDSAM_PRESETS[names["medsam"]].to_dict(),
        "dinov3": DINOV3_PRESETS[names["dinov3"]].to_dict(),
        "biomedclip": BIOMEDCLIP_PRESETS[names["biomedclip"]].to_dict(),
    }
    if student:
        configs["student"] = make_student_config(student, teachers, **student_kw).to_dict()
    return configs
