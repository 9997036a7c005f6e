"""The prismrt command as a user meets it: run in a subprocess, one-line errors, files written."""

import json
import subprocess
import sys

import pytest

from prismrt_testing import SAMPLE_DIR
from PRISMRTLib import __version__
from PRISMRTLib.cli import main


def run(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "PRISMRTLib.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_the_commands():
    code, out, _ = run("--help")
    assert code == 0
    for command in ("info", "overview", "segment", "register", "ask", "models", "--device"):
        assert command in out


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"prismrt {__version__}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "no/such/file.nii.gz"], "does not exist"),
        (["info"], "required"),
        (["info", str(SAMPLE_DIR / "ct.nii.gz"), "--bogus"], "unrecognized arguments"),
        (["--device", "tpu", "info", "x"], "invalid choice"),
        (["launch"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    code, out, err = run(*args)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert "--help" in err


def test_bad_input_file_is_one_line(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"not an image")
    code, _, err = run("info", bad)
    assert code == 2 and err.startswith("prismrt: error: cannot read") and err.count("\n") == 1


def test_info_reports_geometry_as_json(sample_dir):
    code, out, _ = run("info", sample_dir / "ct.nii.gz", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["size_ijk"] == [128, 128, 128]
    assert info["orientation"] == "i: R->L, j: A->P, k: S->I"
    assert info["device"].startswith(("auto", "cpu"))  # named, not probed: info does not import torch


def test_overview_writes_the_figure_and_report(sample_dir, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run(
        "overview", sample_dir / "ct.nii.gz", "--window", "head-and-neck", "--overlay", sample_dir / "PTV70.nii.gz",
        "--out", out,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["window"] == {"name": "head-and-neck", "level": 60, "width": 350}
    assert 300 < report["structures_cc"]["PTV70"] < 400
    # the default point is the PTV70 centre, so each slice shown cuts through the target
    assert set(report["overview"]["slices"]) == {"axial", "coronal", "sagittal"}
    assert "PTV70" in (out / "report.md").read_text()
    import matplotlib.image as mpimg

    png = mpimg.imread(out / "overview.png")
    assert png.shape[0] > 400 and png.shape[1] > 1000
    assert png[..., :3].std() > 0.05  # an image, not a blank canvas
    # a second run refuses to replace the outputs unless told to
    code, _, err = run("overview", sample_dir / "ct.nii.gz", "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert run("overview", sample_dir / "ct.nii.gz", "--out", out, "--overwrite")[0] == 0


def test_overview_point_in_ras_is_converted(sample_dir, tmp_path):
    # voxel (i, j, k) = (40, 70, 90) of the sample is at LPS (40 * s, 70 * s, -90 * 2.5); in RAS x and y flip sign
    s = 3.9059999
    ras = f"{-40 * s},{-70 * s},{-90 * 2.5}"
    assert main(["overview", str(sample_dir / "ct.nii.gz"), "--point", ras, "--coords", "ras", "--out", str(tmp_path)]) == 0
    slices = json.loads((tmp_path / "report.json").read_text())["overview"]["slices"]
    assert (slices["sagittal"]["slice_index"], slices["coronal"]["slice_index"], slices["axial"]["slice_index"]) == (40, 70, 90)


def test_overview_point_outside_the_volume(sample_dir, tmp_path, capsys):
    assert main(["overview", str(sample_dir / "ct.nii.gz"), "--point", "0,0,500", "--out", str(tmp_path)]) == 2
    assert "outside the volume" in capsys.readouterr().err


def test_window_flags(sample_dir, tmp_path, capsys):
    assert main(["overview", str(sample_dir / "ct.nii.gz"), "--level", "40", "--out", str(tmp_path)]) == 2
    assert "--width" in capsys.readouterr().err
    assert main(["overview", str(sample_dir / "ct.nii.gz"), "--window", "liver", "--out", str(tmp_path)]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_overlay_on_another_grid_is_refused(sample_dir, tmp_path, capsys, shared_data):
    other = shared_data / "samples" / "ts_abdomen_ct" / "example_seg.nii.gz"
    code = main(["overview", str(sample_dir / "ct.nii.gz"), "--overlay", str(other), "--out", str(tmp_path)])
    assert code == 2 and "not on the image's voxel grid" in capsys.readouterr().err


def test_ask_without_a_question_or_with_both_says_which(sample_dir, tmp_path, capsys):
    ct = str(sample_dir / "ct.nii.gz")
    assert main(["ask", ct]) == 2
    assert "give a QUESTION or --questions" in capsys.readouterr().err
    batch = tmp_path / "q.jsonl"
    batch.write_text('{"id": 1, "question": "what is the slice thickness?"}\n')
    assert main(["ask", ct, "what?", "--questions", str(batch)]) == 2
    assert "one of them" in capsys.readouterr().err


def test_device_option_after_the_subcommand(sample_dir, capsys):
    assert main(["info", str(sample_dir / "ct.nii.gz"), "--device", "cpu"]) == 0
    assert "Device:      cpu" in capsys.readouterr().out


def test_unavailable_cuda_is_a_clear_error(sample_dir, tmp_path, capsys):
    """Checked by the commands that run a model, before its weights are fetched or loaded (here: none there)."""
    import SimpleITK as sitk

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ct = sample_dir / "ct.nii.gz"
    point = ",".join(f"{v:.3f}" for v in sitk.ReadImage(str(ct)).TransformIndexToPhysicalPoint((64, 70, 60)))
    assert main(["--device", "cuda", "segment", str(ct), "--point", point, "--backend", "teachers",
                 "--model", str(tmp_path), "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_internal_errors_are_reported_not_dumped(monkeypatch, sample_dir, capsys):
    import PRISMRTLib.cli as cli

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert main(["info", str(sample_dir / "ct.nii.gz")]) == 1
    assert "internal error: ZeroDivisionError: boom" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info", str(sample_dir / "ct.nii.gz")])


def test_resolve_device():
    from PRISMRTLib.device import resolve_device
    from PRISMRTLib.errors import DeviceError

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("cpu:1")
