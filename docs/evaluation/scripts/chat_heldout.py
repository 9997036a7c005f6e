"""Held-out check of the chat (issue #15): questions in wordings written for this script (none taken from the
parser's tuning data), with truths computed here from the masks and header (numpy, SimpleITK; CaseData's exact
distance and midline helpers), asked through ChatSession with structures and no image model.

    OMP_NUM_THREADS=1 .venv/bin/python docs/evaluation/scripts/chat_heldout.py

Prints accuracy overall and per kind, every wrong answer, and how many replies were "cannot tell" / clarify.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from PRISMRTLib.chat.evaluation import CaseData, mask_files, value_matches  # noqa: E402
from PRISMRTLib.chat.session import ChatSession  # noqa: E402
from PRISMRTLib.chat.structures import StructureSet  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PT201 = DATA / "openkbp" / "validation-pats" / "pt_201"
PT230 = DATA / "openkbp" / "validation-pats" / "pt_230"
LUNG1 = DATA / "clinical" / "nsclc_radiomics_lung1" / "LUNG1-001"
DIRS = {"left": (0, 1.0), "right": (0, -1.0), "posterior": (1, 1.0), "anterior": (1, -1.0),
        "superior": (2, 1.0), "inferior": (2, -1.0)}


class Truth:
    """Truths of one case, from its masks and header. A method returns None when the truth is not clear-cut
    (the question is then skipped)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.image = sitk.ReadImage(str(folder / "ct.nii.gz"))
        self.cd = CaseData(folder, image=self.image)
        self.s = self.cd.structures
        self.size = np.array(self.image.GetSize())
        self.sp = np.array(self.image.GetSpacing())
        self.kz = self.cd.z_axis  # 2 for all three cases

    # header
    def thickness(self):
        return float(self.sp[self.kz]), {"abs": 0.01}, "mm"

    def pixel(self):  # axial [row, column] = [j spacing, i spacing]
        return [float(self.sp[1]), float(self.sp[0])], {"abs": 0.01}, "mm"

    def fov(self):  # axial [width, height]
        return [float(self.size[0] * self.sp[0]), float(self.size[1] * self.sp[1])], {"abs": float(self.sp[0])}, "mm"

    def length(self):
        return float(self.size[2] * self.sp[2]), {"abs": float(self.sp[2])}, "mm"

    def nslices(self):
        return int(self.size[2]), None, None

    def dims(self):
        return [int(v) for v in self.size], None, None

    # structures
    def k_range(self, n):
        ks = np.flatnonzero(self.s[n].areas[2])
        return int(ks[0]), int(ks[-1])

    def mid_k(self, n):
        lo, hi = self.k_range(n)
        return (lo + hi) // 2

    def vol(self, n):
        return float(self.s[n].voxels * np.prod(self.sp) / 1000.0), {"rel": 0.02}, "cm3"

    def extent(self, n):
        lo, hi = self.k_range(n)
        return float((hi - lo + 1) * self.sp[2]), {"abs": float(self.sp[2])}, "mm"

    def on_slice(self, n, k):
        lo, hi = self.k_range(n)
        area = self.s[n].areas[2][k]
        if area >= 3 and lo < k < hi:
            return True, None, None
        if k <= lo - 2 or k >= hi + 2:
            return False, None, None
        return None

    def dist(self, a, b):
        centre, gap = self.cd.distances(self.s[a], self.s[b])
        if gap < float(self.sp.max()):
            return None
        return centre, {"low": gap, "high": centre, "abs": 0.5, "rel": 0.02}, "mm"

    def dist_within(self, a, b, mm):
        centre, gap = self.cd.distances(self.s[a], self.s[b])
        margin = max(3.0, float(self.sp.max()))
        if abs(centre - mm) < margin or abs(gap - mm) < margin or (gap < mm < centre):
            return None
        return bool(centre < mm), None, None

    def overlap(self, a, b):
        shared = self.cd.overlap_voxels(self.s[a], self.s[b])
        if shared >= 10 and shared * np.prod(self.sp) / 1000.0 >= 0.5:
            return True, None, None
        if shared == 0 and self.cd.distances(self.s[a], self.s[b])[1] >= float(self.sp.max()):
            return False, None, None
        return None

    def side(self, n):
        v = self.cd.structure_side(self.s[n])
        return None if v is None else (v, None, None)

    def rel(self, a, direction, b):
        """Is a <direction> of b (centroids >= 15 mm apart along it, else not asked)."""
        ax, sign = DIRS[direction]
        ca = self.cd.points(self.s[a])[:, ax] if self.s[a].voxels < 3e6 else self.cd.coarse_points(self.s[a])[:, ax]
        cb = self.cd.points(self.s[b])[:, ax] if self.s[b].voxels < 3e6 else self.cd.coarse_points(self.s[b])[:, ax]
        d = sign * (ca.mean() - cb.mean())
        dm = sign * (np.median(ca) - np.median(cb))
        if abs(d) < 15 or abs(dm) < 10 or np.sign(d) != np.sign(dm):
            return None
        return bool(d > 0), None, None

    def closer(self, a, b, ref):
        da = self.cd.distances(self.s[a], self.s[ref])
        db = self.cd.distances(self.s[b], self.s[ref])
        margin = max(5.0, 1.5 * float(self.sp.max()))
        if min(abs(da[0] - db[0]), abs(da[1] - db[1])) < margin or np.sign(da[0] - db[0]) != np.sign(da[1] - db[1]):
            return None
        return (self.s[a].sid if da[0] < db[0] else self.s[b].sid), None, None

    def on_k(self, k):
        """ids on axial slice k; None when a structure shows only 1-4 voxels there."""
        out = []
        for s in self.s.values():
            a = s.areas[2][k]
            if 1 <= a <= 4:
                return None
            if a:
                out.append(s.sid)
        return sorted(out)

    def clean(self, k):
        """The axial slice nearest k where no structure shows only 1-4 voxels (so list/count truths are clear)."""
        for d in range(0, 15):
            for kk in (k + d, k - d):
                if 0 <= kk < self.size[2] and self.on_k(kk) is not None:
                    return kk
        return k

    def list_on(self, k, group=None):
        ids = self.on_k(k)
        if ids is None:
            return None
        if group:
            ids = [i for i in ids if next(s for s in self.s.values() if s.sid == i).group == group]
        return ids, None, None

    def count_on(self, k, group=None):
        v = self.list_on(k, group)
        return None if v is None else (len(v[0]), None, None)

    def count_ptv(self):
        return sum(1 for n in self.s if n.upper().startswith("PTV")), None, None

    def fixed(self, value):
        return value, None, None


