"""Re-fit the IoU head of the fine-tuned LiteMedSAM so that a lone click keeps the best of SAM's three masks.

One click is ambiguous, so SAM answers it with three masks (a part, the structure, what contains it) and a predicted
IoU for each; the mask shown is the one rated highest. After the fine-tuning, the head rates the middle mask first
almost always: on the validation views that rule gives Dice 0.537 where the best of the three would give 0.663
(``first_click.py``). The masks themselves are good; the choice is what loses.

This fits only the part of the IoU head that scores the three first-click masks: the last linear layer's rows 1-3
(``mask_decoder.iou_prediction_head.layers[-1]``), on the frozen hidden features the head computes for first clicks
on the training views. Everything else is unchanged, bit for bit: the masks of every prompt, and the single-mask IoU
(row 0) that corrective clicks, boxes and propagation report. The loss is SAM's (MSE against each mask's actual IoU)
plus a ranking term (cross-entropy of the three scores against the best mask), since ranking is what the choice needs.

    python -m training.litemedsam_clicks.iou_head extract --cache training/runs/litemedsam_cache \
        --model training/runs/litemedsam-clicks-1 --out training/runs/litemedsam_iou_head
    python -m training.litemedsam_clicks.iou_head fit --run training/runs/litemedsam_iou_head \
        --model training/runs/litemedsam-clicks-1
    python -m training.litemedsam_clicks.iou_head export --run training/runs/litemedsam_iou_head \
        --model training/runs/litemedsam-clicks-1 --out training/runs/litemedsam-clicks-2

``--model``: the bundle whose head is re-fitted, version 1 (``train.py export`` of the training run; it shipped as
``litemedsam-clicks`` until this re-fit replaced it). Version 2 shipped from ``shipped/litemedsam-clicks/2`` until
version 3 replaced it; it is kept in ``training/litemedsam_clicks/superseded/litemedsam-clicks-2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from PRISMRTLib.features.resolve import model_folder
from PRISMRTLib.models.bundle import load_bundle
from PRISMRTLib.segmentation.prompts import first_click
from training.sam_interactive import decode, points_tensor

from .cache import CacheReader, unpack_masks
from .train import CacheData

FEATURES = "features.npz"
HEAD = "iou_rows.safetensors"
FIT_LOG = "fit.json"


def _last_layer(model):
    return model.mask_decoder.iou_prediction_head.layers[-1]


@torch.no_grad()
def extract_features(model, data: CacheData, objects: np.ndarray, random_clicks: int, seed: int,
                     batch: int = 16, verbose: bool = True) -> dict:
    """Per first click on each of ``objects`` (masks of ``data``): the IoU head's last hidden features (N, H), the
    actual IoU and Dice of the three masks (N, 3), the object's area on the 256 px grid, and which click it was
    (0: the deepest point, as evaluation places it; 1..: random interior points, as training places them)."""
    captured = []
    hook = _last_layer(model).register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].detach()))
    rows = {"hidden": [], "iou": [], "dice": [], "area": [], "click": [], "mask": []}
    jobs = [(int(m), c) for m in objects for c in range(1 + random_clicks)]
    t0 = time.perf_counter()
    try:
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            targets = [unpack_masks(data.masks[m:m + 1])[0][1] for m, _ in chunk]
            clicks = []
            for (m, c), target in zip(chunk, targets):
                rng = None if c == 0 else np.random.default_rng([seed, m, c])
                clicks.append([(*first_click(target, rng), 1)])
            emb = data.embeddings[torch.as_tensor([int(data.owner[m]) for m, _ in chunk])].float()
            captured.clear()
            low, _ = decode(model, emb, points=points_tensor(clicks, "cpu"), multimask=True)
            pred = (low > 0).numpy()  # (B, 3, 256, 256)
            truth = np.stack(targets)[:, None].astype(bool)
            inter = (pred & truth).sum((-2, -1))
            union = (pred | truth).sum((-2, -1))
            total = pred.sum((-2, -1)) + truth.sum((-2, -1))
            rows["hidden"].append(captured[-1].numpy())
            rows["iou"].append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
            rows["dice"].append(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0))
            rows["area"].append(truth.sum((-3, -2, -1)))
            rows["click"].append([c for _, c in chunk])
            rows["mask"].append([m for m, _ in chunk])
            if verbose and (start // batch) % 20 == 0:
                print(f"{start + len(chunk)}/{len(jobs)} clicks, {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        hook.remove()
    return {k: np.concatenate([np.asarray(v) for v in vs]) for k, vs in rows.items()}


def choice_dice(scores: np.ndarray, dice: np.ndarray) -> float:
    """Mean Dice of the mask each row's highest score picks."""
    return float(dice[np.arange(len(dice)), scores.argmax(1)].mean())


