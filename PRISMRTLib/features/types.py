"""The features every task reads, whichever backend computed them (field names follow the registry's roles)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..imaging.resize import Letterbox
from ..models.registry import ROLE_OUTPUTS, ROLES


@dataclass
class SliceFeatures:
    sam_embedding: torch.Tensor  # (B, C, G, G): the SAM teacher's image embedding (256 x 64 x 64 for LiteMedSAM)
    dino_cls: torch.Tensor  # (B, D): the DINO teacher's CLS token
    dino_patches: torch.Tensor  # (B, D, Gd, Gd): its dense patch features
    clip_cls: torch.Tensor  # (B, W): the CLIP teacher's image feature before its projection
    clip_patches: torch.Tensor  # (B, W, Gc, Gc): its patch tokens
    clip_embedding: torch.Tensor  # (B, E): in its joint image-text space (not normalised)
    letterbox: Letterbox  # the slice's place in the model grids, at the SAM teacher's input size

    TENSORS = tuple(name for role in ROLES for name in ROLE_OUTPUTS[role])  # a field is None when not computed

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {name: None if getattr(self, name) is None else tuple(getattr(self, name).shape) for name in self.TENSORS}

    def __len__(self) -> int:
        return next(getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None).shape[0]

    def select(self, index) -> "SliceFeatures":
        """A sub-batch (``index`` an int or slice), keeping the batch dimension."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return SliceFeatures(**{n: None if getattr(self, n) is None else getattr(self, n)[index] for n in self.TENSORS},
                             letterbox=self.letterbox)

    @staticmethod
    def concat(parts: "list[SliceFeatures]") -> "SliceFeatures":
        def cat(name):
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return SliceFeatures(**{n: cat(n) for n in SliceFeatures.TENSORS}, letterbox=parts[0].letterbox)