NOT = "NOT_ANSWERABLE"


def questions_pt201(t: Truth):
    m_par_l, m_par_r = t.mid_k("LeftParotid"), t.mid_k("RightParotid")
    k_lar, k_eso, k_bs = t.mid_k("Larynx"), t.mid_k("Esophagus"), t.mid_k("Brainstem")
    c_lar, c_par, c_eso = t.clean(k_lar), t.clean(m_par_r), t.clean(k_eso)
    return [
        ("slice_thickness", "slice thickness?", None, t.thickness),
        ("slice_thickness", "what's the slice spacing on this scan pls", None, t.thickness),
        ("pixel_size", "in-plane resolution?", None, t.pixel),
        ("field_of_view", "what FOV was this reconstructed with", None, t.fov),
        ("slice_count", "how many axial slices in the dataset?", None, t.nslices),
        ("dimensions", "matrix size of the CT", None, t.dims),
        ("scan_length", "what's the cranio-caudal coverage of the scan?", None, t.length),
        ("modality", "is this an MRI?", None, lambda: t.fixed(False)),
        ("plane", "what orientation is this slice", f"axial:{k_lar}", lambda: t.fixed("axial")),
        ("volume", "vol of PTV70?", None, lambda: t.vol("PTV70")),
        ("volume", "what is the volume of the L parotid in cc", None, lambda: t.vol("LeftParotid")),
        ("volume", "rt parotid volume", None, lambda: t.vol("RightParotid")),
        ("volume", "how big is the brain stem", None, lambda: t.vol("Brainstem")),
        ("volume", "How large is the PTV 63 (in ml)?", None, lambda: t.vol("PTV63")),
        ("extent", "craniocaudal length of the cord?", None, lambda: t.extent("SpinalCord")),
        ("extent", "how long is the oesophagus contour", None, lambda: t.extent("Esophagus")),
        ("laterality", "which side is the left parotid on", None, lambda: t.side("LeftParotid")),
        ("laterality", "what side's the R parotid", None, lambda: t.side("RightParotid")),
        ("laterality", "is the cord midline?", None,
         lambda: (lambda v: None if v is None else (v[0] == "midline", None, None))(t.side("SpinalCord"))),
        ("presence", "is the larynx on this slice?", f"axial:{k_lar}", lambda: t.on_slice("Larynx", k_lar)),
        ("presence", "can I see the brainstem here", f"axial:{k_eso}", lambda: t.on_slice("Brainstem", k_eso)),
        ("presence", "L parotid in this image?", f"axial:{m_par_l}", lambda: t.on_slice("LeftParotid", m_par_l)),
        ("presence", "any oesophagus on this cut?", f"axial:{k_bs}", lambda: t.on_slice("Esophagus", k_bs)),
        ("presence", "is PTV70 visible on this slice", f"axial:{t.mid_k('PTV70')}",
         lambda: t.on_slice("PTV70", t.mid_k("PTV70"))),
        ("list", "which structures are contoured on this slice?", f"axial:{c_lar}", lambda: t.list_on(c_lar)),
        ("list", "what OARs are on this slice", f"axial:{c_par}", lambda: t.list_on(c_par, "organ")),
        ("count", "how many PTVs are there", None, t.count_ptv),
        ("count", "how many organs at risk on this slice?", f"axial:{c_eso}", lambda: t.count_on(c_eso, "organ")),
        ("distance", "dist from cord to PTV70?", None, lambda: t.dist("SpinalCord", "PTV70")),
        ("distance", "how far is the brainstem from the larynx", None, lambda: t.dist("Brainstem", "Larynx")),
        ("distance", "min distance between the two parotids?", None, lambda: t.dist("LeftParotid", "RightParotid")),
        ("distance", "is the cord within 5 mm of the PTV70?", None, lambda: t.dist_within("SpinalCord", "PTV70", 5)),
        ("overlap", "does PTV70 overlap the L parotid?", None, lambda: t.overlap("PTV70", "LeftParotid")),
        ("overlap", "is there any overlap between the brainstem and PTV56", None,
         lambda: t.overlap("Brainstem", "PTV56")),
        ("overlap", "do the larynx and PTV70 intersect", None, lambda: t.overlap("Larynx", "PTV70")),
        ("relative_position", "is the cord posterior to the larynx?", None,
         lambda: t.rel("SpinalCord", "posterior", "Larynx")),
        ("relative_position", "is the brainstem above the larynx", None,
         lambda: t.rel("Brainstem", "superior", "Larynx")),
        ("relative_position", "is the oesophagus superior to the mandible?", None,
         lambda: t.rel("Esophagus", "superior", "Mandible")),
        ("closer", "which parotid is nearer the cord?", None, lambda: t.closer("LeftParotid", "RightParotid",
                                                                               "SpinalCord")),
        ("unanswerable", "what's the volume of the liver", None, lambda: t.fixed(NOT)),
        ("unanswerable", "how far is the heart from PTV70?", None, lambda: t.fixed(NOT)),
    ]


