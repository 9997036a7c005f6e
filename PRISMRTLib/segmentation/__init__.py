"""Interactive delineation: clicks (and a box) on CT slices give masks at once; masks propagate into 3D.

- :mod:`.predictor`: features + prompts -> a slice mask (SAM's decoder, either backend);
- :mod:`.session`: one structure being drawn in one volume: history (undo/redo), propagation, cross views;
- :mod:`.prompts`: simulated clicks and boxes, shared by the evaluation and by training;
- :mod:`.quality`: warnings for poor results;
- :mod:`.evaluation` and :mod:`.cases`: ``prismrt eval-seg``.
"""

from .predictor import MASK_PROMPT_LOGIT, MaskPredictor, Prediction, SlicePrompts
from .session import (CrossViewGuide, PropagationReport, SegmentationSession, SliceResult, interior_point,
                      mask_box)

__all__ = [
    "MASK_PROMPT_LOGIT", "CrossViewGuide", "MaskPredictor", "Prediction", "PropagationReport", "SegmentationSession",
    "SlicePrompts", "SliceResult", "interior_point", "mask_box",
]