def fit_rows(weight: torch.Tensor, bias: torch.Tensor, hidden: np.ndarray, iou: np.ndarray, *, rank_weight: float,
             temperature: float, weight_decay: float, epochs: int, lr: float = 1e-3, seed: int = 0):
    """Rows 1-3 of the last layer (starting from ``weight``/``bias``), fitted to MSE(score, IoU) + rank_weight *
    CE(softmax(score / temperature), best mask), with an L2 pull towards the starting rows."""
    torch.manual_seed(seed)
    x, y = torch.from_numpy(hidden).float(), torch.from_numpy(iou).float()
    w0, b0 = weight[1:4].clone().float(), bias[1:4].clone().float()
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    best = y.argmax(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            s = x[idx] @ w.T + b
            loss = F.mse_loss(s, y[idx]) + rank_weight * F.cross_entropy(s / temperature, best[idx])
            loss = loss + weight_decay * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def _load(model_name: str):
    return load_bundle(model_folder(model_name)).modules["sam"].eval()


def extract(cache: Path, out: Path, model_name: str, train_objects: int, random_clicks: int, holdout_shards: int,
            seed: int = 0) -> None:
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(cache)
    model = _load(model_name)
    held = CacheData(reader, reader.files[-holdout_shards:])
    val = extract_features(model, held, held.clickable, 0, seed)
    train = CacheData(reader, reader.files[:-holdout_shards])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(train.clickable, min(train_objects, len(train.clickable)), replace=False))
    tr = extract_features(model, train, chosen, random_clicks, seed)
    np.savez_compressed(out / FEATURES, **{f"train_{k}": v for k, v in tr.items()},
                        **{f"val_{k}": v for k, v in val.items()})
    (out / "extract.json").write_text(json.dumps({"cache": str(cache), "model": model_name, "seed": seed,
                                                  "train_objects": int(len(chosen)), "random_clicks": random_clicks,
                                                  "holdout_shards": holdout_shards}, indent=2))


def _area_bands(area: np.ndarray) -> dict:
    return {"< 500 px": area < 500, "500-2000 px": (area >= 500) & (area < 2000), ">= 2000 px": area >= 2000}


