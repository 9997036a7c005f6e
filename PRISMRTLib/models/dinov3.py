"""DINOv3 teacher: timm's ``vit_*_patch16_dinov3`` (registers, RoPE), CLS and dense patch features."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import timm
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoV3Config:
    timm_name: str = "vit_base_patch16_dinov3"
    img_size: int = 512  # dense features are taken at this input size (RoPE: any multiple of 16 works)
    overrides: dict = field(default_factory=dict)  # e.g. embed_dim/depth/num_heads for small variants

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DinoV3Config":
        return cls(**d)


DINOV3_PRESETS = {
    "vit_base": DinoV3Config(),
    "vit_small": DinoV3Config(timm_name="vit_small_patch16_dinov3"),
    # stand-in teacher trained self-supervised on OpenKBP CT slices (training/standins/dinov3.py): 0.8 M parameters,
    # patch 4 at 128 px = a 32 x 32 dense grid (4 px = 16-22 mm on OpenKBP; patch 8 gave patches larger than most
    # organs at risk and features that matched no better than chance across patients)
    "standin": DinoV3Config(
        timm_name="vit_small_patch16_dinov3", img_size=128,
        overrides={"embed_dim": 128, "depth": 4, "num_heads": 4, "patch_size": 4},
    ),
    "tiny": DinoV3Config(
        timm_name="vit_small_patch16_dinov3", img_size=128, overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}
    ),
}


def build_dinov3(config: DinoV3Config) -> torch.nn.Module:
    """A randomly initialised timm DINOv3 ViT without a classifier head (CLS pooling, as upstream)."""
    return timm.create_model(
        config.timm_name, pretrained=False, num_classes=0, global_pool="token", img_size=config.img_size,
        **config.overrides,
    ).eval()


def dinov3_input(images01: torch.Tensor) -> torch.Tensor:
    """(B, S, S) slices in [0, 1] -> (B, 3, S, S) normalised with ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01[:, None] - mean) / std


def dinov3_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS (B, D) and dense patch features (B, D, h, w) from the final normalised tokens."""
    tokens = model.forward_features(x)
    h, w = x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1]
    patches = tokens[:, model.num_prefix_tokens:]
    return tokens[:, 0], patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
