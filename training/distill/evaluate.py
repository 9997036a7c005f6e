"""Judging a distilled student against its teachers, on images no training step saw.

    python -m training.distill.evaluate fidelity --run RUN --out OUT [--sizes 128 192 256 384 512] [--views 48]
    python -m training.distill.evaluate probe --run RUN --out OUT [--patients 16] [--slices 6]
    python -m training.distill.evaluate delineation --bundle BUNDLE --out OUT [--clicks 3] [CASES ...]

- **fidelity**: per translated feature, cosine and normalised MSE against the teacher's own features of the same view,
  with the student fed the view at each input size (the teachers always see it at their own size). Views are drawn
  by the training planner (crops, windows, three orientations) from the held-out CTs only (``targets.HELD_OUT``:
  OpenKBP validation-pats, the sarcomas, ``ts_ct_dicom``). nMSE is MSE in a PHI-S space fitted on these teacher
  features: 1.0 is what predicting their mean scores.
- **probe**: is the knowledge in the backbone or only in the translators? A linear (multinomial logistic) probe maps
  frozen features to nine head-and-neck classes (outside, body, seven organs) on a 64 x 64 grid of axial slices of
  OpenKBP validation patients: fitted on the first half of the patients, scored (per-class Dice) on the second.
  Feature sets: the trained student's patch tokens, the same backbone at its random initialisation (the control), the
  student's translated features and the teachers' own.
- **delineation**: ``prismrt eval-seg`` with the teacher model and the student bundle through the same decoder and
  prompts (the clinical GTVs and the ts_ct_dicom organs by default), then each student mean as a share of the
  teacher's, against the issue's 95 %, with eval-seg's paired Wilcoxon test beside it.

Each writes ``OUT/<kind>.json`` and ``OUT/<kind>.md`` (the command included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from PRISMRTLib.imaging import SlicePlane

from .targets import BODY_HU, HELD_OUT, WINDOWS, CTVolume, Planner, TeacherEncoders, ViewSpec, _load, render, \
    shared_data

REPO = Path(__file__).resolve().parents[2]
PROBE_CLASSES = ("outside", "body", "Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                 "Mandible")
PROBE_GRID = 64


# ---- shared ------------------------------------------------------------------------------------------------------
def held_out_cts(data: Path | None = None, openkbp_limit: int = 6) -> dict[str, list[CTVolume]]:
    """The held-out CTs by source (images only): OpenKBP validation-pats, STS_001/002, ts_ct_dicom."""
    data = Path(data) if data is not None else shared_data()
    out: dict[str, list[CTVolume]] = {}
    val = data / "openkbp" / "validation-pats"
    if val.is_dir():
        folders = sorted(val.glob("pt_*"), key=lambda p: int(p.name.split("_")[1]))[:openkbp_limit]
        out["openkbp"] = [_load(f / "ct.nii.gz", f.name, "openkbp") for f in folders]
    sts = [data / "clinical" / "sts_sarcoma" / n / "ct.nii.gz" for n in ("STS_001", "STS_002")]
    if all(p.exists() for p in sts):
        out["sts"] = [_load(p, p.parent.name, "sts") for p in sts]
    dicom = data / "samples" / "ts_ct_dicom" / "dicom"
    if dicom.is_dir():
        out["ts_ct_dicom"] = [_load(dicom, "ts_ct_dicom", "ts_ct_dicom")]
    if not out:
        raise FileNotFoundError(f"no held-out CT under {data} (set PRISMRT_SHARED_DATA to the shared data folder)")
    return out


def load_student(run: Path):
    """(run config, student whose translators output the teachers' own features) of a training run."""
    from .export import folded_student, load_run

    config, model, _, _ = load_run(Path(run))
    return config, folded_student(model).eval()


def _write(out: Path, kind: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{kind}.md").write_text(markdown)


def _command() -> str:
    return "python -m training.distill.evaluate " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---- fidelity ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def fidelity(run: Path, sizes=(128, 192, 256, 384, 512), views: int = 48, data: Path | None = None,
             seed: int = 1000, log=print) -> dict:
    config, student = load_student(run)
    if student.trunk_outputs:  # a teacher's own trunk takes its teacher's input size only
        sizes = (student.config.img_size,)
    teachers = TeacherEncoders(config)
    cache_config = dataclasses.replace(config.cache, seed=seed,
                                       sources={"openkbp": 0.5, "sts": 0.3, "ts_ct_dicom": 0.2})
    planner = Planner(held_out_cts(data), cache_config)
    render_sizes = sorted(set(teachers.sizes) | set(int(s) for s in sizes))
    targets: dict[str, list] = {}
    preds: dict[int, dict[str, list]] = {int(s): {} for s in sizes}
    specs = []
    t0 = time.time()
    for n in range(views):
        spec = planner.plan(n)
        volume = next(v for v in planner.volumes[spec.source] if v.name == spec.volume)
        rendered = render(volume, planner.plane(volume, spec.orientation), spec, render_sizes)
        for name, value in teachers.encode(rendered).items():
            targets.setdefault(name, []).append(value)
        for size in sizes:
            image, box = rendered[int(size)]
            out = student(torch.from_numpy(image)[None], box.content_box)
            for name, value in out.items():
                preds[int(size)].setdefault(name, []).append(value.float())
        specs.append(dataclasses.asdict(spec))
        if (n + 1) % 8 == 0:
            log(f"fidelity: {n + 1}/{views} views, {time.time() - t0:.0f} s")
    rows = []
    for name in student.config.targets:  # a trunk's own output (the LiteMedSAM trunk's SAM map) included
        if name not in targets:
            continue
        target = torch.cat(targets[name])
        for size in sizes:
            rows.append({"feature": name, "input_size": int(size),
                         **fidelity_of(torch.cat(preds[int(size)][name]), target)})
    result = {"command": _command(), "run": str(run), "views": views, "seed": seed, "held_out": HELD_OUT,
              "sources": {k: [v.name for v in vs] for k, vs in planner.volumes.items()}, "rows": rows,
              "view_specs": specs, "seconds": round(time.time() - t0, 1)}
    return result


def fidelity_of(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Cosine (per pixel or per vector) and nMSE: squared error over the targets' total variance (per channel, about
    their mean over the evaluation set). PHI-S is a rotation and one scale, so this is the MSE in a PHI-S space fitted
    on these targets, without fitting one (48 vectors do not determine a 512-channel PCA)."""
    dim = 1 if pred.ndim == 4 else -1
    cos = F.cosine_similarity(pred.float(), target.float(), dim=dim).mean()
    flat = lambda x: x.float().movedim(1, -1).reshape(-1, x.shape[1]) if x.ndim == 4 else x.float()  # noqa: E731
    p, t = flat(pred), flat(target)
    variance = (t - t.mean(0)).pow(2).mean(0).sum()
    return {"cosine": float(cos), "nmse": float((p - t).pow(2).mean(0).sum() / variance.clamp(min=1e-20))}


def fidelity_markdown(result: dict) -> str:
    sizes = sorted({r["input_size"] for r in result["rows"]})
    names = list(dict.fromkeys(r["feature"] for r in result["rows"]))
    at = {(r["feature"], r["input_size"]): r for r in result["rows"]}
    lines = [f"# Student fidelity against the teachers, by input size", "",
             f"`{result['command']}`", "",
             f"{result['views']} held-out views ({', '.join(f'{k}: {len(v)} CTs' for k, v in result['sources'].items())});"
             " each cell: cosine / nMSE (1.0 = predicting the teachers' mean).", "",
             "| feature | " + " | ".join(f"{s} px" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{at[name, s]['cosine']:.3f} / {at[name, s]['nmse']:.2f}" for s in sizes) + " |")
    return "\n".join(lines) + "\n"


# ---- linear probe ------------------------------------------------------------------------------------------------
def probe_views(sizes, data: Path | None = None, patients: int = 16, slices: int = 6):
    """Axial slices of OpenKBP validation patients, cropped square to the body and soft-tissue windowed, rendered at
    each of ``sizes``: [(patient, {size: (image01, Letterbox)}, labels (G, G) int64 in PROBE_CLASSES)]."""
    from training.litemedsam_clicks.sources import load_openkbp

    data = Path(data) if data is not None else shared_data()
    folder = data / "openkbp" / "validation-pats"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found (set PRISMRT_SHARED_DATA to the shared data folder)")
    out = []
    for path in sorted(folder.glob("pt_*"), key=lambda p: int(p.name.split("_")[1]))[:patients]:
        v = load_openkbp(path)
        organs = [n for n in PROBE_CLASSES[2:] if n in v.structures]
        if not organs:
            continue
        volume = CTVolume(v.name, "openkbp", v.hu, v.geometry)
        plane = SlicePlane.create(v.geometry, "axial")
        label = np.zeros(v.hu.shape, np.uint8)
        label[v.hu > BODY_HU] = 1
        for name in organs:  # later organs win where masks overlap
            label[v.mask(name)] = PROBE_CLASSES.index(name)
        stack = plane.stack_view(label)
        with_organs = np.flatnonzero((stack >= 2).reshape(len(stack), -1).any(1))
        # evenly over the middle 70 % of the organ-bearing slices (the ends hold only the cord or brainstem)
        picks = np.quantile(np.arange(len(with_organs)), np.linspace(0.15, 0.85, slices)).round().astype(int)
        for index in with_organs[picks]:
            body = np.argwhere(plane.extract(v.hu, int(index)) > BODY_HU)
            (r0, c0), (r1, c1) = body.min(0), body.max(0) + 1
            sr, sc = plane.pixel_spacing
            side = max((r1 - r0) * sr, (c1 - c0) * sc) * 1.1
            h, w = side / sr, side / sc
            crop = (float((r0 + r1) / 2 - h / 2), float((c0 + c1) / 2 - w / 2), float(h), float(w))
            spec = ViewSpec("openkbp", v.name, "axial", int(index), crop, WINDOWS["soft-tissue"])
            views = render(volume, plane, spec, sizes)
            labels = _labels_on_grid(plane.extract(label, int(index)), views[int(sizes[0])][1], crop, PROBE_GRID)
            out.append((v.name, views, labels))
    return out


def _labels_on_grid(label_slice: np.ndarray, box, crop, grid: int) -> np.ndarray:
    """Per class area fractions at the model size, pooled to ``grid``; a cell takes the class covering most of it."""
    from PRISMRTLib.imaging.resize import crop_with_padding

    r0, c0, h, w = crop
    shape = (max(1, int(round(h))), max(1, int(round(w))))
    fractions = []
    for k in range(len(PROBE_CLASSES)):
        m = crop_with_padding((label_slice == k).astype(np.float32), r0, c0, shape, 1.0 if k == 0 else 0.0)
        fractions.append(box.resize_to_model(m, order=1, pad_value=1.0 if k == 0 else 0.0, antialias=False))
    f = torch.from_numpy(np.stack(fractions))[None]
    return F.adaptive_avg_pool2d(f, grid)[0].argmax(0).numpy().astype(np.int64)


def _on_grid(x: torch.Tensor, grid: int = PROBE_GRID) -> torch.Tensor:
    """(1, C, h, w) -> (grid * grid, C), bilinear (the usual linear-probe upsampling of patch features)."""
    if x.shape[-1] != grid:
        mode = dict(mode="bilinear", align_corners=False, antialias=x.shape[-1] > grid)
        x = F.interpolate(x.float(), size=(grid, grid), **mode)
    return x[0].permute(1, 2, 0).reshape(grid * grid, -1).float()


@torch.no_grad()
def probe_features(config, student, teachers, views, log=print) -> dict[str, list[torch.Tensor]]:
    from PRISMRTLib.models.student import Student

    torch.manual_seed(config.train.seed)  # the run's own random initialisation (train.build_student)
    control = Student(student.config).eval()
    size = student.config.img_size
    feats: dict[str, list] = {}
    t0 = time.time()
    for i, (_, rendered, _) in enumerate(views):
        image, box = torch.from_numpy(rendered[size][0])[None], rendered[size][1].content_box
        cls, tokens = student.tokens(image, box)
        feats.setdefault("student tokens (trained)", []).append(_on_grid(tokens.permute(0, 3, 1, 2)))
        _, control_tokens = control.tokens(image, box)
        feats.setdefault("student tokens (random init, control)", []).append(
            _on_grid(control_tokens.permute(0, 3, 1, 2)))
        for name, value in student.translate(cls, tokens).items():
            if value.ndim == 4:
                feats.setdefault(f"student -> {name}", []).append(_on_grid(value))
        for name, value in teachers.encode(rendered).items():
            if value.ndim == 4:
                feats.setdefault(f"teacher {name}", []).append(_on_grid(value))
        if (i + 1) % 16 == 0:
            log(f"probe: features of {i + 1}/{len(views)} slices, {time.time() - t0:.0f} s")
    return feats


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, classes: int, steps: int = 200,
              weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """Multinomial logistic regression on standardised features, plain (unweighted) cross-entropy as in the usual
    linear segmentation probes, full-batch L-BFGS. (Class-balanced weights made the rare organs spill over the
    body: body Dice 0.22-0.88 on the first run.)"""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x = (x_train - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y_train) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, linear


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney, ties averaged)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = torch.argsort(score)
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    values, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    if len(values) < len(score):  # average the ranks of ties
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_scores(pred: torch.Tensor, truth: torch.Tensor, classes: int,
                 probs: torch.Tensor | None = None) -> dict[str, float]:
    """Dice per class of the argmax, and (``probs``) each organ's ROC AUC one against the rest: threshold-free, so
    small organs that the argmax gives to the body still count for what the features hold."""
    out = {}
    for k in range(classes):
        p, t = pred == k, truth == k
        denom = int(p.sum() + t.sum())
        out[PROBE_CLASSES[k]] = float(2 * (p & t).sum() / denom) if denom and t.any() else float("nan")
    organs = [out[n] for n in PROBE_CLASSES[2:] if not np.isnan(out[n])]
    out["organ mean"] = float(np.mean(organs)) if organs else float("nan")
    if probs is not None:
        aucs = [_auc(probs[:, k], truth == k) for k in range(2, classes)]
        out.update({f"auc:{PROBE_CLASSES[k]}": a for k, a in zip(range(2, classes), aucs)})
        valid = [a for a in aucs if not np.isnan(a)]
        out["organ mean AUC"] = float(np.mean(valid)) if valid else float("nan")
    return out


def probe(run: Path, patients: int = 16, slices: int = 6, data: Path | None = None, log=print) -> dict:
    t0 = time.time()
    config, student = load_student(run)
    teachers = TeacherEncoders(config)
    views = probe_views([student.config.img_size, *teachers.sizes], data, patients, slices)
    if len({p for p, _, _ in views}) < 2:
        raise ValueError("the probe needs at least two OpenKBP validation patients with organs")
    names = list(dict.fromkeys(p for p, _, _ in views))
    train_patients = set(names[: len(names) // 2])
    is_train = torch.tensor([p in train_patients for p, _, _ in views])
    labels = torch.stack([torch.from_numpy(y.reshape(-1)) for _, _, y in views])
    feats = probe_features(config, student, teachers, views, log)
    rows = []
    for name, per_view in feats.items():
        x = torch.stack(per_view)  # (V, G*G, C)
        mean, std, linear = fit_probe(x[is_train].reshape(-1, x.shape[-1]), labels[is_train].reshape(-1),
                                      len(PROBE_CLASSES))
        with torch.no_grad():
            logits = linear((x[~is_train].reshape(-1, x.shape[-1]) - mean) / std)
        rows.append({"features": name, "channels": int(x.shape[-1]),
                     **probe_scores(logits.argmax(1), labels[~is_train].reshape(-1), len(PROBE_CLASSES),
                                    logits.softmax(1))})
        log(f"probe: {name}: organ mean Dice {rows[-1]['organ mean']:.3f}, AUC {rows[-1]['organ mean AUC']:.3f}")
    return {"command": _command(), "run": str(run), "train_patients": sorted(train_patients),
            "test_patients": [n for n in names if n not in train_patients], "slices_per_patient": slices,
            "grid": PROBE_GRID, "classes": list(PROBE_CLASSES), "rows": rows, "seconds": round(time.time() - t0, 1)}


def probe_markdown(result: dict) -> str:
    organs = list(PROBE_CLASSES[2:])
    lines = ["# Linear probe: frozen features -> head-and-neck classes", "", f"`{result['command']}`", "",
             f"OpenKBP validation patients, {result['slices_per_patient']} axial slices each, {result['grid']} x "
             f"{result['grid']} grid; fitted on {', '.join(result['train_patients'])}; scored (Dice per class) on "
             f"{', '.join(result['test_patients'])}.", "",
             "Each organ cell: Dice of the probe's argmax / ROC AUC of its probability (one organ against the rest).", "",
             "| features | channels | organ mean Dice / AUC | body Dice | " + " | ".join(organs) + " |",
             "|---|---|---|---|" + "---|" * len(organs)]
    for r in result["rows"]:
        lines.append(f"| {r['features']} | {r['channels']} | {r['organ mean']:.3f} / {r['organ mean AUC']:.3f} | "
                     f"{r['body']:.3f} | " + " | ".join(f"{r[o]:.2f} / {r['auc:' + o]:.2f}" for o in organs) + " |")
    return "\n".join(lines) + "\n"


# ---- delineation -------------------------------------------------------------------------------------------------
DEFAULT_CASES = ("docs/evaluation/cases/clinical_gtv.json", "docs/evaluation/cases/ts_ct_dicom.json")


def delineation(bundle: str, out: Path, cases=DEFAULT_CASES, teacher: str = "litemedsam-clicks", clicks: int = 3,
                modes=("2d",), firsts=("click",), overwrite: bool = False) -> dict:
    """eval-seg with the teacher first (the paired test's reference) and the student, same decoder and prompts."""
    from PRISMRTLib.cli import main as prismrt

    seg_out = out / "eval-seg"
    argv = ["eval-seg", *[str(c) for c in cases], "--model", f"teachers={teacher}", "--model", f"prismrt={bundle}",
            "--clicks", str(clicks), "--out", str(seg_out)]
    for m in modes:
        argv += ["--mode", m]
    for f in firsts:
        argv += ["--first", f]
    if overwrite:
        argv.append("--overwrite")
    code = prismrt(argv)
    if code:
        raise RuntimeError(f"prismrt {' '.join(argv)} exited {code}")
    seg = json.loads((seg_out / "results.json").read_text())
    teacher_name, student_name = seg["methods"][0], seg["methods"][1]
    by = {(s["method"], s["structure"], s["mode"], s["label"]): s for s in seg["summary"]}
    rows = []
    for (method, structure, mode, label), s in by.items():
        if method != teacher_name or (student_name, structure, mode, label) not in by:
            continue
        st = by[student_name, structure, mode, label]
        share = st["dice_mean"] / s["dice_mean"] if s["dice_mean"] > 0 else float("nan")
        rows.append({"structure": structure, "mode": mode, "prompts": label, "cases": s["cases"],
                     "teacher_dice": s["dice_mean"], "student_dice": st["dice_mean"], "share": share,
                     "meets_95": bool(share >= 0.95)})
    return {"command": _command(), "eval_seg_command": "prismrt " + " ".join(argv), "teacher": teacher_name,
            "student": student_name, "rows": rows, "wilcoxon_dice": seg.get("wilcoxon_dice", {})}


def delineation_markdown(result: dict) -> str:
    lines = ["# Student against teacher: delineation through the same decoder and prompts", "",
             f"`{result['command']}`", "", f"which ran `{result['eval_seg_command']}`", "",
             f"| structure | mode | prompts | cases | teacher ({result['teacher']}) | student ({result['student']}) "
             "| share | >= 95 % |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['structure']} | {r['mode']} | {r['prompts']} | {r['cases']} | {r['teacher_dice']:.3f} "
                     f"| {r['student_dice']:.3f} | {r['share']:.1%} | {'yes' if r['meets_95'] else 'no'} |")
    if result["wilcoxon_dice"]:
        lines += ["", "Paired Wilcoxon signed-rank tests on Dice (eval-seg's, over the case-structure pairs):", "",
                  "| comparison | pairs | p |", "|---|---|---|"]
        for name, w in result["wilcoxon_dice"].items():
            lines.append(f"| {name} | {w.get('n', '')} | {w['p_value']:.4f} |" if w.get("p_value") is not None
                         else f"| {name} | {w.get('n', '')} | |")
    return "\n".join(lines) + "\n"


# ---- CLI ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.distill.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    f = sub.add_parser("fidelity", help="per-feature cosine / nMSE against the teachers by input size")
    f.add_argument("--run", type=Path, required=True, help="a training run folder (config.json, checkpoint.pt)")
    f.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256, 384, 512])
    f.add_argument("--views", type=int, default=48)
    f.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("probe", help="linear probe of frozen features on OpenKBP validation organs")
    q.add_argument("--run", type=Path, required=True)
    q.add_argument("--patients", type=int, default=16)
    q.add_argument("--slices", type=int, default=6)
    q.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("delineation", help="eval-seg, teacher and student through the same decoder")
    d.add_argument("cases", nargs="*", default=list(DEFAULT_CASES))
    d.add_argument("--bundle", required=True, help="the student's prismrt bundle (folder or model name)")
    d.add_argument("--teacher", default="litemedsam-clicks")
    d.add_argument("--clicks", type=int, default=3)
    d.add_argument("--mode", action="append", choices=("2d", "3d"))
    d.add_argument("--first", action="append", choices=("click", "box"))
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--overwrite", action="store_true")
    for s in (f, q, d):
        s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if a.kind in ("fidelity", "probe") and not (a.run / "checkpoint.pt").exists():
        p.error(f"--run {a.run}: no checkpoint.pt there (a folder written by python -m training.distill.train)")
    if a.kind == "fidelity":
        result = fidelity(a.run, a.sizes, a.views, log=log)
        _write(a.out, "fidelity", result, fidelity_markdown(result))
    elif a.kind == "probe":
        result = probe(a.run, a.patients, a.slices, log=log)
        _write(a.out, "probe", result, probe_markdown(result))
    else:
        result = delineation(a.bundle, a.out, a.cases, a.teacher, a.clicks, tuple(a.mode or ("2d",)),
                             tuple(a.first or ("click",)), a.overwrite)
        _write(a.out, "delineation", result, delineation_markdown(result))
    log(f"wrote {a.out}/{a.kind}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