def fit(run: Path, model_name: str, rank_weights=(0.0, 0.1, 0.3, 1.0), temperature: float = 0.1,
        weight_decay: float = 1e-3, epochs: int = 30) -> dict:
    f = np.load(run / FEATURES)
    tr = {k[6:]: f[k] for k in f.files if k.startswith("train_")}
    val = {k[4:]: f[k] for k in f.files if k.startswith("val_")}
    layer = _last_layer(_load(model_name))
    w_full, b_full = layer.weight.detach(), layer.bias.detach()
    start = (val["hidden"] @ w_full[1:4].T.numpy() + b_full[1:4].numpy())
    rows = {"shipped head (v1)": choice_dice(start, val["dice"]),
            "best of three (oracle)": float(val["dice"].max(1).mean())}
    for k in range(3):
        rows[f"output {k}"] = float(val["dice"][:, k].mean())
    fits = {}
    for rw in rank_weights:
        w, b = fit_rows(w_full, b_full, tr["hidden"], tr["iou"], rank_weight=rw, temperature=temperature,
                        weight_decay=weight_decay, epochs=epochs)
        scores = val["hidden"] @ w.T.numpy() + b.numpy()
        name = f"re-fit, rank weight {rw}"
        rows[name] = choice_dice(scores, val["dice"])
        mse = float(((scores - val["iou"]) ** 2).mean())
        fits[name] = {"w": w, "b": b, "val_dice": rows[name], "val_iou_mse": mse, "rank_weight": rw}
    best_name = max(fits, key=lambda n: fits[n]["val_dice"])
    best = fits[best_name]
    bands = {}
    best_scores = val["hidden"] @ best["w"].T.numpy() + best["b"].numpy()
    for band, sel in _area_bands(val["area"]).items():
        if sel.any():
            bands[band] = {"objects": int(sel.sum()), "v1": choice_dice(start[sel], val["dice"][sel]),
                           "re-fit": choice_dice(best_scores[sel], val["dice"][sel]),
                           "oracle": float(val["dice"][sel].max(1).mean())}
    from safetensors.torch import save_file

    save_file({"weight": best["w"].contiguous(), "bias": best["b"].contiguous()}, str(run / HEAD),
              metadata={"rank_weight": str(best["rank_weight"]), "temperature": str(temperature)})
    log = {"validation_objects": int(len(val["dice"])), "training_clicks": int(len(tr["dice"])),
           "choice_dice": rows, "chosen": best_name, "by_area": bands,
           "val_iou_mse": {n: v["val_iou_mse"] for n, v in fits.items()},
           "settings": {"temperature": temperature, "weight_decay": weight_decay, "epochs": epochs}}
    (run / FIT_LOG).write_text(json.dumps(log, indent=2))
    return log


def export(run: Path, out: Path, model_name: str = "litemedsam-clicks", version: str = "2") -> Path:
    """The fine-tuned heads with the re-fitted first-click IoU rows, as a ``teachers`` bundle on the litemedsam base."""
    from safetensors.torch import load_file

    from PRISMRTLib.models.bundle import save_bundle
    from PRISMRTLib.models.registry import get_teacher, spec_record

    from .train import released_litemedsam

    bundle = load_bundle(model_folder(model_name))
    source = bundle.modules["sam"]
    model = released_litemedsam()  # float32 modules, with the released image encoder (the base, not saved)
    model.prompt_encoder.load_state_dict(source.prompt_encoder.state_dict())
    model.mask_decoder.load_state_dict(source.mask_decoder.state_dict())
    rows = load_file(str(run / HEAD))
    with torch.no_grad():
        _last_layer(model).weight[1:4] = rows["weight"]
        _last_layer(model).bias[1:4] = rows["bias"]
    meta = dict(bundle.meta)
    meta["iou_head"] = {"re-fitted by": "training/litemedsam_clicks/iou_head.py", "from": f"{model_name} "
                        f"{bundle.version}", **json.loads((run / FIT_LOG).read_text())}
    folder = save_bundle(out, "teachers", {"teachers": {"sam": spec_record(get_teacher("litemedsam"))}},
                         {"sam": model}, None, name=model_name, version=version, meta=meta, overwrite=True,
                         float_dtype=torch.float16,
                         base={"model": "litemedsam", "version": "1", "components": ["sam.image_encoder"]})
    load_bundle(folder)
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--cache", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--model", default="litemedsam-clicks")
    e.add_argument("--train-objects", type=int, default=1500)
    e.add_argument("--random-clicks", type=int, default=1)
    e.add_argument("--holdout-shards", type=int, default=2)
    f = sub.add_parser("fit")
    f.add_argument("--run", type=Path, required=True)
    f.add_argument("--model", default="litemedsam-clicks")
    x = sub.add_parser("export")
    x.add_argument("--run", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--model", default="litemedsam-clicks")
    x.add_argument("--version", default="2")
    args = p.parse_args(argv)
    if args.command == "extract":
        extract(args.cache, args.out, args.model, args.train_objects, args.random_clicks, args.holdout_shards)
    elif args.command == "fit":
        log = fit(args.run, args.model)
        print(json.dumps(log, indent=2))
    else:
        print(export(args.run, args.out, args.model, args.version))


if __name__ == "__main__":
    main()
