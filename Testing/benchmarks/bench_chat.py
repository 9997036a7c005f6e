"""The chat's batch mode: `prismrt ask CT --questions FILE.jsonl --segmentation ... --json` on 1,000 questions about
one CT, each run in a fresh process (model loading included), side by side:

    python Testing/benchmarks/bench_chat.py [--questions 1000] [--slices 40] [--ct-dir Testing/Data/openkbp_pt_226]

- structures only (``--no-image-model``): header and structure questions, no model ever loaded;
- with the image model: the same questions plus image-only ones (organ visibility, target presence) on ``--slices``
  distinct axial slices, so the backbone runs once per distinct slice;
- image only: no structures given, every question (organ visibility, target presence) answered from the pixels.

Prints a markdown table (wall seconds, questions per second, the share answered by each source) and exits with 1
when a run misses the issue's bar (1,000 questions in under a minute) or a line comes back without an answer.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 60.0

STRUCTURE_QUESTIONS = [
    "is the {s} in this slice?", "how big is {s}?", "which side is the {s} on?", "how far is the {s} from PTV70?",
    "is the {s} behind PTV70?", "does PTV70 overlap the {s}?", "how many slices does the {s} span?",
    "which organs are on this slice?", "how many structures are here?",
]
HEADER_QUESTIONS = ["what is the slice thickness?", "what is the pixel spacing?", "is this a CT?",
                    "is this a sagittal view?", "how long is the scan?", "what is the field of view?"]
IMAGE_QUESTIONS = ["is the mandible visible here?", "is there a target on this slice?", "can you see the larynx?",
                   "is the spinal cord in this image?", "is the brainstem visible?"]


def questions(n: int, slices: list[int], structures: list[str], image: bool) -> list[dict]:
    pool = [q.format(s=s) for q in STRUCTURE_QUESTIONS for s in structures] + HEADER_QUESTIONS
    if image:
        pool += IMAGE_QUESTIONS * 4
    if not structures:  # image only: every question goes to the pixels
        pool = IMAGE_QUESTIONS
    return [{"id": i, "question": pool[i % len(pool)], "slice": f"axial:{slices[i % len(slices)]}"}
            for i in range(n)]


def run(ct_dir: Path, items: list[dict], image: bool, masks: list[Path]) -> tuple[float, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.jsonl"
        path.write_text("\n".join(json.dumps(q) for q in items) + "\n")
        args = [sys.executable, "-m", "PRISMRTLib.cli", "ask", str(ct_dir / "ct.nii.gz"), "--questions", str(path),
                "--json", "--device", "cpu"]
        if not image:
            args.append("--no-image-model")
        for m in masks:
            args += ["--segmentation", str(m)]
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=1800)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prismrt ask failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--ct-dir", type=Path, default=REPO / "Testing" / "Data" / "openkbp_pt_226")
    args = parser.parse_args()
    import SimpleITK as sitk

    depth = sitk.ReadImage(str(args.ct_dir / "ct.nii.gz")).GetSize()[2]
    slices = [int(round(depth * (0.2 + 0.6 * i / max(args.slices - 1, 1)))) for i in range(args.slices)]
    masks = sorted(p for p in args.ct_dir.glob("*.nii.gz") if p.name != "ct.nii.gz" and "dose" not in p.name)
    names = [p.name.removesuffix(".nii.gz") for p in masks]
    rows, ok = [], True
    for image, given in ((False, masks), (True, masks), (True, [])):
        items = questions(args.questions, slices, names if given else [], image)
        seconds, answers = run(args.ct_dir, items, image, given)
        complete = len(answers) == len(items) and all(a.get("answer") and a.get("source") for a in answers)
        sources = collections.Counter(a["source"].split(" (")[0] for a in answers)
        ok &= complete and seconds < LIMIT_S
        rows.append((("image only (no structures), " if not given else "with the image model, " if image
                      else "structures and header only, ")
                     + f"{len(set(q['slice'] for q in items))} slices", len(items), seconds, sources, complete))
    print(f"`prismrt ask --questions` on {args.ct_dir.name} ({len(names)} structures), one process per run\n")
    print("| run | questions | wall s | questions/s | answered by | complete |")
    print("|---|---|---|---|---|---|")
    for name, n, seconds, sources, complete in rows:
        by = ", ".join(f"{k} {v}" for k, v in sources.most_common())
        print(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.0f} | {by} | {'yes' if complete else 'NO'} |")
    print(f"\nratio to structures only: with the image model {rows[1][2] / rows[0][2]:.1f}x, image only "
          f"{rows[2][2] / rows[0][2]:.1f}x; bar: {LIMIT_S:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
