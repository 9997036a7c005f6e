"""Train the chat's image-model heads: per question a logistic regression on the frozen CLIP image embedding,
temperature-calibrated, written to ``PRISMRTLib/chat/heads/<model>.safetensors`` + ``.json``; and the report beside
zero-shot (``training/chat_head/REPORT.md``).

Questions are generated from the OpenKBP training patients exactly as the CLIP stand-in's captions were
(``training.standins.biomedclip.slice_truth``: a structure is visible from 10 pixels of the 128 px slice, absent with
none, slices in between are left out; the target is any PTV; its side is the PTVs' side of the midline, the cord or
brainstem or else the body). Slices: every ``--stride``-th in each orientation with some body in it, cut and
windowed by the chat engine's own :func:`PRISMRTLib.chat.engines.image.slice_input` (what inference sees), plus the
left-right mirror image of each axial and coronal slice (its labels mirrored) as training augmentation.

Split: the first 136 ``train-pats`` (by number) fit the heads; the last 34 (held out) choose the L2 weight and fit
the temperatures (of the heads and of zero-shot); ``validation-pats`` are never seen and give the honest numbers.

    OMP_NUM_THREADS=1 .venv/bin/python -m training.chat_head.train            # ~10 min on 1 CPU core
    OMP_NUM_THREADS=1 .venv/bin/python -m training.chat_head.train --limit 20 --no-save   # a quick check

``--backend prismrt`` trains the head of the distilled student's CLIP role instead of the teachers' (its report:
``training/chat_head/REPORT_prismrt-student.md``); every slice then costs a pass of LiteMedSAM's encoder, the
student's trunk, so use coarser strides on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from PRISMRTLib.chat import prompts
from PRISMRTLib.chat.engines.image import (
    ChatHead, ImageModelEngine, QuestionHead, _mirror_perm, _SliceFeatures, clip_fingerprint, clip_model_name,
    expected_calibration_error, fit_temperature, mirror, nll, slice_input, softmax,
)
from PRISMRTLib.chat.types import Intent, SliceRef, ChatContext
from PRISMRTLib.imaging import SlicePlane
from training.data import REPO, TRAIN_DIR, VAL_DIR, cut_slice, load_case
from training.standins.biomedclip import MIN_PIXELS, case_info, slice_truth

HOLDOUT = 34
MIN_BODY = 0.05  # as the stand-in's evaluation pool: slices with at least 5 % tissue
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
REPORT = REPO / "training" / "chat_head" / "REPORT.md"
QUESTIONS = list(prompts.QUESTIONS)
ORGANS = [f"visible:{c}" for c in prompts.LIST_ORGANS]


@dataclass
class Pool:
    """Slices as rows: embeddings of the slice and of its mirror image, and one label per question (-1: unknown)."""

    emb: np.ndarray
    emb_mirror: np.ndarray  # zeros where there is none (sagittal)
    orientation: np.ndarray
    mirrored: np.ndarray
    case: np.ndarray
    labels: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # cases without a usable slice

    def __len__(self):
        return len(self.emb)

    def select(self, keep: np.ndarray) -> "Pool":
        return Pool(self.emb[keep], self.emb_mirror[keep], self.orientation[keep], self.mirrored[keep],
                    self.case[keep], {q: v[keep] for q, v in self.labels.items()}, self.skipped)


def labels_of(truth) -> dict[str, int]:
    """Class index per question (the order of :data:`prompts.QUESTIONS`), -1 when the slice does not settle it."""
    out = {}
    for concept, structure in prompts.VISIBLE.items():
        label = 0 if ("vis", structure) in truth.facts else 1 if ("no", structure) in truth.facts else -1
        if truth.orientation == "sagittal" and concept in prompts.SIDED:
            label = -1  # the engine never asks a side on sagittal slices
        out[f"visible:{concept}"] = label
    out["target"] = 0 if ("vis", "Target") in truth.facts else 1 if ("no", "Target") in truth.facts else -1
    sides = list(prompts.QUESTIONS["target_side"])
    out["target_side"] = sides.index(truth.target_side) if truth.target_side in sides else -1
    out["plane"] = list(prompts.QUESTIONS["plane"]).index(truth.orientation)
    return out


def collect(folders: list[Path], engine: ImageModelEngine, stride: int, augment: bool, verbose: bool = True) -> Pool:
    """Every ``stride``-th slice of each case in each orientation (and, with ``augment``, the mirror images)."""
    size = engine.size
    # "visible" means the same tissue area at any input size: 10 px of a 128 px slice
    min_pixels = max(1, round(MIN_PIXELS * (size / 128) ** 2))
    rows = {"emb": [], "emb_mirror": [], "orientation": [], "mirrored": [], "case": []}
    labels = {q: [] for q in QUESTIONS}
    t0 = time.time()
    skipped = []
    for n, folder in enumerate(folders):
        case = load_case(folder)
        info = case_info(case)
        images, meta = [], []
        for o in ("axial", "coronal", "sagittal"):
            planes = SlicePlane.create(case.geometry, o)
            for index in range(stride // 2, planes.num_slices, stride):
                sample = cut_slice(case, o, index, size)
                if np.count_nonzero(sample.hu > -400) < MIN_BODY * size * size:
                    continue
                x, cols, shown = slice_input(case.hu, case.geometry, SliceRef(o, index), size, engine.window)
                assert shown == o
                images.append(x)
                pair = None
                if o != "sagittal":
                    images.append(mirror(x, cols))
                    pair = (slice_truth(cut_slice(case, o, index, size, mirror=True), info, min_pixels) if augment
                            else None)
                meta.append((o, slice_truth(sample, info, min_pixels), o != "sagittal", pair))
        if not images:  # no slice with tissue (a blank CT): nothing to learn from
            print(f"  {folder.name}: no slice with >= {MIN_BODY:.0%} tissue, skipped", flush=True)
            skipped.append(folder.name)
            continue
        emb = _encode(engine, np.stack(images))
        k = 0
        for o, truth, has_mirror, pair in meta:
            e = emb[k]
            em = emb[k + 1] if has_mirror else np.zeros_like(e)
            k += 2 if has_mirror else 1
            for mirrored, (a, b, t) in enumerate([(e, em, truth)] + ([(em, e, pair)] if pair is not None else [])):
                rows["emb"].append(a)
                rows["emb_mirror"].append(b)
                rows["orientation"].append(o)
                rows["mirrored"].append(bool(mirrored))
                rows["case"].append(n)
                for q, v in labels_of(t).items():
                    labels[q].append(v)
        if verbose and (n + 1) % 10 == 0:
            print(f"  {n + 1}/{len(folders)} cases, {len(rows['emb'])} rows, {time.time() - t0:.0f} s", flush=True)
    return Pool(np.stack(rows["emb"]), np.stack(rows["emb_mirror"]), np.array(rows["orientation"]),
                np.array(rows["mirrored"]), np.array(rows["case"]),
                {q: np.array(v, dtype=np.int64) for q, v in labels.items()}, skipped)


def _encode(engine: ImageModelEngine, images: np.ndarray) -> np.ndarray:
    import torch

    f = engine.backend.encode(images, (1.0, 1.0), roles=("clip",))
    return torch.nn.functional.normalize(f.clip_embedding.float(), dim=-1).cpu().numpy().astype(np.float64)


# ---- logits, vectorised as the engine computes them one slice at a time --------------------------------------------
def features_of(question: str, emb: np.ndarray, emb_mirror: np.ndarray) -> np.ndarray:
    return np.concatenate([emb, emb_mirror], 1) if question == "target_side" else emb


def zero_shot_logits(engine: ImageModelEngine, question: str, pool: Pool) -> np.ndarray:
    classes, text = engine._texts()[question]
    z = engine._scale * pool.emb @ text.T
    if question == "target_side":
        z = (z + (engine._scale * pool.emb_mirror @ text.T)[:, _mirror_perm(classes)]) / 2
    return z


def head_logits(head: QuestionHead, question: str, pool: Pool) -> np.ndarray:
    z = features_of(question, pool.emb, pool.emb_mirror) @ head.weight.T + head.bias
    if head.features == "embedding+mirror":
        zm = features_of(question, pool.emb_mirror, pool.emb) @ head.weight.T + head.bias
        z = (z + zm[:, _mirror_perm(head.classes)]) / 2
    return z


def fit_logreg(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float, iters: int = 300):
    """Multinomial logistic regression with an L2 penalty on the weights (full-batch L-BFGS, float64)."""
    import torch

    torch.manual_seed(0)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ w.T + b, Y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def metrics(logits: np.ndarray, labels: np.ndarray, temperature: float, majority: int) -> dict:
    probs = softmax(logits / temperature)
    pred = probs.argmax(1)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()), "balanced": float(np.mean(recalls)),
            "ece": expected_calibration_error(probs, labels), "nll": nll(logits, labels, temperature),
            "majority": float((labels == majority).mean())}


def train_heads(engine: ImageModelEngine, fit: Pool, cal: Pool, verbose: bool = True):
    """Heads (L2 weight chosen on ``cal``), their temperatures and the zero-shot temperatures, all fitted on ``cal``
    (its un-mirrored rows)."""
    heads, zs_t, choice = {}, {}, {}
    cal0 = cal.select(~cal.mirrored)
    for q in QUESTIONS:
        classes = list(prompts.QUESTIONS[q])
        fy, cy = fit.labels[q], cal0.labels[q]
        fsel, csel = fy >= 0, cy >= 0
        if not csel.any():  # nothing to calibrate on (a small --limit): zero-shot answers, uncalibrated
            zs_t[q] = 1.0
            print(f"  {q}: no labelled calibration slices; zero-shot at temperature 1 (uncalibrated), no head: "
                  "use more patients (--limit) or a smaller --stride", flush=True)
            continue
        zs_t[q] = fit_temperature(zero_shot_logits(engine, q, cal0)[csel], cy[csel])
        if len(np.unique(fy[fsel])) < 2 or len(np.unique(cy[csel])) < 2:
            continue  # a class never seen: zero-shot answers this question
        x = features_of(q, fit.emb[fsel], fit.emb_mirror[fsel])
        best = None
        for wd in WEIGHT_DECAYS:
            w, b = fit_logreg(x, fy[fsel], len(classes), wd)
            head = QuestionHead(classes, w, b, 1.0, "embedding+mirror" if q == "target_side" else "embedding")
            z = head_logits(head, q, cal0)[csel]
            head.temperature = fit_temperature(z, cy[csel])
            score = nll(z, cy[csel], head.temperature)
            if best is None or score < best[0]:
                best = (score, wd, head)
        heads[q], choice[q] = best[2], best[1]
        if verbose:
            print(f"  {q}: L2 {best[1]:g}, T {best[2].temperature:.3f} (zero-shot T {zs_t[q]:.3f}), "
                  f"{int(fsel.sum())} fit rows", flush=True)
    return heads, zs_t, choice


def evaluate(engine: ImageModelEngine, heads: dict, zs_t: dict, pool: Pool, majority: dict) -> dict:
    """Per question (un-mirrored rows with a label): zero-shot (with its temperature) and the head."""
    pool = pool.select(~pool.mirrored)
    out = {}
    for q in QUESTIONS:
        y = pool.labels[q]
        sel = y >= 0
        if not sel.any():
            continue
        r = {"zero-shot": metrics(zero_shot_logits(engine, q, pool)[sel], y[sel], zs_t[q], majority[q])}
        if q in heads:
            r["head"] = metrics(head_logits(heads[q], q, pool)[sel], y[sel], heads[q].temperature, majority[q])
        r["_logits"] = {"zero-shot": (zero_shot_logits(engine, q, pool)[sel] / zs_t[q]),
                        "head": head_logits(heads[q], q, pool)[sel] / heads[q].temperature if q in heads else None,
                        "labels": y[sel]}
        out[q] = r
    pooled = {}
    for method in ("zero-shot", "head"):
        z = [out[q]["_logits"][method] for q in ORGANS if q in out and out[q]["_logits"][method] is not None]
        if len(z) == len([q for q in ORGANS if q in out]):
            y = np.concatenate([out[q]["_logits"]["labels"] for q in ORGANS if q in out])
            maj = np.concatenate([np.full(len(out[q]["_logits"]["labels"]), majority[q]) for q in ORGANS if q in out])
            m = metrics(np.concatenate(z), y, 1.0, 0)
            m["majority"] = float((y == maj).mean())
            pooled[method] = m
    for r in out.values():
        r.pop("_logits")
    out["organ visible (7 OARs, pooled)"] = pooled
    return out


def check_engine(engine: ImageModelEngine, pool: Pool, rows: int = 25) -> float:
    """Largest difference between the engine's per-slice probabilities and the vectorised ones used here."""
    worst = 0.0
    for i in np.linspace(0, len(pool) - 1, rows).astype(int):
        feats = _SliceFeatures(str(pool.orientation[i]), pool.emb[i],
                               pool.emb_mirror[i] if pool.orientation[i] != "sagittal" else None)
        one = pool.select(np.array([i]))
        for q in QUESTIONS:
            if q == "target_side" and feats.emb_mirror is None:
                continue
            z, t = engine.logits(q, feats)
            head = engine._trained(q)
            ref = head_logits(head, q, one)[0] if head is not None else zero_shot_logits(engine, q, one)[0]
            worst = max(worst, float(np.abs(softmax(z / t) - softmax(ref / t)).max()))
    return worst