def questions_pt230(t: Truth):
    k_lar, k_man, k_eso = t.mid_k("Larynx"), t.mid_k("Mandible"), t.mid_k("Esophagus")
    k_cord = t.mid_k("SpinalCord")
    c_lar = t.clean(k_lar)
    return [
        ("slice_thickness", "how thick are the slices", None, t.thickness),
        ("slice_thickness", "slice thicknes?", None, t.thickness),
        ("pixel_size", "pixel spacing pls", None, t.pixel),
        ("field_of_view", "how wide's the field of view", None, t.fov),
        ("slice_count", "no. of slices?", None, t.nslices),
        ("dimensions", "what are the image dimensions in voxels", None, t.dims),
        ("scan_length", "scan length in the z direction?", None, t.length),
        ("modality", "what kind of imaging is this", None, lambda: t.fixed("CT")),
        ("plane", "is this an axial slice?", f"axial:{k_man}", lambda: t.fixed(True)),
        ("volume", "volume of the mandible", None, lambda: t.vol("Mandible")),
        ("volume", "PTV56 vol in cm3", None, lambda: t.vol("PTV56")),
        ("volume", "how many cc is the left parotid gland", None, lambda: t.vol("LeftParotid")),
        ("volume", "whats the larynx volume", None, lambda: t.vol("Larynx")),
        ("volume", "size of the high dose PTV?", None, lambda: t.vol("PTV70")),
        ("extent", "sup-inf extent of the larynx?", None, lambda: t.extent("Larynx")),
        ("extent", "how long is the spinal cord", None, lambda: t.extent("SpinalCord")),
        ("extent", "over what length does the PTV70 extend craniocaudally", None, lambda: t.extent("PTV70")),
        ("laterality", "which side is the L parotid", None, lambda: t.side("LeftParotid")),
        ("laterality", "is the right parotid on the patient's right?", None,
         lambda: (lambda v: None if v is None else (v[0] == "right", None, None))(t.side("RightParotid"))),
        ("presence", "is the mandible in this slice?", f"axial:{k_man}", lambda: t.on_slice("Mandible", k_man)),
        ("presence", "is the larynx visible here?", f"axial:{t.k_range('Larynx')[1] + 20}",
         lambda: t.on_slice("Larynx", t.k_range("Larynx")[1] + 20)),
        ("presence", "oesophagus on this slice?", f"axial:{k_eso}", lambda: t.on_slice("Esophagus", k_eso)),
        ("presence", "do we have the R parotid on this one", f"axial:{k_eso}",
         lambda: t.on_slice("RightParotid", k_eso)),
        ("presence", "is there cord in this slice", f"axial:{k_cord}", lambda: t.on_slice("SpinalCord", k_cord)),
        ("list", "what's contoured here?", f"axial:{k_man}", lambda: t.list_on(k_man)),
        ("list", "list the targets on this slice", f"axial:{c_lar}", lambda: t.list_on(c_lar, "target")),
        ("count", "how many PTV's are contoured?", None, t.count_ptv),
        ("count", "number of structures on this slice", f"axial:{c_lar}", lambda: t.count_on(c_lar)),
        ("distance", "how far is the cord from the larynx?", None, lambda: t.dist("SpinalCord", "Larynx")),
        ("distance", "distance between the L parotid and the larynx", None, lambda: t.dist("LeftParotid", "Larynx")),
        ("distance", "how close does the cord get to PTV56", None, lambda: t.dist("SpinalCord", "PTV56")),
        ("distance", "gap between mandible and oesophagus in mm?", None, lambda: t.dist("Mandible", "Esophagus")),
        ("distance", "is the R parotid within 2 cm of the larynx", None,
         lambda: t.dist_within("RightParotid", "Larynx", 20)),
        ("overlap", "does the PTV70 overlap the larynx", None, lambda: t.overlap("PTV70", "Larynx")),
        ("overlap", "does PTV63 overlap the cord?", None, lambda: t.overlap("PTV63", "SpinalCord")),
        ("overlap", "any overlap of the rt parotid with PTV56", None, lambda: t.overlap("RightParotid", "PTV56")),
        ("relative_position", "is the mandible anterior to the cord", None,
         lambda: t.rel("Mandible", "anterior", "SpinalCord")),
        ("relative_position", "is the larynx below the parotids?", None,
         lambda: t.rel("Larynx", "inferior", "LeftParotid")),
        ("relative_position", "is the left parotid to the right of the right parotid", None,
         lambda: t.rel("LeftParotid", "right", "RightParotid")),
        ("closer", "which is closer to the larynx, the L or the R parotid?", None,
         lambda: t.closer("LeftParotid", "RightParotid", "Larynx")),
        ("closer", "is the mandible or the oesophagus closer to the larynx", None,
         lambda: t.closer("Mandible", "Esophagus", "Larynx")),
        ("unanswerable", "is the brainstem on this slice?", f"axial:{k_man}", lambda: t.fixed(NOT)),
    ]


