"""How should a corrective click change the mask? Chosen on the validation views (the cache's last shards, never
trained on), not on the evaluation's CTs.

SAM answers a corrective click with a whole new mask. On the clinical GTVs a negative click on a small leak could
take away a third of the tumour (LUNG1-001, central slice: 0.89 -> 0.70 on the second click). FocalClick's
progressive merge (:func:`progressive_merge`) keeps the previous mask except for the connected piece of change under
the click. This scores both rules on the validation objects with the evaluation's
click rules (the first click at the deepest point, the lone-click rule, then each click at the deeper error). The
logits the next click refines follow the mask shown: +-8 where it differs from the model's (``SegmentationSession``
pushes what its rules cut to -8 on the decoder's grid; at 256 px that grid is this one).

    python -m training.litemedsam_clicks.corrective_merge --cache training/runs/litemedsam_cache --model litemedsam-clicks

The validation views are mostly organs whose first mask is poor; the objects whose first click is already good
(``--good-first``, Dice 0.8) are reported apart, since protecting a good mask is what the clinical GTVs ask of a
correction. A held-out cache alone is enough (``cache build --last-shards 2``). ``--rules replace`` scores SAM's
rule alone (a third of the time) and ``--compare OTHER.json`` sets a model beside another's saved ``--out``, object
for object (a candidate against the shipped heads)::

    python -m training.litemedsam_clicks.corrective_merge --cache CACHE --model CANDIDATE --rules replace \
        --compare SHIPPED.json --out CANDIDATE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from PRISMRTLib.features.resolve import model_folder
from PRISMRTLib.models.bundle import load_bundle
from PRISMRTLib.segmentation.predictor import MASK_PROMPT_LOGIT
from PRISMRTLib.segmentation.prompts import corrective_click, first_click
from PRISMRTLib.segmentation.session import _component_at
from training.sam_interactive import decode, dice, points_tensor

from .cache import CacheReader, unpack_masks
from .train import CacheData

RULES = ("replace", "progressive", "progressive-negative")  # the last: only negative clicks merged


def progressive_merge(new: np.ndarray, previous: np.ndarray, pixel) -> np.ndarray:
    """A corrective click's mask, changed only where the click is: FocalClick's progressive merge (Chen et al.,
    CVPR 2022). Of the pixels where the model's ``new`` mask differs from the ``previous`` one, only the connected
    piece under the click at ``pixel`` (row, col) is taken: removed from ``previous`` when the click fell inside it
    (a negative click on an extra region), added otherwise. When the model did not change the clicked pixel, its
    mask is returned as it is (the click did not take where it was put; blocking it would hide that)."""
    r = min(max(int(round(float(pixel[0]))), 0), new.shape[0] - 1)
    c = min(max(int(round(float(pixel[1]))), 0), new.shape[1] - 1)
    changed = new != previous
    if not changed[r, c]:
        return new
    piece = _component_at(changed, (r, c))
    return previous & ~piece if previous[r, c] else previous | piece


def _shown_logits(logits: np.ndarray, model_mask: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """The logits the next click refines: the model's, except where the mask shown differs from the model's."""
    return np.where(model_mask != shown, np.where(shown, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT), logits)


@torch.no_grad()
def run_object(model, embedding: torch.Tensor, target: np.ndarray, rule: str, clicks: int = 5,
               labels: list | None = None) -> list[float]:
    """Dice after each of ``clicks`` clicks on one object under ``rule``; each click's label (1 positive, 0
    negative, -1 none: exact already) is appended to ``labels`` when given."""
    history, scores, shown, logits = [], [], None, None
    for n in range(clicks):
        click = (*first_click(target), 1) if n == 0 else corrective_click(shown, target)
        if labels is not None:
            labels.append(-1 if click is None else int(click[2]))
        if click is None:  # exact already
            scores.append(scores[-1])
            continue
        history.append(click)
        mask_input = None if logits is None else torch.from_numpy(logits)[None, None]
        low, iou = decode(model, embedding, points=points_tensor([history], "cpu"), mask_input=mask_input,
                          multimask=n == 0)
        best = int(iou[0].argmax())
        raw = low[0, best].numpy()
        model_mask = raw > 0
        if n == 0:  # the lone-click rule, as the session applies it
            new = _component_at(model_mask, click[:2])
        elif rule == "progressive" or (rule == "progressive-negative" and click[2] == 0):
            new = progressive_merge(model_mask, shown, click[:2])
        else:
            new = model_mask
        logits, shown = _shown_logits(raw, model_mask, new).astype(np.float32), new
        scores.append(dice(shown, target))
    return scores


def score(model, data: CacheData, clicks: int = 5, max_objects: int | None = None, rules=RULES) -> dict:
    chosen = data.clickable
    if max_objects:
        chosen = chosen[:: max(1, len(chosen) // max_objects)][:max_objects]
    if "replace" not in rules:
        raise ValueError("the rules scored must include 'replace' (the others are compared with it)")
    out = {rule: [] for rule in rules}
    second = []
    for m in chosen:
        emb = data.embeddings[int(data.owner[m])][None].float()
        target = unpack_masks(data.masks[m:m + 1])[0][1]
        for rule in rules:
            labels = [] if rule == "replace" else None  # the first two clicks are the same under every rule
            out[rule].append(run_object(model, emb, target, rule, clicks, labels))
            if labels is not None:
                second.append(labels[1] if clicks > 1 else -1)
    result = {rule: np.asarray(v) for rule, v in out.items()}
    result["second_click"] = np.asarray(second)
    return result


def subsets(result: dict, good_first: float) -> dict[str, np.ndarray]:
    """Which objects each table covers: all; those whose first click already gives Dice >= ``good_first`` (a good
    first mask, as on the clinical GTVs, where a correction should change little); and of those the ones whose
    second click is negative (a cut into a good mask: LUNG1-001's case)."""
    first = result["replace"][:, 0]
    good = first >= good_first
    return {"all": np.ones(len(first), bool), f"first click >= {good_first:g}": good,
            f"first click >= {good_first:g}, second click negative": good & (result["second_click"] == 0)}


def compare(result: dict, other: dict, good_first: float, name: str) -> None:
    """This model against another's saved run on the same objects, under SAM's rule: mean Dice after each click,
    objects better / worse and the paired Wilcoxon p; the subsets are chosen by the other model's first click."""
    from scipy.stats import wilcoxon

    theirs, ours = np.asarray(other["replace"]), result["replace"]
    if theirs.shape != ours.shape:
        raise SystemExit(f"--compare: {other.get('model')} was scored on {theirs.shape[0]} objects x "
                         f"{theirs.shape[1]} clicks, this run on {ours.shape[0]} x {ours.shape[1]}: "
                         "use the same cache, --holdout-shards, --clicks and --max-objects")
    for title, keep in subsets({"replace": theirs, "second_click": np.asarray(other["second_click"])},
                               good_first).items():
        diff = (ours - theirs)[keep]
        p_values = [wilcoxon(d).pvalue if np.any(np.abs(d) > 1e-9) else 1.0 for d in diff.T]
        print(f"\n{name} against {other.get('model')} on {int(keep.sum())} objects ({title} for "
              f"{other.get('model')}), SAM's rule:")
        print("| model | " + " | ".join(str(k) for k in range(1, ours.shape[1] + 1)) + " |")
        print("|---|" + "---|" * ours.shape[1])
        for label, values in ((other.get("model"), theirs), (name, ours)):
            print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in values[keep].mean(0)) + " |")
        print("| better / worse (p) | " + " | ".join(f"{int((d > 1e-9).sum())}/{int((d < -1e-9).sum())} ({pv:.2g})"
                                                 for d, pv in zip(diff.T, p_values)) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--model", default="litemedsam-clicks")
    p.add_argument("--holdout-shards", type=int, default=2)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--max-objects", type=int)
    p.add_argument("--good-first", type=float, default=0.8,
                   help="also report the objects whose first-click Dice is at least this (a good first mask)")
    p.add_argument("--out", type=Path, help="write the per-object Dice here (.json)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="which rules to score ('replace' "
                   "always: SAM's rule, the model's new mask)")
    p.add_argument("--compare", type=Path, help="another model's --out on the same objects: compare SAM's rule "
                   "object for object (subsets by that model's first click)")
    args = p.parse_args(argv)
    rules = tuple(r for r in RULES if r in set(args.rules) | {"replace"})
    torch.set_num_threads(args.threads)
    reader = CacheReader(args.cache)
    data = CacheData(reader, reader.files[-args.holdout_shards:])
    model = load_bundle(model_folder(args.model)).modules["sam"]
    result = score(model, data, args.clicks, args.max_objects, rules)
    n = len(result["replace"])
    from scipy.stats import wilcoxon

    for title, keep in subsets(result, args.good_first).items():
        print(f"\ncorrective clicks on {int(keep.sum())} of {n} validation objects ({title}; {args.model}), "
              "mean Dice after each click:")
        print("| rule | " + " | ".join(f"{k} click{'s' if k > 1 else ''}" for k in range(1, args.clicks + 1)) + " |")
        print("|---|" + "---|" * args.clicks)
        for rule in rules:
            print(f"| {rule} | " + " | ".join(f"{x:.3f}" for x in result[rule][keep].mean(0)) + " |")
        for rule in rules[1:]:
            diff = (result[rule] - result["replace"])[keep]
            p_values = [wilcoxon(d).pvalue if np.any(np.abs(d) > 1e-9) else 1.0 for d in diff.T]
            print(f"objects better / worse with {rule} than replace, per click (paired Wilcoxon p): "
                  + ", ".join(f"{int((d > 1e-9).sum())}/{int((d < -1e-9).sum())} ({pv:.2g})"
                              for d, pv in zip(diff.T, p_values)))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "cache": str(args.cache), "objects": n,
                                        **{rule: v.tolist() for rule, v in result.items()}}))
    if args.compare:
        compare(result, json.loads(args.compare.read_text()), args.good_first, args.model)


if __name__ == "__main__":
    main()
