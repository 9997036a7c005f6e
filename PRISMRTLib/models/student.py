"""The PRISM-RT student: one backbone pass, and per-teacher translators into each teacher's feature space.

The translators are multi-resolution heads: student tokens (at whatever grid the input size gives) are projected,
resampled to the teacher's grid and refined, so the student can run at 256, 512 or 1024 px and still produce
MedSAM's 256 x 64 x 64 embedding, DINOv3's dense features and CLS, and BiomedCLIP's pre-projection CLS and patch
tokens. Teachers' own light parts (SAM's decoder, BiomedCLIP's text tower and projection) then work unchanged.

Two trunks (``StudentConfig.trunk``):

- ``"vit"``: a DINOv3-style timm ViT; every teacher's features come from translators;
- ``"litemedsam"``: LiteMedSAM's TinyViT image encoder, initialised from the SAM teacher (SAM-CLIP's way of merging
  foundation models: start from one, distil the others into heads on it). Its own output *is* the SAM embedding
  (``TRUNK_OUTPUTS``); the other teachers' features come from translators reading that 256 x 64 x 64 map, with
  the image's mean token as the summary input.
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
    trunk: str = "vit"  # "vit" (timm_name) or "litemedsam" (TinyViT; trunk_config = LiteMedSAMConfig fields)
    trunk_config: dict = field(default_factory=dict)
    translator_depth: int = 0  # extra 3x3 refinement blocks in each dense translator (residual)

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
    # LiteMedSAM's TinyViT as the trunk (its neck output is the SAM embedding; its config is the SAM teacher's);
    # translators for DINO and CLIP
    "litemedsam_256": dict(timm_name="", trunk="litemedsam", img_size=256, translator_hidden=256,
                           translator_depth=1),
}

# what each trunk produces itself, without a translator
TRUNK_OUTPUTS = {"vit": (), "litemedsam": ("sam_embedding",)}


def make_student_config(preset: str, teachers: "str | dict[str, TeacherSpec]", **kw) -> StudentConfig:
    """A student preset ("vit_base", "vit_small", "tiny") aimed at a teacher set (a registry name or role -> spec):
    one translator per feature the teachers produce."""
    specs = teacher_set(teachers) if isinstance(teachers, str) else teachers
    targets = {name: asdict(t) for name, t in student_targets(specs).items()}
    preset_kw = dict(STUDENT_PRESETS[preset])
    if preset_kw.get("trunk") == "litemedsam" and "trunk_config" not in kw:
        sam = specs.get("sam")
        if sam is None or sam.family != "sam-tinyvit":
            raise ValueError(f"the student preset '{preset}' is LiteMedSAM's encoder: its teachers need a LiteMedSAM "
                             "SAM teacher")
        preset_kw["trunk_config"] = sam.config_dict()
    return StudentConfig(**{**preset_kw, "targets": targets, **kw})


class DenseTranslator(nn.Module):
    """Tokens (B, h, w, D) -> features (B, C, G, G): per-token MLP, resample to the teacher grid, 3x3 refinement.

    ``up_stages`` > 0 (learned upsampling): that many transposed-convolution stages (x2 each, channels halved, at
    least ``hidden // 4``) before the resample, which then only corrects the size at other input resolutions."""

    def __init__(self, in_dim: int, hidden: int, target: FeatureTarget, up_stages: int = 0, pool: int = 1,
                 depth: int = 0):
        super().__init__()
        self.grid = target.grid
        self.pool = pool  # tokens averaged over pool x pool cells first (a fine trunk grid, a coarse teacher grid)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        stages, width = [], hidden
        for _ in range(up_stages):
            out = max(hidden // 4, width // 2)
            stages += [nn.ConvTranspose2d(width, out, 2, stride=2), nn.GroupNorm(1, out), nn.GELU()]
            width = out
        self.up = nn.Sequential(*stages)
        self.blocks = nn.ModuleList(_ResidualBlock(width) for _ in range(depth))
        self.refine = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
            nn.Conv2d(width, target.channels, 1),
        )

    @property
    def last(self) -> nn.Conv2d:
        return self.refine[-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            tokens = F.avg_pool2d(tokens.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)
        x = self.up(self.mlp(tokens).permute(0, 3, 1, 2))
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            down = x.shape[-1] > self.grid
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False, antialias=down)
        for block in self.blocks:
            x = block(x)
        return self.refine(x)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


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
        if config.trunk == "litemedsam":
            from .litemedsam import _refresh_cached_biases, build_image_encoder, litemedsam_trunk_config

            lite = litemedsam_trunk_config(config.trunk_config)
            if config.img_size != lite.img_size:
                raise ValueError(f"a LiteMedSAM trunk takes {lite.img_size} px input, not {config.img_size}")
            self.backbone = build_image_encoder(lite)
            self.width, token_grid = lite.prompt_embed_dim, lite.embedding_size
            # TinyViT caches its attention biases in eval mode: refresh them after weights are loaded
            self.register_load_state_dict_post_hook(_refresh_cached_biases)
        elif config.trunk == "vit":
            self.backbone = timm.create_model(
                config.timm_name, pretrained=False, num_classes=0, global_pool="token", img_size=config.img_size,
                **config.overrides,
            )
            self.width = self.backbone.num_features
            token_grid = config.img_size // self.backbone.patch_embed.patch_size[0]
        else:
            raise ValueError(f"unknown student trunk '{config.trunk}': expected one of {sorted(TRUNK_OUTPUTS)}")
        self.trunk_outputs = TRUNK_OUTPUTS[config.trunk]
        self.trunk_frozen = False
        for name in self.trunk_outputs:
            target = config.target(name)
            if (target.channels, target.grid) != (self.width, token_grid):
                raise ValueError(f"the {config.trunk} trunk gives {self.width} x {token_grid}^2 features, but the "
                                 f"teacher's '{name}' is {target.channels} x {target.grid}^2")
        width = self.width
        self.translators = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for name in config.targets:
            if name in self.trunk_outputs:
                continue
            target = config.target(name)
            if target.grid:
                stages = 0
                if config.upsample == "learned":
                    while token_grid << (stages + 1) <= target.grid:
                        stages += 1
                pool = max(1, token_grid // (2 * target.grid))
                self.translators[name] = DenseTranslator(width, config.translator_hidden, target, stages, pool,
                                                         config.translator_depth)
                if config.token_gates:
                    self.gates[name] = TokenGate(width)
            else:
                self.translators[name] = VectorTranslator(width, config.translator_hidden, target)

    def freeze_trunk(self) -> "Student":
        """Train the translators only: the trunk keeps its weights and stays in eval mode (TinyViT's batch norms)."""
        self.trunk_frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        if self.trunk_frozen:
            self.backbone.eval()
        return self

    def tokens(self, images01: torch.Tensor, content_box=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Student CLS (B, D) and patch tokens on their grid (B, h, w, D). ``content_box`` (row0, col0, row1,
        col1; end-exclusive): the slice's pixels in a letterboxed input (the LiteMedSAM trunk normalises over
        them, as its teacher does); default the whole image."""
        if self.config.trunk == "litemedsam":
            from .litemedsam import litemedsam_input

            box = content_box or (0, 0, images01.shape[-2], images01.shape[-1])
            return self.tokens_from_embedding(self.backbone(litemedsam_input(images01, box)))
        x = dinov3_input(images01)
        tokens = self.backbone.forward_features(x)
        p = self.backbone.patch_embed.patch_size
        h, w = x.shape[-2] // p[0], x.shape[-1] // p[1]
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)

    @staticmethod
    def tokens_from_embedding(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A trunk's feature map (B, D, h, w) -> (mean token, tokens (B, h, w, D))."""
        patches = embedding.permute(0, 2, 3, 1)
        return patches.mean(dim=(1, 2)), patches

    def translate(self, cls: torch.Tensor, patches: torch.Tensor, only=None) -> dict[str, torch.Tensor]:
        """Every target (or those named in ``only``) from the trunk's tokens."""
        out = {name: patches.permute(0, 3, 1, 2).contiguous() for name in self.trunk_outputs
               if only is None or name in only}
        for name, translator in self.translators.items():
            if only is not None and name not in only:
                continue
            if isinstance(translator, DenseTranslator):
                x = self.gates[name](cls, patches) if name in self.gates else patches
                out[name] = translator(x)
            else:
                out[name] = translator(cls)
        return out

    def forward(self, images01: torch.Tensor, content_box=None, only=None) -> dict[str, torch.Tensor]:
        return self.translate(*self.tokens(images01, content_box), only=only)


def build_student(config: StudentConfig) -> Student:
    return Student(config).eval()