def questions_lung1(t: Truth):
    k_gtv, k_top = t.mid_k("GTV-1"), t.k_range("Lung_L")[1] - 5
    k_low = t.k_range("Lung_R")[0] + 8
    return [
        ("slice_thickness", "what slice thickness was this scanned at?", None, t.thickness),
        ("pixel_size", "what's the pixel size", None, t.pixel),
        ("pixel_size", "voxel size in plane?", None, t.pixel),
        ("field_of_view", "field of view?", None, t.fov),
        ("slice_count", "how many slices does this CT have", None, t.nslices),
        ("dimensions", "image matrix?", None, t.dims),
        ("scan_length", "how long is the scan", None, t.length),
        ("modality", "is this CT", None, lambda: t.fixed(True)),
        ("plane", "which plane is this", f"coronal:{int(t.size[1] // 2)}", lambda: t.fixed("coronal")),
        ("volume", "GTV volume?", None, lambda: t.vol("GTV-1")),
        ("volume", "what is the volume of the CTV", None, lambda: t.vol("CTV-1")),
        ("volume", "how big is the PTV in cc", None, lambda: t.vol("PTV-1")),
        ("volume", "volume of the left lung", None, lambda: t.vol("Lung_L")),
        ("volume", "R lung vol", None, lambda: t.vol("Lung_R")),
        ("volume", "how large is the tumour", None, lambda: t.vol("GTV-1")),
        ("extent", "what's the sup-inf extent of the GTV", None, lambda: t.extent("GTV-1")),
        ("extent", "how long is the cord contour", None, lambda: t.extent("Spinal_cord")),
        ("extent", "craniocaudal extent of the PTV", None, lambda: t.extent("PTV-1")),
        ("laterality", "which side is the tumour on?", None, lambda: t.side("GTV-1")),
        ("laterality", "is the GTV in the left or right lung", None, lambda: t.side("GTV-1")),
        ("laterality", "laterality of the PTV", None, lambda: t.side("PTV-1")),
        ("laterality", "is the lesion right sided?", None,
         lambda: (lambda v: None if v is None else (v[0] == "right", None, None))(t.side("GTV-1"))),
        ("presence", "is the GTV on this slice?", f"axial:{k_gtv}", lambda: t.on_slice("GTV-1", k_gtv)),
        ("presence", "can you see the tumour here", f"axial:{k_top}", lambda: t.on_slice("GTV-1", k_top)),
        ("presence", "is the PTV in this image", f"axial:{k_low}", lambda: t.on_slice("PTV-1", k_low)),
        ("presence", "is there lung on this slice", f"axial:{k_gtv}", lambda: t.on_slice("Lung_R", k_gtv)),
        ("presence", "is the cord in this slice", f"axial:{k_gtv}", lambda: t.on_slice("Spinal_cord", k_gtv)),
        ("list", "which structures are on this slice", f"axial:{k_low}", lambda: t.list_on(k_low)),
        ("list", "any targets on this slice? which ones", f"axial:{k_gtv}", lambda: t.list_on(k_gtv, "target")),
        ("count", "how many targets are on this slice?", f"axial:{k_gtv}", lambda: t.count_on(k_gtv, "target")),
        ("count", "how many PTVs", None, t.count_ptv),
        ("distance", "distance from the GTV to the cord?", None, lambda: t.dist("GTV-1", "Spinal_cord")),
        ("distance", "how far is the PTV from the spinal cord", None, lambda: t.dist("PTV-1", "Spinal_cord")),
        ("distance", "how close is the GTV to the R lung", None, lambda: t.dist("GTV-1", "Lung_R")),
        ("distance", "is the PTV more than 1 cm from the cord?", None,
         lambda: (lambda v: None if v is None else (not v[0], None, None))(t.dist_within("PTV-1", "Spinal_cord", 10))),
        ("overlap", "does the PTV overlap the left lung", None, lambda: t.overlap("PTV-1", "Lung_L")),
        ("overlap", "does the GTV overlap the right lung?", None, lambda: t.overlap("GTV-1", "Lung_R")),
        ("overlap", "do the PTV and cord overlap", None, lambda: t.overlap("PTV-1", "Spinal_cord")),
        ("relative_position", "is the cord behind the GTV?", None,
         lambda: t.rel("Spinal_cord", "posterior", "GTV-1")),
        ("relative_position", "is the tumour to the left of the cord", None,
         lambda: t.rel("GTV-1", "left", "Spinal_cord")),
        ("relative_position", "is the GTV inferior to the cord", None,
         lambda: t.rel("GTV-1", "inferior", "Spinal_cord")),
        ("closer", "which lung is the GTV closer to", None, lambda: t.closer("Lung_L", "Lung_R", "GTV-1")),
        ("closer", "is the cord or the R lung nearer to the PTV", None,
         lambda: t.closer("Spinal_cord", "Lung_R", "PTV-1")),
        ("unanswerable", "what's the dist from the heart to the PTV", None, lambda: t.fixed(NOT)),
        ("unanswerable", "volume of the oesophagus?", None, lambda: t.fixed(NOT)),
    ]


