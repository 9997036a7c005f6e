"""Which of SAM's three masks should a first click keep? Chosen on the validation views (the cache's last shards,
never trained on), not on the evaluation's CTs.

A single click is ambiguous (a part, the structure, what contains it), so SAM answers it with three masks and a
predicted IoU for each. This scores, per validation object, the first click at its deepest point: the mask with the
highest predicted IoU (SAM's rule), each fixed output, and the best of the three (an oracle, for reference).

    python -m training.litemedsam_clicks.first_click --cache training/runs/litemedsam_cache --model litemedsam-clicks
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from PRISMRTLib.features.resolve import model_folder
from PRISMRTLib.models.bundle import load_bundle
from PRISMRTLib.segmentation.prompts import first_click
from training.sam_interactive import decode, dice, points_tensor

from .cache import CacheReader, unpack_masks
from .train import CacheData


@torch.no_grad()
def score(model, data: CacheData) -> dict:
    out = {"predicted IoU": [], "output 0": [], "output 1": [], "output 2": [], "best of three": []}
    for m in data.clickable:
        emb = data.embeddings[int(data.owner[m])][None].float()
        target = unpack_masks(data.masks[m:m + 1])[0][1]
        low, iou = decode(model, emb, points=points_tensor([[(*first_click(target), 1)]], "cpu"), multimask=True)
        scores = [dice((low[0, k] > 0).numpy(), target) for k in range(3)]
        out["predicted IoU"].append(scores[int(iou[0].argmax())])
        for k in range(3):
            out[f"output {k}"].append(scores[k])
        out["best of three"].append(max(scores))
    return {k: float(np.mean(v)) for k, v in out.items()} | {"objects": len(data.clickable)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--model", default="litemedsam-clicks")
    p.add_argument("--holdout-shards", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    reader = CacheReader(args.cache)
    data = CacheData(reader, reader.files[-args.holdout_shards:])
    model = load_bundle(model_folder(args.model)).modules["sam"]
    result = score(model, data)
    print(f"first click on {result.pop('objects')} validation objects ({args.model}):")
    print("| first-click mask | Dice |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
