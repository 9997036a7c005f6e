"""MedSAM teacher: SAM's architecture (segment_anything), configurable in size, with MedSAM's preprocessing.

MedSAM feeds the image encoder a 3-channel image scaled to [0, 1] with no mean/std normalisation (it calls
``image_encoder`` directly instead of ``Sam.preprocess``); prompts are in input-pixel coordinates (x, y).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


@dataclass(frozen=True)
class MedSAMConfig:
    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for SAM ViT-B at 1024 px)."""
        return self.img_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MedSAMConfig":
        d = dict(d)
        d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
        return cls(**d)


MEDSAM_PRESETS = {
    # MedSAM = SAM ViT-B fine-tuned on medical images: the official checkpoint medsam_vit_b.pth
    "vit_b": MedSAMConfig(),
    # stand-in teacher trained on OpenKBP head-and-neck CT (training/standins): 128 px slices, patch 8
    "standin": MedSAMConfig(
        img_size=128, patch_size=8, encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3), window_size=8, prompt_embed_dim=128, decoder_mlp_dim=512,
        decoder_num_heads=4, mask_in_chans=16,
    ),
    # the same at patch 4: a 32 x 32 embedding grid and 128 px low-res masks (fine-tuned from "standin", see
    # training/standins/medsam.py adapt_state_dict); boundaries at one 3.9 mm pixel instead of two
    "standin_hr": MedSAMConfig(
        img_size=128, patch_size=4, encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3), window_size=8, prompt_embed_dim=128, decoder_mlp_dim=512,
        decoder_num_heads=4, mask_in_chans=16,
    ),
    # same architecture, small enough for unit tests
    "tiny": MedSAMConfig(
        img_size=128, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
        window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, mask_in_chans=8,
    ),
}


def build_medsam(config: MedSAMConfig) -> Sam:
    """A randomly initialised SAM with MedSAM's layout (state-dict keys match medsam_vit_b.pth)."""
    grid = config.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=4,
            out_chans=config.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=config.window_size,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    ).eval()


def medsam_input(images01: torch.Tensor) -> torch.Tensor:
    """(B, S, S) letterboxed slices in [0, 1] -> the encoder's (B, 3, S, S) input (no mean/std, as MedSAM)."""
    return images01[:, None].expand(-1, 3, -1, -1)
