"""Peak memory of `prismrt info`, `overview` and `segment` on a huge CT, each in a fresh process.

    python Testing/benchmarks/bench_memory.py [--size 1024,1024,600] [--small 512,512,100] [--format .nii.gz]
        [--model NAME|FOLDER] [--propagate] [--keep DIR]

Makes a synthetic CT-like int16 volume (air around an elliptic body of soft tissue with noise, two lungs, a spine of
bone and a soft-tissue lesion in the right lung), written once, compressed, into a temporary folder; then runs each
command under GNU ``/usr/bin/time -v`` and reads its "Maximum resident set size" (the peak RSS of that one process,
Python, PyTorch and the model included). ``segment`` gets one positive click at the lesion's centre and runs the
default model (LiteMedSAM fine-tuned for clicks) unless ``--model`` names another (e.g. teachers-standin-openkbp);
the table says which model ran. The same is done for a small volume (``--small``; ``--small none`` skips it) for
comparison. Prints a markdown table; the ratio is peak RSS over the volume's size in memory as int16.
Run with OMP_NUM_THREADS=1 on a shared machine; the commands run one after another, never two at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SPACING = (0.5, 0.5, 1.0)  # mm (i, j, k): a 1024 x 1024 slice spans a 512 mm field of view
LESION_RADIUS_MM = 15.0
GIB = 1024 ** 3


def _size(text: str) -> "tuple[int, int, int] | None":
    if text.lower() == "none":
        return None
    values = tuple(int(v) for v in text.replace("x", ",").split(","))
    if len(values) != 3 or min(values) < 16:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size I,J,K (each at least 16)")
    return values


def _geometry(size):
    """Spacing scaled so that any size covers the same anatomy (512 x 512 x 600 mm at full size)."""
    ni, nj, nk = size
    spacing = (SPACING[0] * 1024 / ni, SPACING[1] * 1024 / nj, SPACING[2] * 600 / nk)
    origin = (-spacing[0] * (ni - 1) / 2, -spacing[1] * (nj - 1) / 2, 0.0)
    return spacing, origin


def lesion_centre(size) -> tuple[float, float, float]:
    """LPS mm of the lesion's centre: in the patient's right lung (-x), mid-chest."""
    spacing, origin = _geometry(size)
    return (-95.0, -10.0, origin[2] + 0.6 * (size[2] - 1) * spacing[2])


def make_volume(size, path: Path, seed: int = 0) -> None:
    """Write the synthetic CT (int16 HU) to ``path``; built slice by slice into one int16 array."""
    import SimpleITK as sitk

    ni, nj, nk = size
    spacing, origin = _geometry(size)
    x = origin[0] + spacing[0] * np.arange(ni, dtype=np.float32)[None, :]
    y = origin[1] + spacing[1] * np.arange(nj, dtype=np.float32)[:, None]
    body = (x / 170.0) ** 2 + (y / 120.0) ** 2 <= 1.0  # 340 x 240 mm body
    spine = (x / 18.0) ** 2 + ((y - 70.0) / 18.0) ** 2 <= 1.0
    lungs = (((np.abs(x) - 85.0) / 60.0) ** 2 + ((y + 5.0) / 75.0) ** 2) <= 1.0
    cx, cy, cz = lesion_centre(size)
    rng = np.random.default_rng(seed)
    volume = np.empty((nk, nj, ni), np.int16)
    for k in range(nk):
        z = origin[2] + spacing[2] * k
        hu = np.full((nj, ni), -1000.0, np.float32)
        hu[body] = 40.0
        if 0.35 * nk * spacing[2] < z < 0.8 * nk * spacing[2]:  # chest: lungs
            hu[lungs] = -850.0
        hu[spine] = 700.0
        dz = z - cz
        if abs(dz) < LESION_RADIUS_MM:
            hu[(x - cx) ** 2 + (y - cy) ** 2 + dz ** 2 <= LESION_RADIUS_MM ** 2] = 30.0
        hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32) * body  # noise in the body only
        volume[k] = np.clip(np.rint(hu), -1024, 3071)
    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), True)


def run_measured(args: list[str], env: dict) -> dict:
    """Run ``python -m PRISMRTLib.cli ARGS`` under /usr/bin/time -v: exit code, wall time, peak RSS and output."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        command = ["/usr/bin/time", "-v", "-o", report.name, sys.executable, "-m", "PRISMRTLib.cli", *args]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.perf_counter() - start
        text = report.read()
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"code": proc.returncode, "seconds": seconds, "peak": int(match.group(1)) * 1024 if match else None,
            "stdout": proc.stdout.strip(), "stderr": proc.stderr.strip()}


