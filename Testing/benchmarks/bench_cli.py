"""How fast the CLI says no: `prismrt segment` with bad arguments, and `prismrt info`, each in a fresh process.

    python Testing/benchmarks/bench_cli.py [--repeat 5] [--ct CT.nii.gz]

Every `segment` case must fail (exit 2) in under 2 s: arguments, paths, outputs and prompts are checked before any
model code is imported. `info` runs on the shipped OpenKBP CT (128 x 128 x 128) unless --ct is given; it must not
import torch. Prints a markdown table (median and worst wall time of --repeat runs, process start included) and exits
with 1 if a case misses its limit or its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CT = REPO / "Testing" / "Data" / "openkbp_pt_226" / "ct.nii.gz"
LIMIT_S = 2.0
PROBE = """
import json, sys
from PRISMRTLib.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("\\nPROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def run(args: list[str]) -> tuple[float, int, bool, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    probe = json.loads(proc.stdout.rpartition("\nPROBE ")[2])
    return seconds, probe["code"], probe["torch"], proc.stderr.strip()


def voxel_point(ct: Path, index) -> str:
    import SimpleITK as sitk

    return ",".join(f"{v:.3f}" for v in sitk.ReadImage(str(ct)).TransformIndexToPhysicalPoint(index))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ct", type=Path, default=SAMPLE_CT)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        existing = Path(tmp) / "gtv.nii.gz"
        existing.write_bytes(b"a mask the user made")
        ct = str(opts.ct)
        inside = voxel_point(opts.ct, (64, 70, 60)) if opts.ct == SAMPLE_CT else "0,0,0"
        cases = [
            ("segment: no --point", ["segment", ct, "--out", str(Path(tmp) / "m.nii.gz")], 2, LIMIT_S),
            ("segment: unknown flag", ["segment", ct, "--point", inside, "--out", str(existing), "--fast"], 2, LIMIT_S),
            ("segment: existing --out", ["segment", ct, "--point", inside, "--out", str(existing)], 2, LIMIT_S),
            ("segment: --out .png", ["segment", ct, "--point", inside, "--out", str(Path(tmp) / "m.png")], 2, LIMIT_S),
            ("segment: click outside", ["segment", ct, "--point", "0,0,9000", "--out", str(Path(tmp) / "m.nii.gz")],
             2, LIMIT_S),
            ("segment: click on air", ["segment", ct, "--point", voxel_point(opts.ct, (0, 0, 0)),
                                       "--out", str(Path(tmp) / "m.nii.gz")], 2, LIMIT_S),
            ("info", ["info", ct], 0, None),
        ]
        rows, failed = [], False
        for name, args, want, limit in cases:
            runs = [run(args) for _ in range(opts.repeat)]
            times = [r[0] for r in runs]
            code, torch_loaded, err = runs[-1][1], runs[-1][2], runs[-1][3]
            ok = code == want and not torch_loaded and (limit is None or max(times) < limit)
            failed |= not ok
            rows.append(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} | {code} | "
                        f"{'yes' if torch_loaded else 'no'} | {'ok' if ok else 'FAIL'} | "
                        f"{err.splitlines()[-1][:90] if err else ''} |")
    print(f"`prismrt` in a fresh process, {opts.repeat} runs each ({Path(opts.ct).name}; limit {LIMIT_S:g} s for "
          "bad arguments)\n")
    print("| case | median s | worst s | exit | torch imported | verdict | message |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
