"""Say when a result is poor, and why: checks on a slice's mask and on a propagation, worded for the user.

Nothing here changes a result; the CLI prints the warnings and the Slicer panel shows them beside the segment.
"""

from __future__ import annotations

import numpy as np

LOW_SCORE = 0.5  # predicted IoU below this: the model itself doubts the mask
BOX_FILLED = 0.97  # a box-prompted mask covering this share of its box found no boundary inside it
AIR_HU = -900.0  # a positive click below this on CT is on air (or lung parenchyma)
LARGE_SHARE = 0.5  # a mask covering this share of the slice is rarely a tumour or an organ at risk


def stability_score(logits: np.ndarray, offset: float = 1.0) -> float:
    """How little a mask changes when its logit threshold moves by +-``offset``: the IoU of the masks at +offset and
    at -offset (segment-anything's ``calculate_stability_score``, by which its automatic mask generator filters
    masks). 1.0 for an empty mask."""
    import torch
    from segment_anything.utils.amg import calculate_stability_score

    logits = torch.as_tensor(np.asarray(logits, np.float32))
    if not bool((logits > -offset).any()):
        return 1.0
    return float(calculate_stability_score(logits[None], 0.0, offset)[0])


def slice_warnings(mask: np.ndarray, score: float, *, index: int, orientation: str, clicks=(), box=None,
                   values_at_clicks=(), is_ct: bool = True) -> list[str]:
    """Warnings for one slice's mask. ``clicks``: [(row, col, label)] in slice pixels; ``box``: (r0, c0, r1, c1);
    ``values_at_clicks``: the image value under each click (HU on CT)."""
    where = f"{orientation} slice {index}"
    out = []
    if not mask.any():
        out.append(f"the mask on {where} is empty: the model found no structure at these prompts; click nearer the "
                   "middle of the structure, or draw a box around it")
        return out
    if score < LOW_SCORE:
        out.append(f"the model is unsure of the mask on {where} (predicted IoU {score:.2f}): check it, and add a "
                   "click where it is wrong")
    if box is not None:
        r0, c0, r1, c1 = (int(round(v)) for v in box)
        r0, c0 = max(r0, 0), max(c0, 0)
        inside = mask[r0:r1 + 1, c0:c1 + 1]
        if inside.size and inside.mean() >= BOX_FILLED:
            out.append(f"the mask on {where} fills the box: the model found no boundary inside it; draw a tighter "
                       "box, or click inside the structure")
    share = float(mask.mean())
    if share >= LARGE_SHARE:
        out.append(f"the mask covers {100 * share:.0f}% of {where}: that is rarely one structure; add a negative "
                   "click outside it, or start from a box")
    for (row, col, label), value in zip(clicks, values_at_clicks):
        if label != 1:
            continue
        r, c = int(round(row)), int(round(col))
        if is_ct and value is not None and value < AIR_HU:
            out.append(f"a positive click on {where} is on air ({value:.0f} HU): click on the structure itself")
        elif 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and not mask[r, c]:
            out.append(f"the mask on {where} leaves out your positive click at pixel ({r}, {c}): click again there, "
                       "or draw a box")
    return out


def propagation_warnings(slices: list[int], seed: int, orientation: str, stops: dict) -> list[str]:
    """Warnings for a propagation from slice ``seed`` that produced masks on ``slices``; ``stops``: direction
    (+1/-1) -> why it stopped there."""
    if len([s for s in slices if s != seed]) == 0:
        why = "; ".join(f"towards {'higher' if d > 0 else 'lower'} indices, {r}" for d, r in sorted(stops.items())
                        if r)
        return [f"propagation from {orientation} slice {seed} found the structure on no other slice ({why}): check "
                "the seed slice's mask, or click on the neighbouring slices"]
    return []
