"""What the training view planners share: window presets per source and the weighted draw.

Used by the click fine-tuning cache (``training/litemedsam_clicks/cache.py``) and the distillation's target cache
(``training/distill/targets.py``); both plans are counter-based, so changing a value here changes every plan drawn
after it (bump the planner's PLAN_VERSION).
"""

from __future__ import annotations

import numpy as np

# window presets (level, width) and their weights per source: the ones a reader of that anatomy would use, mostly
WINDOWS = {"soft-tissue": (40, 400), "lung": (-600, 1500), "head-and-neck": (60, 350), "bone": (400, 1800)}
WINDOW_WEIGHTS = {
    "openkbp": {"soft-tissue": 0.45, "head-and-neck": 0.4, "bone": 0.05, "lung": 0.1},
    "lung1": {"soft-tissue": 0.45, "lung": 0.45, "bone": 0.05, "head-and-neck": 0.05},
    "ts_abdomen": {"soft-tissue": 0.75, "head-and-neck": 0.1, "lung": 0.05, "bone": 0.1},
    "ts_aorta": {"soft-tissue": 0.7, "head-and-neck": 0.1, "lung": 0.1, "bone": 0.1},
}


def weighted_choice(rng: np.random.Generator, weights: dict):
    """One key of ``weights`` drawn with probability proportional to its value (one ``rng.choice`` call)."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]
