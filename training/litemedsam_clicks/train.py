"""Fine-tune LiteMedSAM's prompt encoder and mask decoder for clicks, corrections and propagation prompts.

LiteMedSAM was released for boxes: one click gives Dice 0.00-0.16. Its image encoder stays frozen (the embedding
space stays the teacher's, which the distillation reproduces), so training reads image embeddings from the cache
(:mod:`.cache`) and runs SAM's interactive recipe on them (:func:`training.sam_interactive.interactive_step`, the
click rules of :mod:`PRISMRTLib.segmentation.prompts`, shared with ``prismrt eval-seg``):

- each step takes ``batch_size`` objects, one structure of one cached view each (counter-based: step ``s`` depends
  only on the seed and ``s``, so a run resumes exactly);
- a share ``p_propagate`` is prompted as propagation prompts a slice: the neighbouring slice's box, deepest point
  and mask (as +-4..12 logits; ``propagation_prompt="box-point"``: without the mask, as delineation now prompts
  with these heads), the target being this slice's mask, empty where the structure ended; the rest start
  from a jittered box (``p_box``) or one click, then ``iterations - 1`` corrective clicks with the previous mask fed
  back (``p_refine``: a share of the click objects start instead from a good imperfect mask and its corrective
  click, as a user's second click does; ``propagation_noise``: a share of the propagation sources are such masks,
  as a propagated neighbour is); BCE + soft Dice on the 256 px mask and MSE on the predicted IoU, on one round per step drawn at random
  (the rounds before it place its clicks without gradients; ``all_rounds`` supervises every round instead);
- the last ``holdout_shards`` shards of the cache are not trained on and are scored every ``eval_every`` steps: a
  validation of other views of the same training CTs, not a test (that is ``prismrt eval-seg`` on held-out CTs).

The image encoder's weights are the released ones; the result is exported as a bundle that holds only the two heads
and takes the encoder from the ``litemedsam`` model (each user's conversion of the released checkpoint)::

    python -m training.litemedsam_clicks.train train --cache training/runs/litemedsam_cache --out training/runs/litemedsam_clicks --steps 3000
    python -m training.litemedsam_clicks.train export --run training/runs/litemedsam_clicks --out training/runs/litemedsam-clicks-1  (version 1; then iou_head.py)
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from PRISMRTLib.models.litemedsam import (LITEMEDSAM_PRESETS, build_litemedsam, read_released_checkpoint,
                                          released_checkpoint_path)
from PRISMRTLib.segmentation.prompts import corrective_click, first_click, tight_box
from training.sam_interactive import (boxes_tensor, decode, dice, interactive_step, mask_prompt, perturbed_mask,
                                     points_tensor)
from training.standins.runfiles import open_curves, save_atomic, save_curves, write_json

from .cache import ITEMS_PER_SHARD, MIN_PIXELS, CacheReader, unpack_masks

HEADS_FILE = "heads.safetensors"
CHECKPOINT = "checkpoint.pt"
LOG = "train_log.json"


class Heads(nn.Module):
    """LiteMedSAM's prompt encoder and mask decoder (what is trained), under the released state dict's names."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def released_litemedsam():
    model = build_litemedsam(LITEMEDSAM_PRESETS["released"])
    model.load_state_dict(read_released_checkpoint(released_checkpoint_path()), strict=True)
    return model


PROPAGATION_PROMPTS = ("mask-prompt", "box-point")  # registry.propagation_rule's names


def read_heads(source: "str | Path") -> dict[str, torch.Tensor]:
    """Heads' weights (float32, under :class:`Heads`' names) from a run's ``heads.safetensors``, or from a bundle
    (a folder or a manifest name, e.g. the shipped ``litemedsam-clicks``) loaded as PRISMRTLib loads it."""
    from PRISMRTLib.features.resolve import model_folder
    from PRISMRTLib.models.bundle import load_bundle

    source = str(source)
    path = Path(source)
    if path.is_file():
        return {k: v.float() for k, v in load_file(str(path)).items()}
    if not path.is_dir() and ("/" in source or source.endswith(".safetensors")):
        raise SystemExit(f"--init {source}: no such file or folder")
    sam = load_bundle(model_folder(source)).modules.get("sam")
    if sam is None:
        raise SystemExit(f"--init {source} holds no SAM heads: give a bundle of litemedsam_clicks' export, "
                         f"'litemedsam-clicks', or a run's {HEADS_FILE}")
    return {k: v.float() for k, v in Heads(sam.prompt_encoder, sam.mask_decoder).state_dict().items()}