def benchmark(engine: ImageModelEngine, case_dir: Path, n_questions: int = 1000, n_slices: int = 50) -> dict:
    """1,000 image-model questions on one CT, over ``n_slices`` distinct slices, on a fresh engine."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(case_dir / "ct.nii.gz"))
    fresh = ImageModelEngine(engine.backend, engine.head)
    rng = np.random.default_rng(0)
    axes = ["axial", "coronal", "sagittal"]
    slices = [SliceRef(axes[i % 3], int(rng.integers(20, 108))) for i in range(n_slices)]
    intents = [Intent("presence", ("mandible",)), Intent("presence", ("parotid_left",)), Intent("list"),
               Intent("presence", ("target",)), Intent("laterality", ("target",)), Intent("plane")]
    t0 = time.time()
    answered = 0
    for n in range(n_questions):
        a = fresh.answer(intents[n % len(intents)], ChatContext(ct, slices[(n * 7) % n_slices]))
        answered += a is not None
    return {"questions": n_questions, "distinct_slices": len({str(s) for s in slices}),
            "backbone_passes": fresh.encode_calls, "seconds": time.time() - t0, "answered": answered}


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _fmt(m: dict | None, key: str) -> str:
    return "" if not m else f"{m[key]:.3f}"


def report(result: dict, meta: dict) -> str:
    lines = ["# Chat image-model heads: zero-shot vs trained head", "",
             f"CLIP model: `{meta['model']}` ({meta['backend']}). Command:", "",
             f"    {meta['command']}", "",
             "Questions generated from OpenKBP slices as the stand-in's captions were (a structure visible from "
             "10 px of the 128 px slice, absent with none; target = any PTV; side = the PTVs' side of the "
             f"midline, axial and coronal only). Slices: every {_nth(meta['stride'])} slice per orientation with "
             f">= 5 % tissue (validation: every {_nth(meta['eval_stride'])}), windowed W350/L60 as the stand-in was trained; "
             "training adds each axial/coronal slice's mirror image. "
             f"Heads fit on {meta['fit_cases']} train-pats ({meta['fit_rows']} rows with mirrors), L2 weight and "
             f"temperatures fitted on {meta['cal_cases']} held-out train-pats ({meta['cal_rows']} slices), evaluated "
             f"there and on the {meta['val_cases']} validation-pats ({meta['val_rows']} slices, never seen). "
             "Both methods are temperature-calibrated on the held-out train patients (so their ECE there is "
             "in-sample for the temperature; validation is the honest figure). Accuracy on the natural class mix, "
             "balanced accuracy = mean recall over classes, ECE over 10 equal confidence bins, majority = the "
             "training set's majority class.", "",
             f"Wall time: features {meta['seconds_features']:.0f} s, fitting {meta['seconds_fit']:.0f} s "
             f"(1 CPU thread)." + (f" Skipped (no slice with >= 5 % tissue): {', '.join(meta['skipped'])}."
                                   if meta["skipped"] else ""), ""]
    v = result["validation"]
    pooled = v.get("organ visible (7 OARs, pooled)", {})
    if "head" in pooled:
        zs, hd = pooled["zero-shot"], pooled["head"]
        lines += ["**Summary (validation-pats).** Organ visibility (7 OARs pooled): zero-shot "
                  f"{zs['accuracy']:.3f} (balanced {zs['balanced']:.3f}, the stand-in report's 0.728 is balanced), "
                  f"ECE {zs['ece']:.3f} -> trained head {hd['accuracy']:.3f} (balanced {hd['balanced']:.3f}), "
                  f"ECE {hd['ece']:.3f}; majority baseline {zs['majority']:.3f}. " + "; ".join(
                      f"{q}: zero-shot {v[q]['zero-shot']['accuracy']:.3f} -> head {v[q]['head']['accuracy']:.3f} "
                      f"(ECE {v[q]['head']['ece']:.3f}, majority {v[q]['head']['majority']:.3f})"
                      for q in ("target", "plane", "target_side") if "head" in v.get(q, {})) + ". "
                  "The target's side is almost always 'bilateral' in OpenKBP slices, and neither method tells left "
                  "from right better than that majority (balanced accuracy near chance): from pixels alone the side "
                  "comes with its calibrated confidence (high only for the common 'bilateral'); load the structures "
                  "for an exact side.", ""]
    for split, title in (("holdout", "held-out train-pats"), ("validation", "validation-pats")):
        lines += [f"## {title}", "",
                  "| question | n | majority | zero-shot acc | zero-shot bal. | zero-shot ECE | head acc | head bal. | "
                  "head ECE |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for q, r in result[split].items():
            zs, hd = r.get("zero-shot"), r.get("head")
            if not zs:
                continue
            name = f"**{q}**" if "pooled" in q else q
            lines.append(f"| {name} | {zs['n']} | {zs['majority']:.3f} | {_fmt(zs, 'accuracy')} | "
                         f"{_fmt(zs, 'balanced')} | {_fmt(zs, 'ece')} | {_fmt(hd, 'accuracy')} | "
                         f"{_fmt(hd, 'balanced')} | {_fmt(hd, 'ece')} |")
        lines.append("")
    t = meta["temperatures"]
    lines += ["## Temperatures and L2 weights", "", "| question | head T | head L2 | zero-shot T |",
              "|---|---:|---:|---:|"]
    for q in QUESTIONS:
        lines.append(f"| {q} | {t['head'].get(q, float('nan')):.3f} | {meta['l2'].get(q, float('nan')):g} | "
                     f"{t['zero-shot'][q]:.3f} |")
    b = meta.get("benchmark")
    if b:
        lines += ["", "## Speed", "",
                  f"{b['questions']} image-model questions (presence, list, target side, plane) on one CT over "
                  f"{b['distinct_slices']} distinct slices, fresh engine: {b['backbone_passes']} backbone passes, "
                  f"{b['seconds']:.1f} s on 1 CPU thread (text embeddings included)."]
    lines += ["", f"Engine check: per-slice probabilities equal these vectorised ones to {meta['engine_check']:.1e}.",
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.chat_head.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stride", type=int, default=4, help="every N-th training slice per orientation (default 4)")
    p.add_argument("--eval-stride", type=int, default=2, help="every N-th validation slice (default 2)")
    p.add_argument("--limit", type=int, default=None, help="use only N train-pats (and N // 5 validation-pats)")
    p.add_argument("--out", type=Path, default=None, help="head file (default PRISMRTLib/chat/heads/<model>)")
    p.add_argument("--backend", choices=("teachers", "prismrt"), default="teachers",
                   help="whose CLIP model the heads are for (default: teachers)")
    p.add_argument("--report", type=Path, default=None,
                   help="default: training/chat_head/REPORT.md (teachers), REPORT_<model>.md otherwise")
    p.add_argument("--no-save", action="store_true", help="write neither the head nor the report")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    t_start = time.time()
    engine = ImageModelEngine.default(device="cpu", backend=a.backend)
    engine.backend.batch_size = 32
    engine.head = ChatHead(clip_model_name(engine.backend), clip_fingerprint(engine.backend))  # none yet
    if a.report is None:
        stem = ChatHead.path_for(engine.head.model).stem
        a.report = REPORT if a.backend == "teachers" else REPORT.with_name(f"REPORT_{stem}.md")
    train = sorted(TRAIN_DIR.glob("pt_*"), key=lambda f: int(f.name.split("_")[1]))
    val = sorted(VAL_DIR.glob("pt_*"), key=lambda f: int(f.name.split("_")[1]))
    holdout = HOLDOUT
    if a.limit:
        train, val, holdout = train[:a.limit], val[:max(a.limit // 5, 2)], max(a.limit // 5, 2)
    fit_dirs, cal_dirs = train[:-holdout], train[-holdout:]
    print(f"fit {len(fit_dirs)}, held out {len(cal_dirs)}, validation {len(val)} patients", flush=True)
    fit = collect(fit_dirs, engine, a.stride, augment=True)
    cal = collect(cal_dirs, engine, a.stride, augment=False)
    vpool = collect(val, engine, a.eval_stride, augment=False)
    t_feat = time.time() - t_start
    t0 = time.time()
    heads, zs_t, l2 = train_heads(engine, fit, cal)
    t_fit = time.time() - t0
    majority = {}
    for q in QUESTIONS:
        y = fit.labels[q][fit.labels[q] >= 0]
        majority[q] = int(np.bincount(y).argmax()) if len(y) else 0
    result = {"holdout": evaluate(engine, heads, zs_t, cal, majority),
              "validation": evaluate(engine, heads, zs_t, vpool, majority)}
    engine.head = ChatHead(clip_model_name(engine.backend), clip_fingerprint(engine.backend), heads, zs_t)
    worst = check_engine(engine, vpool)
    assert worst < 1e-6, f"the engine's probabilities differ from the training script's by {worst}"
    meta = {"model": engine.head.model, "backend": engine.backend.describe(),
            "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python -m training.chat_head.train",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "skipped": fit.skipped + cal.skipped + vpool.skipped,
            "stride": a.stride, "eval_stride": a.eval_stride, "fit_cases": len(fit_dirs), "cal_cases": len(cal_dirs),
            "val_cases": len(val), "fit_rows": len(fit), "cal_rows": len(cal), "val_rows": len(vpool),
            "seconds_features": t_feat, "seconds_fit": t_fit, "l2": l2, "engine_check": worst,
            "temperatures": {"head": {q: h.temperature for q, h in heads.items()}, "zero-shot": zs_t}}
    meta["benchmark"] = benchmark(engine, val[0])
    print(json.dumps(meta["benchmark"]))
    text = report(result, meta)
    print(text)
    if not a.no_save:
        engine.head.meta = {"training": {k: v for k, v in meta.items() if k not in ("temperatures",)},
                            "metrics": result, "window": [engine.window.level, engine.window.width],
                            "input_size": engine.size}
        path = engine.head.save(a.out or ChatHead.path_for(engine.head.model))
        a.report.write_text(text)
        print(f"wrote {path} and {a.report}")
    print(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
