"""The PRISM-RT student: one DINOv3-style ViT pass, and per-teacher translators into each teacher's feature space.

The translators are multi-resolution heads: student tokens (at whatever grid the input size gives) are projected,
resampled to the teacher's grid and refined, so the student can run at 256, 512 or 1024 px and still produce
MedSAM's 256 x 64 x 64 embedding, DINOv3's dense features and CLS, and BiomedCLIP's pre-projection CLS and patch
tokens. Teachers' own light parts (SAM's decoder, BiomedCLIP's text tower and projection) then work unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .dinov3 import dinov3_input
from .registry import FeatureTarget, TeacherSpec, student_targets, teacher_set


@dataclass(frozen=True)
class StudentConfig:
    timm_name: str = "vit_base_patch16_dinov3"
    img_size: int = 512  # default input size; any multiple of 16 works (RoPE)
    overrides: dict = field(default_factory=dict)
    translator_hidden: int = 512
    targets: dict = field(default_factory=dict)  # SliceFeatures field -> FeatureTarget as dict (from the registry)
    # "bilinear": tokens resampled to a teacher's grid; "learned": transposed-convolution stages (x2 each) up to it
    upsample: str = "bilinear"
    token_gates: bool = False  # per-translator token gates (MultiMedDistill's token-level gating)

    def target(self, name: str) -> FeatureTarget:
        return FeatureTarget(**self.targets[name])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        return cls(**d)


STUDENT_PRESETS = {
    "vit_base": dict(timm_name="vit_base_patch16_dinov3", translator_hidden=512),
    "vit_small": dict(timm_name="vit_small_patch16_dinov3", translator_hidden=384),
    # ViT-S/16 at 256 px with learned upsampling to the SAM grid: the distillation's CPU-sized student
    "vit_small_256": dict(timm_name="vit_small_patch16_dinov3", img_size=256, translator_hidden=256,
                          upsample="learned"),
    # ViT-Ti/16 width (192, 3 heads) at 256 px: what a 2-core CPU can train in hours
    "vit_tiny_256": dict(timm_name="vit_small_patch16_dinov3", img_size=256, translator_hidden=192,
                         upsample="learned", overrides={"embed_dim": 192, "num_heads": 3}),
    "tiny": dict(timm_name="vit_small_patch16_dinov3", img_size=128, translator_hidden=32,
                 overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
}


def make_student_config(preset: str, teachers: "str | dict[str, TeacherSpec]", **kw) -> StudentConfig:
    """A student preset ("vit_base", "vit_small", "tiny") aimed at a teacher set (a registry name or role -> spec):
    one translator per feature the teachers produce."""
    specs = teacher_set(teachers) if isinstance(teachers, str) else teachers
    targets = {name: asdict(t) for name, t in student_targets(specs).items()}
    return StudentConfig(**{**STUDENT_PRESETS[preset], "targets": targets, **kw})


class DenseTranslator(nn.Module):
    """Tokens (B, h, w, D) -> features (B, C, G, G): per-token MLP, resample to the teacher grid, 3x3 refinement.

    ``up_stages`` > 0 (learned upsampling): that many transposed-convolution stages (x2 each, channels halved, at
    least ``hidden // 4``) before the resample, which then only corrects the size at other input resolutions."""

    def __init__(self, in_dim: int, hidden: int, target: FeatureTarget, up_stages: int = 0):
        super().__init__()
        self.grid = target.grid
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        stages, width = [], hidden
        for _ in range(up_stages):
            out = max(hidden // 4, width // 2)
            stages += [nn.ConvTranspose2d(width, out, 2, stride=2), nn.GroupNorm(1, out), nn.GELU()]
            width = out
        self.up = nn.Sequential(*stages)
        self.refine = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
            nn.Conv2d(width, target.channels, 1),
        )

    @property
    def last(self) -> nn.Conv2d:
        return self.refine[-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.up(self.mlp(tokens).permute(0, 3, 1, 2))
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            down = x.shape[-1] > self.grid
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False, antialias=down)
        return self.refine(x)


class VectorTranslator(nn.Module):
    def __init__(self, in_dim: int, hidden: int, target: FeatureTarget):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, target.channels))

    @property
    def last(self) -> nn.Linear:
        return self.mlp[-1]

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(cls)


class TokenGate(nn.Module):
    """Per-token gates in (0, 2) for one translator, from the token and the image's CLS (starts at 1: identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        context = cls[:, None, None, :].expand_as(patches)
        return patches * (2 * torch.sigmoid(self.proj(torch.cat([patches, context], -1))))


class Student(nn.Module):
    """Backbone + translators. ``forward`` takes (B, S, S) slices in [0, 1] and returns every target at once."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(
            config.timm_name, pretrained=False, num_classes=0, global_pool="token", img_size=config.img_size,
            **config.overrides,
        )
        width = self.backbone.num_features
        self.translators = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        token_grid = config.img_size // self.backbone.patch_embed.patch_size[0]
        for name in config.targets:
            target = config.target(name)
            if target.grid:
                stages = 0
                if config.upsample == "learned":
                    while token_grid << (stages + 1) <= target.grid:
                        stages += 1
                self.translators[name] = DenseTranslator(width, config.translator_hidden, target, stages)
                if config.token_gates:
                    self.gates[name] = TokenGate(width)
            else:
                self.translators[name] = VectorTranslator(width, config.translator_hidden, target)

    def tokens(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student CLS (B, D) and patch tokens on their grid (B, h, w, D)."""
        x = dinov3_input(images01)
        tokens = self.backbone.forward_features(x)
        p = self.backbone.patch_embed.patch_size
        h, w = x.shape[-2] // p[0], x.shape[-1] // p[1]
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)

    def translate(self, cls: torch.Tensor, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, translator in self.translators.items():
            if isinstance(translator, DenseTranslator):
                x = self.gates[name](cls, patches) if name in self.gates else patches
                out[name] = translator(x)
            else:
                out[name] = translator(cls)
        return out

    def forward(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.translate(*self.tokens(images01))


def build_student(config: StudentConfig) -> Student:
    return Student(config).eval()