@dataclass
class Settings:
    steps: int = 3000
    seed: int = 0
    batch_size: int = 12
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    iterations: int = 4
    p_propagate: float = 0.3
    p_box: float = 0.3
    iou_weight: float = 1.0
    clip: float = 1.0
    all_rounds: int = 0  # 1: supervise every round; 0: one random round per step, about a third of the cost
    holdout_shards: int = 2
    init: str = ""  # start from these heads (a bundle folder or a heads.safetensors); "": the released LiteMedSAM
    propagation_prompt: str = "mask-prompt"  # box, point and the neighbour's mask; "box-point": box and point only
    p_refine: float = 0.0  # share of non-propagation objects that start from a good imperfect mask (a 2nd click)
    propagation_noise: float = 0.0  # share of propagation objects whose neighbour mask is perturbed (a model's own)
    train_items: int = 0  # filled in: cache items used for training
    cache: str = ""


def _lr_factor(step: int, s: Settings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class CacheData:
    """The cache in memory: embeddings (float16), and per item its structures' packed masks (slice and neighbours)."""

    def __init__(self, reader: CacheReader, files: list[str]):
        embeddings, self.masks, self.owner, self.names, self.items = [], [], [], [], []
        for file in files:
            data = reader.load(file)
            base = len(self.items)
            embeddings.append(torch.from_numpy(data["embeddings"]))
            self.masks.append(data["masks"])
            self.owner.append(data["mask_item"] + base)
            self.names.append(data["mask_name"])
            self.items += data["items"]
        self.embeddings = torch.cat(embeddings)
        self.masks = np.concatenate(self.masks)
        self.owner = np.concatenate(self.owner)
        self.names = np.concatenate(self.names)
        self.name_table = reader.names
        # which masks can be a first-prompt target (enough of it on the slice) and which a propagation step
        counts = np.unpackbits(self.masks, axis=-1).reshape(len(self.masks), 3, -1).sum(-1)
        self.clickable = np.flatnonzero(counts[:, 1] >= MIN_PIXELS)
        self.propagatable = np.flatnonzero((counts[:, 0] >= MIN_PIXELS) | (counts[:, 2] >= MIN_PIXELS))
        self.counts = counts

    def __len__(self) -> int:
        return len(self.items)


def sample_objects(data: CacheData, s: Settings, step: int):
    """Step ``step``'s objects: (embeddings (N, 256, 64, 64), target masks (N, 256, 256), propagation sources,
    refine starts, generators); a source or start is None where the object has none."""
    rows, targets, sources, starts, rngs = [], [], [], [], []
    for k in range(s.batch_size):
        rng = np.random.default_rng([s.seed, step, k])
        noise = np.random.default_rng([s.seed, step, k, 2])  # its own stream: the settings' zeros draw nothing
        start = None
        if rng.random() < s.p_propagate:
            m = int(data.propagatable[rng.integers(len(data.propagatable))])
            stack = unpack_masks(data.masks[m:m + 1])[0]
            sides = [j for j in (0, 2) if data.counts[m, j] >= MIN_PIXELS]
            source = stack[sides[int(rng.integers(len(sides)))]]
            if s.propagation_noise and rng.random() < s.propagation_noise:
                source = perturbed_mask(source, noise)
            sources.append(source)
        else:
            m = int(data.clickable[rng.integers(len(data.clickable))])
            stack = unpack_masks(data.masks[m:m + 1])[0]
            sources.append(None)
            if s.p_refine and rng.random() < s.p_refine:
                start = perturbed_mask(stack[1], noise)
        starts.append(start)
        rows.append(int(data.owner[m]))
        targets.append(stack[1])
        rngs.append(np.random.default_rng([s.seed, step, k, 1]))
    embeddings = data.embeddings[torch.as_tensor(rows)].float()
    return embeddings, np.stack(targets), sources, starts, rngs


@torch.no_grad()
def evaluate(heads: Heads, data: CacheData, clicks=(1, 3, 5), max_objects: int = 64) -> dict:
    """Held-out views (``max_objects`` of them, evenly spread): Dice after 1/3/5 deterministic clicks (deepest
    point, then the deeper error), from a tight box, and as one propagation step: the neighbour's box, deepest point
    and mask as +-8 logits (``propagate``) and its box and deepest point only (``propagate_box_point``)."""
    heads.eval()
    out = {f"click{n}": [] for n in clicks} | {"box": [], "propagate": [], "propagate_box_point": []}
    low = heads.prompt_encoder.mask_input_size[0]
    chosen = data.clickable[:: max(1, len(data.clickable) // max_objects)][:max_objects]
    for m in chosen:
        emb = data.embeddings[int(data.owner[m])][None].float()
        stack = unpack_masks(data.masks[m:m + 1])[0]
        target = stack[1]
        history, previous, pred = [], None, None
        for n in range(1, max(clicks) + 1):
            if n == 1:
                history.append((*first_click(target), 1))
            else:
                c = corrective_click(pred, target)
                history.append(c if c is not None else (*first_click(target), 1))
            lowres, iou = decode(heads, emb, points=points_tensor([history], "cpu"), mask_input=previous,
                                 multimask=n == 1)
            best = int(iou[0].argmax())
            previous = lowres[:, best:best + 1]
            pred = (previous[0, 0] > 0).numpy()
            if n in clicks:
                out[f"click{n}"].append(dice(pred, target))
        lowres, _ = decode(heads, emb, boxes=boxes_tensor([tight_box(target)], "cpu"))
        out["box"].append(dice((lowres[0, 0] > 0).numpy(), target))
        for j in (0, 2):
            if data.counts[m, j] >= MIN_PIXELS:
                src = stack[j]
                for key, mask_input in (("propagate", mask_prompt(src, low, 8.0)), ("propagate_box_point", None)):
                    lowres, _ = decode(heads, emb, points=points_tensor([[(*first_click(src), 1)]], "cpu"),
                                       boxes=boxes_tensor([tight_box(src)], "cpu"), mask_input=mask_input)
                    out[key].append(dice((lowres[0, 0] > 0).numpy(), target))
                break
    heads.train()
    return {k: round(float(np.mean(v)), 4) for k, v in out.items() if v} | {"objects": int(len(chosen))}


def train(cache: Path, out: Path, s: Settings, threads: int = 2, log_every: int = 10, eval_every: int = 250,
          ckpt_every: int = 100, stop_at: int | None = None, verbose: bool = True) -> Heads:
    if s.propagation_prompt not in PROPAGATION_PROMPTS:
        raise SystemExit(f"--propagation-prompt {s.propagation_prompt!r}: use one of {', '.join(PROPAGATION_PROMPTS)}")
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(cache)
    if len(reader.files) <= s.holdout_shards:
        raise SystemExit(f"{cache} has {len(reader.files)} shards; more than the {s.holdout_shards} held out needed")
    train_files, held_files = reader.files[:-s.holdout_shards], reader.files[-s.holdout_shards:]
    s.train_items, s.cache = len(train_files) * ITEMS_PER_SHARD, str(cache)
    if verbose:
        print(f"loading {len(train_files)} training shards, {len(held_files)} held out ...", flush=True)
    data, held = CacheData(reader, train_files), CacheData(reader, held_files)
    torch.manual_seed(s.seed)
    released = released_litemedsam()
    heads = Heads(released.prompt_encoder, released.mask_decoder).train()
    if s.init:
        heads.load_state_dict(read_heads(s.init), strict=True)
    decay = [p for n, p in heads.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in heads.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: _lr_factor(k, s))
    log, evals, start = [], [], 0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["settings"] != asdict(s):
            raise SystemExit(f"{ckpt} was made with other settings: use another --out")
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, log, evals = int(state["step"]), json.loads(state["log"]), json.loads(state["evals"])
        if verbose:
            print(f"resumed at step {start}", flush=True)
    else:
        evals.append({"step": 0, **evaluate(heads, held)})
        if verbose:
            print(f"step 0 validation: {evals[-1]}", flush=True)

    def checkpoint(step):
        save_atomic({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "settings": asdict(s),
                     "log": json.dumps(log), "evals": json.dumps(evals)}, ckpt, torch.save)
        write_json(out / LOG, {"settings": asdict(s), "log": log, "evals": evals})

    end = s.steps if stop_at is None else min(s.steps, stop_at)
    window, t0 = {"loss": [], "dice": [], "time": 0.0}, time.perf_counter()
    for step in range(start, end):
        t = time.perf_counter()
        embeddings, targets, sources, starts, rngs = sample_objects(data, s, step)
        grad_round = None if s.all_rounds else int(np.random.default_rng([s.seed, step, 999]).integers(s.iterations))
        loss, stats = interactive_step(heads, embeddings, targets, rngs, p_box=s.p_box, iterations=s.iterations,
                                       iou_weight=s.iou_weight, sources=sources, size=targets.shape[-1],
                                       grad_round=grad_round,
                                       propagation_mask=s.propagation_prompt == "mask-prompt", refine=starts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), s.clip)
        optimizer.step()
        scheduler.step()
        window["loss"].append(float(loss.detach()))
        window["dice"].append(stats["dice"] + [np.nan] * (s.iterations - len(stats["dice"])))
        window["time"] += time.perf_counter() - t
        done = step + 1
        if done % log_every == 0 or done == end:
            n = len(window["loss"])
            with warnings.catch_warnings():  # a round no step of the window reached has no Dice (nan)
                warnings.simplefilter("ignore", RuntimeWarning)
                per_round = np.nanmean(window["dice"], 0)
            log.append({"step": done, "loss": float(np.mean(window["loss"])),
                        "train_dice_per_round": [round(float(v), 4) for v in per_round],
                        "lr": optimizer.param_groups[0]["lr"], "sec_per_step": window["time"] / n,
                        "elapsed_s": round(time.perf_counter() - t0, 1)})
            window = {"loss": [], "dice": [], "time": 0.0}
            if verbose:
                e = log[-1]
                print(f"step {done}/{s.steps} loss {e['loss']:.4f} dice/round {e['train_dice_per_round']} "
                      f"lr {e['lr']:.2e} {e['sec_per_step']:.2f} s/step", flush=True)
        if done % eval_every == 0 or done == s.steps:
            evals.append({"step": done, **evaluate(heads, held)})
            if verbose:
                print(f"step {done} validation: {evals[-1]}", flush=True)
        if done % ckpt_every == 0 or done == end:
            checkpoint(done)
    if end >= s.steps:
        state = {k: v.detach().contiguous().clone() for k, v in heads.state_dict().items()}
        save_atomic(state, out / HEADS_FILE, lambda d, p: save_file(d, str(p), metadata={"steps": str(s.steps)}))
        write_json(out / LOG, {"settings": asdict(s), "log": log, "evals": evals})
        plot(out)
    return heads.eval()


def plot(run: Path) -> Path | None:
    opened = open_curves(run / LOG)
    if opened is None:
        return None
    fig, (a, b), log, steps = opened
    a.plot(steps, [e["loss"] for e in log])
    a.set_xlabel("step"), a.set_ylabel("training loss (mean over rounds)"), a.set_yscale("log")
    evals = json.loads((run / LOG).read_text())["evals"]
    for key in ("click1", "click3", "click5", "box", "propagate", "propagate_box_point"):
        if any(key in e for e in evals):
            b.plot([e["step"] for e in evals], [e.get(key) for e in evals], marker="o", label=key)
    b.set_xlabel("step"), b.set_ylabel("validation Dice (views not trained on)"), b.legend()
    return save_curves(fig, run / "curves.png")


def export(run: Path, out: Path, name: str = "litemedsam-clicks", version: str = "1") -> Path:
    """The fine-tuned heads as a ``teachers`` bundle on the ``litemedsam`` base (its image encoder), float16."""
    from PRISMRTLib.models.bundle import load_bundle, save_bundle
    from PRISMRTLib.models.registry import get_teacher, spec_record

    model = released_litemedsam()
    heads = Heads(model.prompt_encoder, model.mask_decoder)
    heads.load_state_dict(load_file(str(run / HEADS_FILE)), strict=True)
    settings = json.loads((run / LOG).read_text())
    meta = {"trained_by": "training/litemedsam_clicks/train.py", "settings": settings["settings"],
            "validation_views_of_training_cts": settings["evals"][-1], "base": "litemedsam 1 (released image encoder, frozen)",
            "training_data": "training/litemedsam_clicks/sources.py (held-out data listed there)"}
    folder = save_bundle(out, "teachers", {"teachers": {"sam": spec_record(get_teacher("litemedsam"))}},
                         {"sam": model}, None, name=name, version=version, meta=meta, overwrite=True,
                         float_dtype=torch.float16,
                         base={"model": "litemedsam", "version": "1", "components": ["sam.image_encoder"]})
    load_bundle(folder)  # loads back (resolving the base) as PRISMRTLib reads it
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--cache", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    for field, value in asdict(Settings()).items():
        if field not in ("train_items", "cache"):
            t.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--stop-at", type=int)
    t.add_argument("--eval-every", type=int, default=250)
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--version", default="1")
    args = p.parse_args(argv)
    if args.command == "train":
        s = Settings(**{k: getattr(args, k) for k in asdict(Settings()) if k not in ("train_items", "cache")})
        train(args.cache, args.out, s, args.threads, eval_every=args.eval_every, stop_at=args.stop_at)
    else:
        print(export(args.run, args.out, version=args.version))


if __name__ == "__main__":
    main()
