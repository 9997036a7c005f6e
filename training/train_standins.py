"""Train the three stand-in teachers on OpenKBP head-and-neck CT, evaluate them, and ship them as one bundle.

    .venv/bin/python -m training.train_standins [--out training/runs/standins] [--seed 0] [--threads 1]
        [--medsam-steps N] [--medsam-finetune-steps N] [--biomedclip-steps N] [--dinov3-steps N] [--limit N]
        [--sequential]
        [--export] [--skip-training]

1. Trains MedSAM-like, BiomedCLIP-like and DINOv3-like models (``training/standins/*.py``), each in its own process
   (in parallel by default: each uses ``--threads`` CPU threads), seeded and resumable: run the same command again
   after an interruption and each continues from its last checkpoint. The MedSAM-like run has two stages: SAM-style
   interactive training (``medsam_base``), then fine-tuning weighted towards propagation steps out of structures'
   last slices (``medsam``), so that 3D propagation stops where a structure ends.
2. Evaluates each on ``validation-pats`` (their reports: ``report.md`` in each run folder) and copies the tables and
   training curves into ``training/standins/REPORT.md`` and ``docs/images/``.
3. With ``--export``: writes the ``teachers`` bundle ``teachers-standin-openkbp`` (float16 safetensors, a few MB) into
   ``PRISMRTLib/weights/shipped/`` and its entry (sizes, SHA-256) into ``PRISMRTLib/weights/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BUNDLE_NAME, BUNDLE_VERSION = "teachers-standin-openkbp", "2"
SHIPPED = REPO / "PRISMRTLib" / "weights" / "shipped"
MANIFEST = REPO / "PRISMRTLib" / "weights" / "manifest.json"
MIRROR = "https://raw.githubusercontent.com/prism-rt/PRISMRT/main/PRISMRTLib/weights/shipped"
# default steps: the shipped runs (training/standins/REPORT.md); at 1 thread: MedSAM-like 55 + 16 min (two stages), DINOv3-like 50 min, BiomedCLIP-like 16 min
DEFAULT_STEPS = {"medsam": 2500, "biomedclip": 1500, "dinov3": 2000}
TEACHERS = ("medsam", "biomedclip", "dinov3")


# the MedSAM-like run ends with a fine-tuning stage weighted towards propagation, stepping out of structures' last
# slices, so that 3D propagation learns to stop (training/standins/medsam.py, ``end_share``)
MEDSAM_FINETUNE = {"steps": 700, "lr": 2e-4, "p_propagate": 0.4, "end_share": 0.5}


def _train_commands(name: str, out: Path, steps: int, seed: int, threads: int, limit: int | None,
                    finetune_steps: int = MEDSAM_FINETUNE["steps"]) -> list[list[str]]:
    """The command lines of one teacher's training, run one after the other; the last writes ``out``."""
    def command(folder: Path, n: int, *extra: str) -> list[str]:
        cmd = [PY, "-m", f"training.standins.{name}", "train", "--out", str(folder), "--steps", str(n),
               "--seed", str(seed), "--threads", str(threads), *extra]
        return cmd + (["--limit", str(limit)] if limit else [])

    if name == "medsam":
        base = out.with_name(out.name + "_base")
        ft = MEDSAM_FINETUNE
        return [command(base, steps, "--no-eval"),
                command(out, finetune_steps, "--lr", str(ft["lr"]), "--p-propagate", str(ft["p_propagate"]),
                        "--end-share", str(ft["end_share"]), "--init-from", str(base))]
    return [command(out, steps, *(["--eval"] if name == "dinov3" else []))]


def train_all(out: Path, steps: dict, seed: int, threads: int, limit: int | None, sequential: bool,
              finetune_steps: int = MEDSAM_FINETUNE["steps"]) -> dict:
    """Train the teachers, each in its own process(es), side by side unless ``sequential``; wall time per teacher."""
    import threading

    out.mkdir(parents=True, exist_ok=True)
    seconds, failures = {}, {}

    def run(name: str) -> None:
        start = time.perf_counter()
        with open(out / f"{name}.log", "a") as log:
            for cmd in _train_commands(name, out / name, steps[name], seed, threads, limit, finetune_steps):
                print(f"[standins] {' '.join(cmd[1:])}  (log: {out / (name + '.log')})", flush=True)
                code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    failures[name] = code
                    return
        seconds[name] = time.perf_counter() - start
        print(f"[standins] {name} done in {seconds[name] / 60:.1f} min", flush=True)

    workers = [threading.Thread(target=run, args=(name,)) for name in TEACHERS]
    for w in workers:
        w.start()
        if sequential:
            w.join()
    for w in workers:
        w.join()
    if failures:
        raise SystemExit("[standins] training failed: " + ", ".join(f"{n} (exit {c})" for n, c in failures.items())
                         + "; see the logs in " + str(out))
    return seconds