CASES = [(PT201, questions_pt201), (PT230, questions_pt230), (LUNG1, questions_lung1)]


def short(v, n=80):
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def main():
    rows, skipped = [], []
    for folder, make in CASES:
        t = Truth(folder)
        session = ChatSession(t.image, StructureSet.from_files(mask_files(folder), t.image), image_model=None)
        for kind, question, slice_, truth_fn in make(t):
            got = truth_fn()
            if got is None:
                skipped.append((folder.name, question))
                continue
            truth, tol, unit = got
            try:
                a = session.ask(question, slice_)
                status, value, text, aunit = a.status, a.value, a.answer, a.unit
            except Exception as exc:  # a crash counts as wrong, and is shown
                status, value, text, aunit = "error", None, f"{type(exc).__name__}: {exc}", None
            if truth == NOT:
                ok = status == "cannot_tell"
            else:
                ok = status == "answered" and value_matches(truth, value, tol, unit, aunit)
            rows.append(dict(case=folder.name, kind=kind, question=question, slice=slice_, truth=truth, ok=ok,
                             status=status, value=value, unit=aunit, text=text))
    n = len(rows)
    right = sum(r["ok"] for r in rows)
    print(f"held-out chat check: {n} questions on {len(CASES)} cases, {len(skipped)} skipped (truth not clear-cut)")
    print(f"accuracy overall: {right}/{n} = {100 * right / n:.1f} %")
    by = defaultdict(list)
    for r in rows:
        by[r["kind"]].append(r["ok"])
    print("\nper kind:")
    for k, v in sorted(by.items()):
        print(f"  {k:18s} {sum(v):3d}/{len(v):3d}  {100 * sum(v) / len(v):5.1f} %")
    status_count = defaultdict(int)
    for r in rows:
        status_count[r["status"]] += 1
    answerable = [r for r in rows if r["truth"] != NOT]
    print(f"\nreplies: {dict(status_count)}; on answerable questions: "
          f"cannot_tell {sum(r['status'] == 'cannot_tell' for r in answerable)}, "
          f"clarify {sum(r['status'] == 'clarify' for r in answerable)}")
    print("\nwrong answers:")
    for r in rows:
        if not r["ok"]:
            print(f"- [{r['case']}] {r['kind']}: {r['question']!r}" + (f" (slice {r['slice']})" if r["slice"] else ""))
            print(f"    truth: {short(r['truth'])}   status: {r['status']}   value: {short(r['value'])} {r['unit'] or ''}")
            print(f"    answer: {r['text'][:220]}")
    if skipped:
        print("\nskipped (truth not clear-cut): " + "; ".join(f"[{c}] {q}" for c, q in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
