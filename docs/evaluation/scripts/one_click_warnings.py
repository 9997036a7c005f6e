"""One click at each clinical GTV's deepest voxel (3D, mm) through `prismrt segment` with no other flag: the slice
Dice, the predicted IoU and the warnings it prints (docs/evaluation/delineation_clinical.md, "Warnings on poor masks").

    .venv/bin/python docs/evaluation/scripts/one_click_warnings.py
"""
import json, subprocess, sys, os, tempfile
from pathlib import Path
import SimpleITK as sitk
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from PRISMRTLib.segmentation.prompts import first_click
cases = json.load(open("docs/evaluation/cases/clinical_gtv.json"))["cases"]
base = "docs/evaluation/cases/"
for c in cases:
    img = base + c["image"]; m = sitk.ReadImage(base + c["structures"]["GTV"])
    a = sitk.GetArrayFromImage(m) != 0
    k, j, i = first_click(a, spacing=m.GetSpacing()[::-1])
    p = m.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
    out = os.path.join(tempfile.gettempdir(), f"prismrt_warn_{c['id']}.nii.gz")
    r = subprocess.run([".venv/bin/prismrt", "segment", img, "--point", ",".join(f"{v:.2f}" for v in p), "--out", out, "--overwrite"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    pred = sitk.GetArrayFromImage(sitk.ReadImage(out))[k] != 0
    d = 2 * (pred & a[k]).sum() / (pred.sum() + a[k].sum())
    warn = [l for l in (r.stdout + r.stderr).splitlines() if "warning" in l.lower()]
    iou = [l for l in (r.stdout + r.stderr).splitlines() if "IoU" in l]
    print(c["id"], f"{d:.3f}", iou[:1], warn)
