"""The SAM-style predictor: one slice's features + prompts -> a mask on that slice, as segment_anything's
``SamPredictor`` does, but for either feature backend and in slice pixel coordinates.

Prompts are in slice pixels (row, col; pixel centres at integers); they reach the model grid through the features'
:class:`~PRISMRTLib.imaging.Letterbox` and masks come back through its exact inverse. A single click without a box
or a mask asks for SAM's three masks and keeps the one the model rates best (its predicted IoU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..features import FeatureBackend, SliceFeatures

MASK_PROMPT_LOGIT = 8.0  # a mask given as a prompt: +-8 logits inside/outside (the middle of the trained 4-12)


@dataclass
class SlicePrompts:
    """Prompts on one slice, in slice pixel coordinates (row, col)."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None = None  # (row0, col0, row1, col1), pixel centres, inclusive

    def copy(self) -> "SlicePrompts":
        return SlicePrompts(list(self.points), list(self.labels), self.box)

    def empty(self) -> bool:
        return not self.points and self.box is None


@dataclass
class Prediction:
    mask: np.ndarray  # (rows, cols) bool on the slice
    score: float  # the model's predicted IoU of the chosen mask
    logits: np.ndarray  # the chosen low-resolution logits, on the model's mask grid (feed back as a mask prompt)


class MaskPredictor:
    """Masks from prompts on slices whose features a backend computed."""

    def __init__(self, backend: FeatureBackend):
        self.backend = backend

    @property
    def mask_grid(self) -> int:
        size = getattr(self.backend.prompt_encoder, "mask_input_size", None)
        return int(size[0]) if size is not None else 0

    @torch.inference_mode()
    def predict(self, features: SliceFeatures, prompts: SlicePrompts,
                mask_logits: np.ndarray | None = None) -> Prediction:
        """The mask for ``prompts`` on the slice of ``features`` (a batch of one); ``mask_logits``: low-resolution
        logits of an earlier mask (refinement) or of :meth:`mask_prompt`."""
        box = features.letterbox
        be = self.backend
        device = be.device
        points = boxes = masks = None
        if prompts.points:
            rc = box.to_model(np.array(prompts.points, float))
            coords = torch.tensor(rc[:, ::-1].copy(), dtype=torch.float32, device=device)[None]  # SAM takes (x, y)
            labels = torch.tensor(prompts.labels, dtype=torch.int64, device=device)[None]
            points = (coords, labels)
        if prompts.box is not None:
            r0, c0, r1, c1 = prompts.box
            (mr0, mc0), (mr1, mc1) = box.to_model(np.array([[r0, c0], [r1, c1]], float))
            boxes = torch.tensor([[mc0, mr0, mc1, mr1]], dtype=torch.float32, device=device)
        if mask_logits is not None:
            masks = torch.from_numpy(np.asarray(mask_logits, np.float32)).to(device)[None, None]
        multimask = len(prompts.points) == 1 and prompts.box is None and masks is None
        sparse, dense = be.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, iou = be.mask_decoder(
            image_embeddings=features.sam_embedding.to(device),
            image_pe=be.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = int(torch.argmax(iou[0]))
        logits = low_res[0, best].float().cpu().numpy()
        mask = box.resize_to_slice(logits, order=1) > 0.0
        return Prediction(mask, float(iou[0, best]), logits)

    def mask_prompt(self, features: SliceFeatures, mask: np.ndarray) -> np.ndarray:
        """A slice mask as SAM's mask prompt: +-MASK_PROMPT_LOGIT on the model's low-resolution grid (area-averaged
        at the edges). Propagation feeds a neighbour's *mask* this way, as the models were trained, rather than its
        raw logits, whose scale (tens) no training prompt had."""
        low = self.mask_grid or 4 * int(features.sam_embedding.shape[-1])
        frac = features.letterbox.at_size(low).resize_to_model(mask.astype(np.float32), order=1, pad_value=0.0)
        return (MASK_PROMPT_LOGIT * (2.0 * np.clip(frac, 0.0, 1.0) - 1.0)).astype(np.float32)