def _model_of(stdout: str) -> str:
    """The backend's description that `segment` prints in its summary line."""
    match = re.search(r"predicted IoU on slice \d+: [\d.]+ \((.+?), (cpu|cuda|mps)", stdout)
    return match.group(1) if match else "?"


def bench(size, opts, tmp: Path, env: dict) -> list[str]:
    name = "x".join(map(str, size))
    path = tmp / f"ct_{name}{opts.format}"
    t0 = time.perf_counter()
    if not (opts.keep and path.exists()):  # a kept folder's volume is reused
        make_volume(size, path)
    made = time.perf_counter() - t0
    in_memory = int(np.prod(size)) * 2
    print(f"{name}: wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB on disk, {in_memory / GIB:.2f} GiB as "
          f"int16) in {made:.0f} s", file=sys.stderr, flush=True)
    point = ",".join(f"{v:.2f}" for v in lesion_centre(size))
    cases = [("info", ["info", str(path)]),
             ("overview", ["overview", str(path), "--out", str(tmp / f"overview_{name}"), "--overwrite"])]
    segment = ["segment", str(path), "--point", point, "--out", str(tmp / f"gtv_{name}.nii.gz"), "--overwrite"]
    if opts.model:
        segment += ["--model", opts.model]
    cases.append(("segment (1 click)", segment))
    if opts.propagate:
        cases.append(("segment (1 click) --propagate",
                      [*segment, "--propagate"]))
    rows = []
    for label, args in cases:
        result = run_measured(args, env)
        if result["code"] != 0:
            print(f"{label} on {name} failed ({result['code']}): {result['stderr'][-2000:]}", file=sys.stderr)
        note = _model_of(result["stdout"]) if label.startswith("segment") else ""
        if label.startswith("segment") and result["code"] == 0:
            found = re.search(r"[\d.]+ cm3 on \d+ \w+ slice\(s\)", result["stdout"])
            note += f"; {found.group(0)}" if found else ""
        peak = result["peak"] or 0
        rows.append(f"| {name} | {path.stat().st_size / 1e6:.0f} | {label} | {peak / GIB:.2f} | "
                    f"{result['seconds']:.1f} | {peak / in_memory:.2f} | {result['code']} | {note} |")
        print(rows[-1], file=sys.stderr, flush=True)
    if not opts.keep:
        path.unlink()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_size, default=(1024, 1024, 600), help="I,J,K of the huge volume")
    parser.add_argument("--small", type=_size, default=(512, 512, 100), help="I,J,K of the comparison volume, or none")
    parser.add_argument("--format", choices=(".nii.gz", ".nrrd", ".mha"), default=".nii.gz")
    parser.add_argument("--model", help="segment with this model (name or bundle folder; default: the default one)")
    parser.add_argument("--propagate", action="store_true", help="also measure segment --propagate")
    parser.add_argument("--keep", type=Path, help="work in this folder (kept; a volume already there is reused) "
                                                    "instead of a temporary one")
    opts = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        print("needs GNU time (/usr/bin/time -v): apt-get install time", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tmp = Path(opts.keep or tempfile.mkdtemp(prefix="prismrt-bench-memory-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for size in [s for s in (opts.small, opts.size) if s is not None]:
            rows += bench(size, opts, tmp, env)
    finally:
        if opts.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Peak RSS per command, each a fresh process (`/usr/bin/time -v`); ratio = peak / the volume's size as "
          f"int16; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| volume (i x j x k) | file MB | command | peak RSS (GiB) | wall s | ratio to volume | exit "
          "| model / result |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