def evaluate_all(out: Path, threads: int) -> None:
    """Evaluation alone (training runs already evaluate at their end; this is for --skip-training)."""
    for name in ("medsam", "biomedclip"):  # dinov3 evaluates at the end of its training run (--eval)
        cmd = [PY, "-m", f"training.standins.{name}", "eval", "--out", str(out / name), "--threads", str(threads)]
        print(f"[standins] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)


def collect_report(out: Path, seconds: dict) -> Path:
    """training/standins/REPORT.md from the run reports; curves copied to docs/images/."""
    images = REPO / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    parts = ["# Stand-in teachers: validation report", "",
             "Trained on the 170 OpenKBP `train-pats`, evaluated on the 33 `validation-pats` "
             "(`.venv/bin/python -m training.train_standins --export`). Not for clinical use.", ""]
    for name in TEACHERS:
        run = out / name
        report = next((run / n for n in ("report.md", "evaluation.md", "eval.md") if (run / n).exists()),
                      run / "report.md")
        parts += [f"## {name}", ""]
        if name in seconds:
            parts += [f"Training wall time: {seconds[name] / 60:.1f} min.", ""]
        parts += [report.read_text().strip() if report.exists() else "(no report)", ""]
        base = out / f"{name}_base" / "report.md"  # a first stage (MedSAM-like), for comparison
        if base.exists():
            demoted = re.sub(r"(?m)^(#+) ", r"###\1 ", base.read_text().strip())  # nested under this section
            parts += [f"### First stage (`{name}_base`), before fine-tuning", "", demoted, ""]
        for png in sorted(run.glob("*.png")):
            target = images / (f"standin_{png.name}" if png.name.startswith(name) else f"standin_{name}_{png.name}")
            shutil.copyfile(png, target)
            parts += [f"![{name} {png.stem}](../../docs/images/{target.name})", ""]
    path = REPO / "training" / "standins" / "REPORT.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def export_bundle(out: Path, folder: Path | None = None, manifest: Path | None = MANIFEST) -> Path:
    """The teachers bundle of the three trained stand-ins, shipped in the package (or written to ``folder``) and
    listed in ``manifest`` (None: not listed; for trying a bundle out with ``--teachers-model FOLDER``)."""
    import torch

    from PRISMRTLib.models import preset_configs, save_bundle
    from PRISMRTLib.weights import model_entry_for_folder
    from training.standins import biomedclip, dinov3, medsam

    configs = preset_configs("standin", None)
    modules = {  # by role, as the teacher registry names them
        "sam": medsam.load_trained(out / "medsam"),
        "dino": dinov3.load_trained(out / "dinov3"),
        "clip": biomedclip.load_trained(out / "biomedclip"),
    }
    folder = Path(folder) if folder is not None else SHIPPED / BUNDLE_NAME / BUNDLE_VERSION
    meta = {
        "description": "stand-in teachers (MedSAM-, DINOv3- and BiomedCLIP-like, small) trained on 170 OpenKBP "
                       "head-and-neck CTs; not for clinical use",
        "training_runs": {name: str((out / name).relative_to(REPO)) if (out / name).is_relative_to(REPO)
                          else str(out / name) for name in TEACHERS},
    }
    save_bundle(folder, "teachers", configs, modules, biomedclip.VOCAB_PATH, name=BUNDLE_NAME, version=BUNDLE_VERSION,
                meta=meta, overwrite=True, float_dtype=torch.float16)
    if manifest is None:
        return folder
    entry = model_entry_for_folder(
        folder, name=BUNDLE_NAME, version=BUNDLE_VERSION, base_urls=[MIRROR],
        licence="stand-in weights: MIT (trained on OpenKBP data, CC BY 3.0/4.0 via TCIA)",
        description=meta["description"], homepage="https://github.com/prism-rt/PRISMRT",
    )
    listing = json.loads(Path(manifest).read_text())
    listing["models"] = [m for m in listing.get("models", []) if m["name"] != BUNDLE_NAME] + [entry]
    Path(manifest).write_text(json.dumps(listing, indent=2) + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "training" / "runs" / "standins")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per training process")
    parser.add_argument("--limit", type=int, help="use only the first N training patients (quick runs)")
    parser.add_argument("--sequential", action="store_true", help="train one after the other")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate, report and export")
    parser.add_argument("--export", action="store_true", help="write the shipped bundle and manifest entry")
    for name in TEACHERS:
        parser.add_argument(f"--{name}-steps", type=int, default=DEFAULT_STEPS[name])
    parser.add_argument("--medsam-finetune-steps", type=int, default=MEDSAM_FINETUNE["steps"],
                        help="steps of the MedSAM-like propagation fine-tuning stage")
    args = parser.parse_args(argv)
    steps = {name: getattr(args, f"{name}_steps") for name in TEACHERS}
    seconds = {} if args.skip_training else train_all(args.out, steps, args.seed, args.threads, args.limit,
                                                       args.sequential, args.medsam_finetune_steps)
    if args.skip_training:
        evaluate_all(args.out, args.threads)
    print(f"[standins] report: {collect_report(args.out, seconds)}")
    if args.export:
        print(f"[standins] bundle: {export_bundle(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
