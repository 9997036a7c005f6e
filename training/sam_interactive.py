"""SAM-style interactive training on image embeddings, shared by the MedSAM-like stand-in (which computes the
embeddings with its own encoder) and the LiteMedSAM prompt-head fine-tuning (which reads them from a cache).

:func:`interactive_step` is SAM's recipe: a first prompt per object (a jittered box, one click, or the prompts
propagation gives a slice from its neighbour), then corrective clicks in the current error with the previous mask
fed back, every round supervised (BCE + soft Dice on the mask, MSE on the predicted IoU). The click rules are
:mod:`PRISMRTLib.segmentation.prompts`', the ones the evaluation uses.

Coordinates follow segment_anything: points are (x=column, y=row) pixel indices of the model input and boxes are
(x0, y0, x1, y1) with inclusive pixel indices; the prompt encoder shifts both to pixel centres itself.
"""

from __future__ import annotations

import contextlib

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from PRISMRTLib.segmentation.prompts import corrective_click, first_click, jittered_box


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & target)) / total


def decode(model, embeddings: torch.Tensor, points=None, boxes=None, mask_input=None, multimask: bool = False):
    """Masks for a batch of images, one prompt set per image: (B, M, L, L) low-res logits and (B, M) predicted IoU.

    segment_anything's mask decoder takes one image and many prompts (it repeats the image embedding per prompt), so
    the per-image embeddings go in through the dense prompt (added to the image embedding there) with a zero image
    embedding: the same sum, computed by the unchanged decoder.
    """
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    return model.mask_decoder(
        image_embeddings=torch.zeros_like(embeddings[:1]),
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense + embeddings,
        multimask_output=multimask,
    )


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)


