"""Bad input, as a user meets it at the command line: each case gives one line that says what is wrong and what to do,
the right exit code, no model loaded for it, and every file the user had left as it was.

Images are small synthetic volumes written here; the CLI runs in a subprocess (its stderr is the process's, so any
ITK/GDCM noise would show) through a probe that also reports which heavy modules were imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, REPO, SAMPLE_DIR

HEAVY = ("torch", "PRISMRTLib.features", "PRISMRTLib.segmentation")
# Runs the CLI and reports its exit code and the heavy modules it imported (argparse errors exit through SystemExit).
PROBE = """
import json, sys
from PRISMRTLib.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print("\\nPROBE " + json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run(*args, cwd=None):
    """(exit code, stdout, stderr, heavy modules imported) of ``prismrt ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    out, _, probe = proc.stdout.rpartition("\nPROBE ")
    assert probe, f"the probe did not finish: {proc.stderr}"
    result = json.loads(probe)
    return result["code"], out, proc.stderr, result["heavy"]


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots``: its bytes' hash and modification time (so "unchanged" means both)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def one_line_error(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err and "WARNING" not in err and "ITK" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


# ---- synthetic images ---------------------------------------------------------------------------------------------
SPACING = (2.0, 2.0, 3.0)


def ct_array() -> np.ndarray:
    """(k, j, i) = (12, 32, 32) int16 HU: air around a 40 HU body holding a 120 HU target."""
    arr = np.full((12, 32, 32), -1000, np.int16)
    arr[:, 6:26, 6:26] = 40
    arr[4:8, 12:20, 12:20] = 120
    return arr


def write(arr: np.ndarray, path: Path, direction=None, compress=True) -> Path:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(SPACING[: image.GetDimension()] + (1.0,) * max(0, image.GetDimension() - 3))
    if direction is not None:
        image.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(image, str(path), compress)
    return path


def voxel_point(path: Path, i: int, j: int, k: int) -> str:
    point = sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint((i, j, k))
    return ",".join(f"{v:.3f}" for v in point)


def truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def with_nan(path: Path, share: float = 0.0) -> Path:
    arr = ct_array().astype(np.float32)
    if share >= 1:
        arr[:] = np.nan
    else:
        arr[5, 10, 10] = np.nan
    return write(arr, path)


@pytest.fixture()
def data(tmp_path):
    """The user's files: a good CT and every kind of bad input, in tmp_path/data."""
    d = tmp_path / "data"
    d.mkdir()
    files = {"ct": write(ct_array(), d / "ct.nii.gz")}
    files["ct_nii"] = write(ct_array(), d / "ct.nii", compress=False)
    files["2d"] = write(ct_array()[5], d / "slice.nii.gz")
    files["4d"] = d / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(files["ct"]))] * 3), str(files["4d"]), True)
    files["zero"] = d / "empty.nii.gz"
    files["zero"].write_bytes(b"")
    files["trunc_gz"] = truncated(files["ct"], d / "cut.nii.gz")
    files["trunc_nii"] = truncated(files["ct_nii"], d / "cut.nii")
    damaged = bytearray(files["ct"].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    files["damaged_gz"] = d / "damaged.nii.gz"
    files["damaged_gz"].write_bytes(bytes(damaged))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        files[f"nan{suffix}"] = with_nan(d / f"nan{suffix}")
    files["allnan"] = with_nan(d / "allnan.nii.gz", share=1)
    files["constant"] = write(np.full((12, 32, 32), 40, np.int16), d / "constant.nii.gz")
    mr = np.random.default_rng(0).gamma(2.0, 150.0, size=(12, 32, 32)).astype(np.float32)  # positive: not CT
    files["mr"] = write(mr, d / "mr.nii.gz")
    files["oblique"] = write(ct_array(), d / "oblique.nii.gz", direction=DIRECTIONS["oblique"])
    (d / "nodicom").mkdir()
    (d / "nodicom" / "notes.txt").write_text("not an image")
    files["nodicom"] = d / "nodicom"
    return files


# ---- the matrix: input problems ------------------------------------------------------------------------------------
INFO_ERRORS = [
    ("2d", "is 2D (a single slice): load the whole series as a 3D volume"),
    ("4d", "is 4D"),
    ("zero", "is empty (0 bytes)"),
    ("trunc_gz", "is truncated or damaged (gzip: Compressed file ended"),
    ("trunc_nii", "is truncated or damaged (it holds"),
    ("damaged_gz", "is truncated or damaged (gzip: CRC check failed"),
    ("nan.nii.gz", "1 voxels are NaN or infinite: replace them"),
    ("nan.nrrd", "1 voxels are NaN or infinite: replace them"),
    ("nan.mha", "1 voxels are NaN or infinite: replace them"),
    ("allnan", "all 12288 voxels are NaN or infinite"),
    ("constant", "the volume is constant (40 everywhere)"),
    ("nodicom", "no DICOM image series found"),
]


@pytest.mark.parametrize("name, message", INFO_ERRORS, ids=[n for n, _ in INFO_ERRORS])
def test_unusable_inputs_are_refused_in_one_line(data, name, message):
    before = snapshot(data["ct"].parent)
    code, out, err, heavy = run("info", data[name])
    assert code == 2 and out == ""
    one_line_error(err, "prismrt: error: ", message)
    assert heavy == []
    assert snapshot(data["ct"].parent) == before


def test_the_same_bad_input_is_refused_by_every_command(data, tmp_path):
    """segment and overview read through the same checks, before any model is loaded or anything is written."""
    out = tmp_path / "out"
    code, _, err, heavy = run("segment", data["trunc_gz"], "--point", "0,0,0", "--out", out / "m.nii.gz")
    assert code == 2 and heavy == []
    one_line_error(err, "is truncated or damaged")
    code, _, err, _ = run("overview", data["nan.nii.gz"], "--out", out)
    assert code == 2
    one_line_error(err, "1 voxels are NaN or infinite")
    assert not out.exists()


def test_mr_is_recognised_and_never_windowed_as_ct(data, tmp_path):
    code, out, err, heavy = run("info", data["mr"])
    assert code == 0 and heavy == []
    assert "Modality:    not CT" in out and "does not look like CT" in out
    # a CT window asked for on MR is refused, before any model loads
    point = voxel_point(data["mr"], 16, 16, 6)
    code, _, err, heavy = run("segment", data["mr"], "--point", point, "--window", "soft-tissue",
                              "--out", tmp_path / "m.nii.gz")
    assert code == 2 and heavy == []
    one_line_error(err, "--window soft-tissue is a CT window in HU", "leave --window out")
    code, _, err, _ = run("overview", data["mr"], "--window", "lung", "--out", tmp_path / "o")
    assert code == 2
    one_line_error(err, "is a CT window", "--level and --width")
    # without --window the overview shows it between its percentiles, not in a CT window
    code, _, err, _ = run("overview", data["mr"], "--out", tmp_path / "o")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["window"]["name"].startswith("percentiles")
    assert not (tmp_path / "m.nii.gz").exists()


def test_mr_segmented_without_a_window_is_scaled_by_percentiles(data, tmp_path, capsys):
    pytest.importorskip("torch")
    from prismrt_testing import make_tiny_bundle
    from PRISMRTLib.cli import main

    bundle = tmp_path / "tiny-teachers"
    make_tiny_bundle("teachers", bundle)
    out = tmp_path / "m.nii.gz"
    code = main(["segment", str(data["mr"]), "--point", voxel_point(data["mr"], 16, 16, 6), "--backend", "teachers",
                 "--model", str(bundle), "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "percentiles 0.5-99.5" in captured.out and "CT window" not in captured.out
    assert "does not look like CT" in captured.err


def test_oblique_volume_is_read_with_a_warning(data):
    code, out, err, heavy = run("info", data["oblique"])
    assert code == 0 and err == "" and heavy == []
    assert "oblique by" in out and "slices follow the volume's own axes" in out


def test_info_does_not_import_torch():
    code, out, err, heavy = run("info", SAMPLE_DIR / "ct.nii.gz")
    assert code == 0, err
    assert heavy == []
    assert "Device:      " in out


# ---- the matrix: prompts -------------------------------------------------------------------------------------------
def test_prompts_that_cannot_work_are_refused_before_a_model_loads(data, tmp_path):
    ct, out = data["ct"], tmp_path / "m.nii.gz"
    target, air = voxel_point(ct, 16, 16, 6), voxel_point(ct, 1, 1, 6)
    cases = [
        (["--point", air], "is on air (-1000 HU): click on the structure itself"),
        (["--point", "-5000,0,0"], "is outside the volume"),
        (["--point", target, "--negative", "0,0,9000"], "is outside the volume"),
        (["--box", voxel_point(ct, 10, 10, 5) + "," + voxel_point(ct, 20, 20, 6)],
         "the box corners are on different axial slices"),
        (["--box", "1,2,3,4"], "--box needs six numbers"),
        ([], "give at least one --point"),
        (["--point", target, "--window", "liver"], "unknown window preset 'liver'"),
    ]
    before = snapshot(data["ct"].parent)
    for extra, message in cases:
        code, _, err, heavy = run("segment", ct, *extra, "--out", out)
        assert code == 2, (extra, err)
        one_line_error(err, message)
        assert heavy == [], (extra, heavy)
    assert not out.exists()
    assert snapshot(data["ct"].parent) == before


def test_a_negative_click_on_air_is_fine(data, tmp_path, monkeypatch):
    """Only positive clicks on air are refused: the check passes and the model is asked for (here: refused)."""
    import PRISMRTLib.features
    from PRISMRTLib.cli import main
    from PRISMRTLib.errors import PrismRTError

    asked = []

    def no_model(*args, **kw):
        asked.append(args)
        raise PrismRTError("no model in this test")

    monkeypatch.setattr(PRISMRTLib.features, "open_backend", no_model)
    ct = data["ct"]
    args = ["segment", str(ct), "--point", voxel_point(ct, 16, 16, 6), "--negative", voxel_point(ct, 1, 1, 6),
            "--device", "cpu", "--out", str(tmp_path / "m.nii.gz")]
    assert main(args) == 2 and len(asked) == 1


# ---- the matrix: paths, outputs, flags -----------------------------------------------------------------------------
def test_missing_paths_and_unknown_flags(data, tmp_path):
    code, _, err, heavy = run("segment", tmp_path / "no" / "ct.nii.gz", "--point", "0,0,0",
                              "--out", tmp_path / "m.nii.gz")
    assert code == 2 and heavy == []
    one_line_error(err, "does not exist", "--help")
    code, _, err, heavy = run("segment", data["ct"], "--point", "0,0,0", "--out", tmp_path / "m.nii.gz", "--fast")
    assert code == 2 and heavy == []
    one_line_error(err, "unrecognized arguments: --fast", "--help")
    code, _, err, _ = run("info", data["ct"], "--bogus")
    assert code == 2
    one_line_error(err, "unrecognized arguments: --bogus")
    code, _, err, heavy = run("segment", data["ct"], "--point", "0,0,0", "--out", tmp_path / "m.png")
    assert code == 2 and heavy == []
    one_line_error(err, "use one of .nii, .nii.gz, .nrrd, .mha")
    code, _, err, heavy = run("segment", data["ct"], "--point", "0,0,0", "--out", tmp_path)
    assert code == 2 and heavy == []
    one_line_error(err, "is a folder: give a file name")
    code, _, err, heavy = run("segment", data["ct"], "--point", "0,0,0", "--out", data["ct"] / "m.nii.gz")
    assert code == 2 and heavy == []
    one_line_error(err, "is a file, not a folder")


@pytest.fixture()
def cases(tmp_path):
    """An eval-seg case folder: CASE/ct.nii.gz + CASE/GTV.nii.gz."""
    case = tmp_path / "cases" / "case1"
    case.mkdir(parents=True)
    write(ct_array(), case / "ct.nii.gz")
    write((ct_array() > 100).astype(np.uint8), case / "GTV.nii.gz")
    return tmp_path / "cases"


def test_existing_outputs_are_never_replaced_without_overwrite(data, cases, tmp_path):
    ct = data["ct"]
    mask = tmp_path / "out" / "gtv.nii.gz"
    mask.parent.mkdir()
    mask.write_bytes(b"the user's own mask")
    for name in ("overview.png", "report.md", "report.json", "results.json"):
        (mask.parent / name).write_text(f"the user's {name}")
    before = snapshot(data["ct"].parent, cases, mask.parent)
    code, _, err, heavy = run("segment", ct, "--point", voxel_point(ct, 16, 16, 6), "--out", mask)
    assert code == 2 and heavy == []
    one_line_error(err, "already exists: choose another --out or pass --overwrite")
    code, _, err, _ = run("overview", ct, "--out", mask.parent)
    assert code == 2
    one_line_error(err, "already exists", "--overwrite")
    code, _, err, heavy = run("eval-seg", cases, "--out", mask.parent)
    assert code == 2 and heavy == []
    one_line_error(err, "already holds results", "--overwrite")
    # --overwrite with a prompt that cannot work: refused before anything is written, the old mask kept
    code, _, err, _ = run("segment", ct, "--point", voxel_point(ct, 1, 1, 6), "--out", mask, "--overwrite")
    assert code == 2 and "on air" in err
    assert snapshot(data["ct"].parent, cases, mask.parent) == before


@pytest.fixture()
def read_only(tmp_path, monkeypatch):
    """A folder the user cannot write to: mode 0555, and (root writes anyway) os.access says so as a read-only file
    system would. Returns the folder and a runner of the CLI in this process."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and Path(path).resolve() == folder.resolve():
            return False
        return real_access(path, mode, *a, **kw)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


def test_a_read_only_output_folder_is_a_fixable_error(data, cases, read_only, capsys):
    from PRISMRTLib.cli import main

    ct = str(data["ct"])
    before = snapshot(data["ct"].parent, cases)
    commands = [
        ["segment", ct, "--point", voxel_point(data["ct"], 16, 16, 6), "--out", str(read_only / "gtv.nii.gz")],
        ["segment", ct, "--point", voxel_point(data["ct"], 16, 16, 6), "--out", str(read_only / "new" / "g.nii.gz")],
        ["overview", ct, "--out", str(read_only)],
        ["eval-seg", str(cases), "--out", str(read_only / "results")],
    ]
    heavy_before = {m for m in HEAVY if m in sys.modules}
    for args in commands:
        assert main(args) == 2, args
        one_line_error(capsys.readouterr().err, "cannot write", f"the folder '{read_only}' is read-only",
                       "choose another --out")
    if not heavy_before:  # (in a process that has not loaded them yet) no model code was imported for it
        assert not [m for m in HEAVY if m in sys.modules]
    assert list(read_only.iterdir()) == []
    assert snapshot(data["ct"].parent, cases) == before


def test_a_write_that_fails_late_is_still_one_line(data, tmp_path, monkeypatch, capsys):
    """Permission lost (or the disk filled) after the checks: a fixable error, not an internal one."""
    import PRISMRTLib.report.overview as overview
    from PRISMRTLib.cli import main

    target = tmp_path / "o" / "overview.png"

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(overview, "render_overview", denied)
    assert main(["overview", str(data["ct"]), "--out", str(target.parent)]) == 2
    one_line_error(capsys.readouterr().err, f"cannot use '{target}': Permission denied")


def test_a_dicom_folder_without_dicom_says_what_it_holds(data):
    (data["nodicom"] / "scan.nii.gz").write_bytes(data["ct"].read_bytes())
    code, _, err, _ = run("info", data["nodicom"])
    assert code == 2
    one_line_error(err, "none of its 2 file(s) is DICOM", "give that file itself")


def test_a_click_in_the_lung_is_not_refused_as_air(tmp_path):
    """Lung parenchyma (-850 HU, -950 in emphysema) is something users delineate: only air (below -980 HU around
    the click) is refused; a single noisy voxel decides nothing."""
    import SimpleITK as sitk

    from PRISMRTLib.cli import _check_prompts
    from PRISMRTLib.imaging.validation import check_volume

    values = np.full((4, 16, 16), -1000, np.int16)
    values[:, 4:12, 4:12] = -950  # emphysematous lung
    values[2, 8, 8] = -1010  # one noisy voxel under the click
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.0, 2.0))
    summary = check_volume(image)
    _check_prompts(image, summary, "axial", [("8,8,4", (8.0, 8.0, 4.0))], [], None)
    with pytest.raises(Exception, match="on air"):
        _check_prompts(image, summary, "axial", [("1,1,4", (1.0, 1.0, 4.0))], [], None)
