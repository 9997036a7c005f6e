"""BiomedCLIP teacher: open_clip's layout with a timm ViT image tower and a PubMedBERT text tower.

Built with no network: the text tower comes from an explicit ``BertConfig`` (open_clip would otherwise fetch the
config from the hub) and the tokenizer from a WordPiece vocabulary file. State-dict keys match the official
``open_clip_pytorch_model.bin`` (``visual.trunk.*``, ``visual.head.proj.weight``, ``text.transformer.*``,
``text.proj.*``, ``logit_scale``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import HFTokenizer, get_clean_fn

# microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract (BiomedCLIP's text tower), written out so nothing is fetched.
PUBMEDBERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)


@dataclass(frozen=True)
class BiomedCLIPConfig:
    embed_dim: int = 512  # joint image-text space
    vision_timm_name: str = "vit_base_patch16_224"
    image_size: int = 224
    vision_overrides: dict = field(default_factory=dict)
    text_bert: dict = field(default_factory=lambda: dict(PUBMEDBERT_BASE))
    text_proj: str = "mlp"
    text_pooler: str = "cls_last_hidden_state_pooler"
    context_length: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BiomedCLIPConfig":
        return cls(**d)


BIOMEDCLIP_PRESETS = {
    "vit_base": BiomedCLIPConfig(),  # microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    # stand-in teacher trained contrastively on OpenKBP CT slices and generated captions (training/standins)
    "standin": BiomedCLIPConfig(
        embed_dim=128, image_size=128, vision_overrides={"embed_dim": 128, "depth": 4, "num_heads": 4},
        text_bert=dict(PUBMEDBERT_BASE, vocab_size=284, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256, max_position_embeddings=64),
        context_length=64,
    ),
    "tiny": BiomedCLIPConfig(
        embed_dim=32, image_size=64, vision_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2},
        text_bert=dict(PUBMEDBERT_BASE, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64),
        context_length=32,
    ),
}


class ClipVisionTower(nn.Module):
    """open_clip's TimmModel layout (``trunk`` + ``head.proj``) for a ViT with CLS pooling and a linear projection."""

    def __init__(self, config: BiomedCLIPConfig):
        super().__init__()
        self.trunk = timm.create_model(
            config.vision_timm_name, pretrained=False, num_classes=0, img_size=config.image_size,
            **config.vision_overrides,
        )
        self.head = nn.Sequential(OrderedDict(
            drop=nn.Dropout(0.0), proj=nn.Linear(self.trunk.num_features, config.embed_dim, bias=False)
        ))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised tokens (B, prefix + N, width)."""
        return self.trunk.forward_features(x)

    def pre_projection(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled (CLS) feature before the projection into the joint space."""
        return self.trunk.forward_head(tokens, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_projection(self.tokens(x)))


class BiomedCLIP(nn.Module):
    def __init__(self, config: BiomedCLIPConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        self.visual = ClipVisionTower(config)
        bert = BertConfig(**config.text_bert)
        text = HFTextEncoder(
            "explicit-bert-config", output_dim=config.embed_dim, config=bert,
            pooler_type=config.text_pooler, proj_type=config.text_proj,
        )
        # BiomedCLIP pools the CLS hidden state itself; the official checkpoint has no BERT pooler weights.
        text.transformer = BertModel(bert, add_pooling_layer=False)
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(x)
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(ids)
        return nn.functional.normalize(f, dim=-1) if normalize else f


def build_biomedclip(config: BiomedCLIPConfig) -> BiomedCLIP:
    return BiomedCLIP(config).eval()


class VocabTokenizer(HFTokenizer):
    """open_clip's HF tokenizer behaviour (whitespace cleaning, padding to the context length) from a vocab file."""

    def __init__(self, vocab_file: "str | Path", context_length: int = 256):
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary '{path}' is missing")
        self.tokenizer_mode = ""
        self.context_length = context_length
        self.clean_fn = get_clean_fn("whitespace")
        self.strip_sep_token = False
        self.tokenizer = _bert_tokenizer(path)


def _bert_tokenizer(vocab_path: Path):
    """A lower-casing WordPiece tokenizer from a vocab file (transformers 5 takes ``vocab``, 4.x ``vocab_file``)."""
    import inspect

    from transformers import BertTokenizerFast

    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        return BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True)
    return BertTokenizerFast(vocab_file=str(vocab_path), do_lower_case=True)


def biomedclip_input(images01: torch.Tensor) -> torch.Tensor:
    """(B, S, S) slices in [0, 1] -> (B, 3, S, S) with CLIP's mean/std."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01[:, None] - mean) / std


def write_vocab(words, path: "str | Path") -> Path:
    """A WordPiece vocabulary file: BERT's special tokens first, then the given tokens."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + [w for w in dict.fromkeys(words) if w not in specials]
    path = Path(path)
    path.write_text("\n".join(tokens) + "\n")
    return path