def points_tensor(clicks: list[list[tuple[int, int, int]]], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-image click lists of equal length (row, col, label) -> SAM's (coords (x, y), labels)."""
    if not clicks or not clicks[0]:
        return None
    arr = np.asarray(clicks, np.float32)  # (B, N, 3)
    coords = torch.from_numpy(arr[..., [1, 0]].copy()).to(device)
    return coords, torch.from_numpy(arr[..., 2].copy()).to(device)


def boxes_tensor(boxes, device) -> torch.Tensor | None:
    return None if boxes is None else torch.tensor(np.asarray(boxes, np.float32), device=device)


def select_masks(masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return masks[torch.arange(len(masks), device=masks.device), index][:, None]


def mask_prompt(mask: np.ndarray, size: int, scale: float = 8.0) -> torch.Tensor:
    """A binary mask as SAM's mask prompt: (1, 1, size, size) logits, +scale inside and -scale outside (area
    averaged), standing in for the low-res logits propagation feeds from the neighbouring slice."""
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    m = F.adaptive_avg_pool2d(m, size)
    return scale * (2 * m - 1)


def random_pixel(rng: np.random.Generator, shape) -> tuple[int, int]:
    return int(rng.integers(shape[0])), int(rng.integers(shape[1]))


def _disc(shape, centre, radius: float) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _morphology(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    f = sitk.BinaryDilateImageFilter() if grow else sitk.BinaryErodeImageFilter()
    f.SetKernelType(sitk.sitkBall)
    f.SetKernelRadius(int(radius))
    f.SetForegroundValue(1)
    f.SetNumberOfThreads(1)
    return sitk.GetArrayFromImage(f.Execute(image)).astype(bool)


def perturbed_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A good but imperfect mask of ``mask`` (2D), as a model's first mask or a propagated neighbour's often is: a
    leak (a disc on the boundary added, 0.3-0.8 of the structure's equivalent radius), a bite (such a disc taken
    away), both, or the whole boundary grown or shrunk by up to 15 % of that radius. Never empty."""
    mask = np.asarray(mask, bool)
    area = int(mask.sum())
    if area == 0:
        return mask.copy()
    radius = float(np.sqrt(area / np.pi))
    boundary = np.argwhere(mask & ~_morphology(mask, 1, grow=False))
    if len(boundary) == 0:
        boundary = np.argwhere(mask)
    out = mask.copy()
    kind = rng.choice(["leak", "bite", "both", "morphology"], p=[0.4, 0.2, 0.15, 0.25])
    if kind == "morphology":
        k = int(rng.integers(1, max(1, round(0.15 * radius)) + 1))
        out = _morphology(mask, k, grow=bool(rng.random() < 0.5))
    else:
        for change in (["leak", "bite"] if kind == "both" else [kind]):
            centre = boundary[int(rng.integers(len(boundary)))]
            disc = _disc(mask.shape, centre, float(rng.uniform(0.3, 0.8)) * radius)
            out = out | disc if change == "leak" else out & ~disc
    return out if out.any() else mask.copy()


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, M, S, S) logits, (B, 1, S, S) target -> (B, M) BCE + soft Dice."""
    t = target.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((2, 3))
    p = torch.sigmoid(logits)
    soft_dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
    return bce + soft_dice


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, M, S, S) bool, (B, 1, S, S) bool -> (B, M) IoU (1 when both are empty)."""
    inter = (pred & target).sum((2, 3)).float()
    union = (pred | target).sum((2, 3)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def interactive_step(model, embeddings: torch.Tensor, masks: np.ndarray, rngs: list[np.random.Generator], *,
                     p_box: float, iterations: int, iou_weight: float = 1.0,
                     sources: list[np.ndarray | None] | None = None, size: int | None = None,
                     grad_round: int | None = None, propagation_mask: bool = True,
                     refine: list[np.ndarray | None] | None = None) -> tuple[torch.Tensor, dict]:
    """SAM's interactive rounds for ``masks`` (N, S, S) on their images' ``embeddings`` (N, C, G, G): ``model`` has
    SAM's ``prompt_encoder`` and ``mask_decoder``; one generator per object; ``sources``: per object the neighbouring
    slice's mask it is prompted from as propagation does (None: a box with probability ``p_box``, else one click).
    Returns the loss averaged over rounds (to backpropagate) and per-round statistics.

    ``grad_round``: supervise that round only; the rounds before it run without gradients (to place its clicks) and
    those after it do not run, which costs about a third of supervising every round (a large decoder on a CPU).

    ``propagation_mask``: a propagation prompt carries the neighbour's mask as a mask prompt (False: its box and
    point only, as ``SegmentationSession`` prompts a slice under the ``box-point`` propagation rule).

    ``refine``: per object a good but imperfect first mask (:func:`perturbed_mask`) or None. Such an object starts
    where a user's second click does: that mask as the mask prompt, a positive click in the structure and the
    corrective click the mask's error calls for, so the decoder learns to mend a good mask, not only to grow a
    poor one (a negative click on a small leak removed 40 % of a good tumour mask)."""
    size = int(size or masks.shape[-1])
    device = embeddings.device
    target = torch.from_numpy(masks[:, None].astype(np.float32)).to(device)
    target_bool = target.bool()

    sources = list(sources) if sources is not None else [None] * len(rngs)
    refine = list(refine) if refine is not None else [None] * len(rngs)
    use_box = np.array([r.random() < p_box for r in rngs])
    kind = np.array(["propagate" if src is not None else "refine" if start is not None else "box" if b else "click"
                     for src, start, b in zip(sources, refine, use_box)])
    groups = [g for g in (np.flatnonzero(kind == k) for k in ("box", "click", "propagate", "refine")) if len(g)]
    low_size = model.prompt_encoder.mask_input_size[0]
    boxes, clicks, previous = {}, [[] for _ in rngs], {}
    for i in range(len(rngs)):
        if kind[i] == "box":
            boxes[i] = jittered_box(masks[i], rngs[i])
        elif kind[i] == "click":
            clicks[i].append((*first_click(masks[i], rngs[i]), 1))
        elif kind[i] == "refine":  # the second click on a good first mask
            clicks[i].append((*first_click(masks[i], rngs[i]), 1))
            click = corrective_click(refine[i], masks[i], rngs[i])
            clicks[i].append(click if click is not None else (*first_click(masks[i], rngs[i]), 1))
            previous[i] = mask_prompt(refine[i], low_size, float(rngs[i].uniform(4, 12))).to(device)
        else:  # as propagation: the neighbour's box, its deepest point (and its mask)
            boxes[i] = jittered_box(sources[i], rngs[i])
            clicks[i].append((*first_click(sources[i]), 1))
            if propagation_mask:
                previous[i] = mask_prompt(sources[i], low_size, float(rngs[i].uniform(4, 12))).to(device)

    total = torch.zeros((), device=device)
    stats = {"dice": [], "loss": []}
    rounds = iterations if grad_round is None else int(grad_round) + 1
    for it in range(rounds):
        round_loss, round_dice = torch.zeros((), device=device), np.zeros(len(rngs))
        context = torch.no_grad() if grad_round is not None and it < grad_round else contextlib.nullcontext()
        with context:
            for g in groups:
                group = kind[g[0]]
                multimask = it == 0 and group == "click"
                low, iou_pred = decode(
                    model, embeddings[g],
                    points=points_tensor([clicks[i] for i in g], device),
                    boxes=boxes_tensor([boxes[i] for i in g], device) if group in ("box", "propagate") else None,
                    mask_input=(torch.cat([previous[i] for i in g])
                                if it or group == "refine" or (group == "propagate" and propagation_mask)
                                else None),
                    multimask=multimask,
                )
                logits = upsample_logits(low, size)
                losses = mask_losses(logits, target[g])
                with torch.no_grad():
                    actual_iou = mask_iou(logits > 0, target_bool[g])
                iou_loss = F.mse_loss(iou_pred, actual_iou, reduction="none").mean(1)
                round_loss = round_loss + (losses.min(1).values + iou_weight * iou_loss).sum()
                # what a user would see (and what the next round refines): the mask the model rates best
                chosen = iou_pred.detach().argmax(1)
                low_chosen = select_masks(low.detach(), chosen)
                pred = (select_masks(logits.detach(), chosen)[:, 0] > 0).cpu().numpy()
                for k, i in enumerate(g):
                    previous[i] = low_chosen[k:k + 1]
                    round_dice[i] = dice(pred[k], masks[i])
                    if it + 1 < iterations:
                        click = corrective_click(pred[k], masks[i], rngs[i])
                        if click is None:  # exact already: confirm it with a click (keeps the counts equal)
                            click = ((*first_click(masks[i], rngs[i]), 1) if masks[i].any()
                                     else (*random_pixel(rngs[i], masks.shape[-2:]), 0))
                        clicks[i].append(click)
        round_loss = round_loss / len(rngs)
        if grad_round is None or it == grad_round:
            total = total + round_loss
        stats["loss"].append(float(round_loss.detach()))
        stats["dice"].append(float(round_dice.mean()))
    return total / (iterations if grad_round is None else 1), stats
