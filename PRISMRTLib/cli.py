"""The ``prismrt`` command line.

Errors the user can fix are printed as one line (``prismrt: error: ...``) with exit code 2; ``--debug`` shows
tracebacks.

Every command checks its arguments, paths and outputs, then reads and checks its images, and only then loads a model:
a mistake costs a second, not a model load. Other libraries' warnings stay off the terminal (``--debug`` shows them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import __version__
from .errors import PrismRTError

# kept here, not imported, so that parsing arguments loads no model code (PRISMRTLib.features imports torch)
BACKEND_CHOICES = ("auto", "prismrt", "teachers")
EVAL_REG_METHODS = ("mind", "features", "both", "affine", "elastix-affine", "elastix-bspline",
                    "elastix-bspline-from-affine", "elastix-bspline-tuned")
DEFAULT_HELP = ("auto = the distilled student ('prismrt': LiteMedSAM's encoder and click-tuned heads, one pass for "
                "every role) when it is installed, otherwise the teachers (delineation: LiteMedSAM, fine-tuned for "
                "clicks)")
MODES_CHOICES = ("2d", "3d")  # segmentation.evaluation.MODES
FIRST_CHOICES = ("click", "box")  # segmentation.evaluation.FIRST_PROMPTS

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points to --help."""

    def error(self, message):  # noqa: D102 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"'{text}' does not exist")
    return path


def _device_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--device",
        default=default,
        choices=("auto", "cpu", "cuda", "mps"),
        help="compute device: auto = CUDA when present, else CPU (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prismrt",
        description="PRISM-RT: radiotherapy imaging AI (GTV delineation, registration QA, CT questions).",
    )
    parser.add_argument("--version", action="version", version=f"prismrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    _device_option(parser, "auto")
    # Subcommands accept --device too; SUPPRESS keeps a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    _device_option(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", parents=[common], help="check a volume and print its geometry and intensities")
    p.add_argument("image", type=_existing_path, help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "overview", parents=[common], help="write an overview PNG of three orthogonal slices and a report"
    )
    p.add_argument("image", type=_existing_path, help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--window", help="CT window preset (soft-tissue, lung, bone, brain, head-and-neck; default "
                                    "soft-tissue); an image that is not CT is shown between its percentiles")
    p.add_argument("--level", type=float, help="window level in HU (with --width, instead of --window)")
    p.add_argument("--width", type=float, help="window width in HU")
    p.add_argument("--point", help="slice through this point X,Y,Z in mm (default: centre of the body)")
    p.add_argument("--coords", choices=("lps", "ras"), default="lps", help="coordinate system of --point (default lps)")
    p.add_argument("--overlay", action="append", default=[], type=_existing_path, metavar="MASK",
                   help="binary mask on the image grid to draw as a contour (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")

    p = sub.add_parser(
        "segment", parents=[common], help="GTV delineation from point prompts",
        description="Clicks (and a box) on slices of a CT give a mask at once; --propagate grows it into 3D.",
    )
    p.add_argument("image", type=_existing_path)
    p.add_argument("--point", action="append", default=[], metavar="X,Y,Z", help="positive click in mm (repeatable)")
    p.add_argument("--negative", action="append", default=[], metavar="X,Y,Z", help="negative click in mm (repeatable)")
    p.add_argument("--box", metavar="X0,Y0,Z0,X1,Y1,Z1", help="box by two opposite corners in mm, on one slice")
    p.add_argument("--coords", choices=("lps", "ras"), default="lps", help="coordinate system of points (default lps)")
    p.add_argument("--orientation", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="slices the prompts are on (default axial)")
    p.add_argument("--window", help="CT window preset the model sees (default: the one its model was trained with; "
                                    "LiteMedSAM: soft-tissue). MR is scaled by its percentiles, never windowed")
    p.add_argument("--propagate", action="store_true", help="propagate the mask into 3D")
    p.add_argument("--no-cross-views", dest="cross_views", action="store_false",
                   help="propagate without the orthogonal views that bound how far the structure reaches")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=f"feature backend (default: {DEFAULT_HELP})")
    p.add_argument("--model", help="model name from 'prismrt models list', or a bundle folder (default: the "
                                   "backend's best installed model)")
    p.add_argument("--out", required=True, type=Path, help="output mask (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser(
        "eval-seg", parents=[common], help="evaluate delineation with simulated prompts (DSC, IoU, HD95)",
        description="Cases: a folder of CASE/ct.nii.gz with CASE/STRUCTURE.nii.gz or CASE/masks/STRUCTURE.nii.gz, "
                    "or a case list (.json; see PRISMRTLib/segmentation/cases.py). 2D: prompts on the structure's "
                    "central slice (through its deepest voxel), scored there. 3D: the first prompt there, then each "
                    "click at the larger 3D error, the mask propagated after every prompt. Each method runs the "
                    "same prompts; the box-filled baseline is the tight box, filled.",
    )
    p.add_argument("cases", nargs="+", type=_existing_path, help="folder(s) of cases or case list(s)")
    p.add_argument("--structure", action="append", default=[], help="structure to evaluate (repeatable; default: "
                   "every structure of each case)")
    p.add_argument("--model", action="append", default=[], metavar="[BACKEND=]MODEL",
                   help="a method to evaluate: a model name or bundle folder, optionally prefixed by its backend "
                        "(teachers=litemedsam, prismrt=FOLDER); repeatable, the first is compared with each other "
                        "by a paired Wilcoxon test (default: the default backend and model)")
    p.add_argument("--baseline", action="append", default=[], choices=("box-filled",),
                   help="add a baseline method (box-filled: the tight box, filled; in box rows)")
    p.add_argument("--mode", action="append", default=[], choices=MODES_CHOICES,
                   help="2d (central slice) and/or 3d (propagated); repeatable (default 3d)")
    p.add_argument("--first", action="append", default=[], choices=FIRST_CHOICES,
                   help="first prompt: a click at the deepest point, and/or the tight box on the central slice; "
                        "repeatable (default click)")
    p.add_argument("--clicks", type=int, default=3, help="prompts per run, the first included (default 3)")
    p.add_argument("--no-cross-views", dest="cross_views", action="store_false",
                   help="propagate without the orthogonal views that bound how far the structure reaches")
    p.add_argument("--orientation", choices=("axial", "coronal", "sagittal"), default="axial")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases of each source")
    p.add_argument("--window", help="CT window preset (default: each model's own)")
    p.add_argument("--out", required=True, type=Path, help="output folder for results.json and results.md")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "register", parents=[common], help="deformable registration with QA",
        description="Register MOVING to FIXED: initial alignment (moments, rigid, affine), then ConvexAdam on MIND-SSC "
                    "descriptors. Writes OUT/displacement.nii.gz (fixed grid, LPS mm, p_moving = p + u(p)), "
                    "OUT/transform.h5, OUT/warped.nii.gz, OUT/warped_segmentations/, and a QA report (qa.md, qa.json, "
                    "checkerboard, difference and Jacobian images) that checks the result against TG-132 tolerances.",
    )
    p.add_argument("fixed", type=_existing_path)
    p.add_argument("moving", type=_existing_path)
    p.add_argument("--method", choices=("mind", "features", "both"), default="mind",
                   help="what the deformable step matches: MIND-SSC descriptors (default), the backbone's dense "
                        "features (slices in three orientations, PCA-reduced; a GPU method for large backbones), "
                        "or both")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="features/both: " + DEFAULT_HELP)
    p.add_argument("--model", help="features/both: the backbone's model (a name or bundle folder)")
    p.add_argument("--feature-role", choices=("auto", "dino", "sam", "clip"), default="auto",
                   help="features/both: which teacher's features (auto: dino when the model has one, else sam)")
    p.add_argument("--slice-step", type=int, default=1, metavar="N",
                   help="features/both: run the backbone on every N-th slice, interpolate between (faster on a CPU)")
    p.add_argument("--smoothness", type=float, default=1.0,
                   help="0 (follows the images closely) .. 10 (very smooth); default 1")
    p.add_argument("--fixed-mask", type=_existing_path, help="region of interest on the fixed image (mask file)")
    p.add_argument("--fixed-segmentation", action="append", default=[], type=_existing_path, metavar="MASK|FOLDER",
                   help="structure masks of the fixed image (files named after the structure, or a folder of them)")
    p.add_argument("--moving-segmentation", action="append", default=[], type=_existing_path, metavar="MASK|FOLDER",
                   help="structure masks of the moving image: warped into OUT/warped_segmentations/ and, where the "
                        "fixed image has the same name, scored (Dice, distance)")
    p.add_argument("--fixed-landmarks", type=_existing_path, help="fiducials on the fixed image (.mrk.json, .fcsv, .csv)")
    p.add_argument("--moving-landmarks", type=_existing_path, help="the same fiducials on the moving image")
    p.add_argument("--inverse-consistency", action="store_true",
                   help="also register moving to fixed and report the round-trip error")
    p.add_argument("--multimodal", action="store_true",
                   help="the images are of different modalities (e.g. CT and MR) on purpose")
    p.add_argument("--max-folding", type=float, default=0.1, metavar="PERCENT",
                   help="QA tolerance for folding (det J <= 0) in the body, in %% of voxels (default 0.1; TG-132's "
                        "strict reading: 0)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "eval-reg", parents=[common], help="evaluate registration against itk-elastix on the same pairs",
        description="Every method on the same cases: OpenKBP inter-patient pairs (organ Dice, HD95 after warping the "
                    "moving patient's organs), synthetic smooth deformations of real CTs with a known field (TRE at "
                    "500 body points against TG-132's 2 mm mean / 5 mm max), and an MR pair (NCC). Folding, SDlogJ "
                    "and CPU time for each. The peer (elastix-affine, elastix-bspline) needs itk-elastix "
                    "(pip install itk-elastix); without it those rows say so.",
    )
    p.add_argument("--openkbp", type=_existing_path, metavar="FOLDER",
                   help="OpenKBP patients (e.g. ../shared/data/openkbp/validation-pats): consecutive pairs")
    p.add_argument("--pairs", type=int, default=3, help="how many OpenKBP pairs (default 3)")
    p.add_argument("--synthetic", action="append", default=[], type=_existing_path, metavar="CT|FOLDER",
                   help="a real CT to deform with a known smooth field (repeatable)")
    p.add_argument("--mr", nargs=2, type=_existing_path, metavar=("FIXED", "MOVING"), help="an MR pair, no labels")
    p.add_argument("--method", action="append", choices=EVAL_REG_METHODS, default=None,
                   help="repeatable; default: mind, affine, elastix-affine, elastix-bspline")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="features/both: " + DEFAULT_HELP)
    p.add_argument("--model", help="features/both: the backbone's model")
    p.add_argument("--feature-role", choices=("auto", "dino", "sam", "clip"), default="auto")
    p.add_argument("--slice-step", type=int, default=1, metavar="N")
    p.add_argument("--smoothness", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1,
                   help="elastix threads (default 1: its B-spline step crashed with 2 threads, itk-elastix 0.25.4)")
    p.add_argument("--out", required=True, type=Path, help="output folder for results.json and results.md")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "ask", parents=[common], help="answer a free-text question about a CT",
        description="A question in plain words about IMAGE gets an answer with a confidence and its source: the "
                    "header and geometry (slice thickness, pixel size, field of view, modality, plane), the "
                    "structures given with --segmentation (presence on a slice, volume, extent, side, distance, "
                    "overlap) and, for what only the pixels can tell, the image model (organ visibility and target "
                    "presence on a slice). What none of them can answer gets 'I cannot tell from this CT because "
                    "...'. Batch: --questions FILE.jsonl, one {\"id\", \"question\", \"slice\"} a line.",
    )
    p.add_argument("image", type=_existing_path, help="the CT (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("question", nargs="?", help="the question (quote it); or give --questions")
    p.add_argument("--questions", type=_existing_path, metavar="FILE.jsonl",
                   help="batch: one JSON object a line with id, question and slice ('axial:63' or null)")
    p.add_argument("--slice", metavar="AXIS:INDEX",
                   help="the slice the question is about: AXIS axial, coronal or sagittal, INDEX the 0-based voxel "
                        "index of IMAGE along k, j or i (e.g. axial:63)")
    p.add_argument("--segmentation", action="append", type=_existing_path, default=[], metavar="FILE",
                   help="structures on the image's grid: mask files named after the structure, folders of them, or "
                        "a label map (names from FILE.json beside it or a Slicer .seg.nrrd) (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="the image model's backend: " + DEFAULT_HELP)
    p.add_argument("--model", default=None, help="the image model's bundle (default: the backend's CLIP model)")
    p.add_argument("--no-image-model", action="store_true",
                   help="answer from the header and structures only (never load a model)")

    p = sub.add_parser(
        "eval-ask", parents=[common], help="evaluate the chat on questions with exact answers",
        description="Builds a question set from cases (folders of ct.nii.gz with structure masks beside it or in "
                    "masks/; a folder of such folders counts as all of them), with exact answers computed from the "
                    "masks and headers, asks every question with and without the structures, and reports accuracy per "
                    "category, closed vs open, image-only vs with structures, calibration error and the trivial "
                    "baselines in one table.",
    )
    p.add_argument("cases", nargs="+", type=_existing_path, metavar="CASE")
    p.add_argument("--max-per-case", type=int, default=None, metavar="N", help="at most N questions per case")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="the image model's backend: " + DEFAULT_HELP)
    p.add_argument("--model", default=None, help="the image model's bundle")
    p.add_argument("--out", required=True, type=Path, help="output folder for results.json and results.md")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "models", parents=[common], help="list, download, import, locate or remove model weights",
        description="Model weights live in a user cache (PRISMRT_HOME overrides its place). 'download' resumes an "
                    "interrupted download; 'import NAME SOURCE' installs files carried in by hand (a folder or .zip), "
                    "checking them against the manifest.",
    )
    p.add_argument("action", choices=("list", "download", "import", "path", "remove"))
    p.add_argument("names", nargs="*", metavar="NAME", help="model name(s); for import: NAME SOURCE")
    return parser


def _window_from_args(args, image=None, summary=None):
    """The overview's window: --level/--width, a CT preset, or for an image that is not CT its percentiles (never a CT
    window). Without ``image`` only the flags are checked."""
    from .imaging.intensity import Window, get_window, slice_intensity

    if (args.level is None) != (args.width is None):
        raise PrismRTError("give both --level and --width, or a --window preset")
    if args.level is not None:
        return Window(args.level, args.width), "custom"
    if args.window is not None:
        window = get_window(args.window)
        if summary is not None and not summary.is_ct:
            raise PrismRTError(_not_ct_message(args, summary) + ", or give --level and --width")
        return window, args.window
    if summary is None or summary.is_ct:
        return get_window("soft-tissue"), "soft-tissue"
    import SimpleITK as sitk

    scale = slice_intensity(sitk.GetArrayViewFromImage(image), None, False)
    return Window((scale.lower + scale.upper) / 2, scale.upper - scale.lower), "percentiles 0.5-99.5 (not CT)"


def _not_ct_message(args, summary) -> str:
    return (f"--window {args.window} is a CT window in HU, but '{args.image}' is {summary.modality}: leave --window "
            "out (an image that is not CT is scaled by its own percentiles)")


def _point_from_args(text, coords):
    from .imaging.geometry import parse_point, ras_to_lps

    if text is None:
        return None
    point = parse_point(text)
    return ras_to_lps(point) if coords == "ras" else point


def _device_text(requested: str) -> str:
    """The device line of ``info``, found without importing torch (seconds, for one line of a quick check)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "cpu (PyTorch is not installed)"
    if requested == "auto":
        return "auto: CUDA when PyTorch finds a GPU, else cpu (checked when a model loads)"
    return f"{requested} (checked when a model loads)"


def cmd_info(args) -> int:
    from .imaging import check_volume, read_image

    summary = check_volume(read_image(args.image))
    device = _device_text(args.device)
    if args.json:
        print(json.dumps({"source": str(args.image), **summary.to_dict(), "device": device}, indent=2))
    else:
        print(f"{args.image}\n{summary.to_text()}\nDevice:      {device}")
    return 0


OVERVIEW_FILES = ("overview.png", "report.md", "report.json")


def cmd_overview(args) -> int:
    from .imaging import check_volume, read_image
    from .report.overview import Overlay, write_overview_report

    _window_from_args(args)  # the flags, before anything is read
    point = _point_from_args(args.point, args.coords)
    for name in OVERVIEW_FILES:
        _check_output(args.out / name, args.overwrite)
    image = read_image(args.image)
    window, window_name = _window_from_args(args, image, check_volume(image))
    overlays = [Overlay(_mask_name(p), read_image(p)) for p in args.overlay]
    report = write_overview_report(
        image, args.out, window=window, window_name=window_name, source=str(args.image), point_lps=point,
        overlays=overlays, overwrite=args.overwrite,
    )
    for warning in report["volume"]["warnings"]:
        print(f"prismrt: warning: {warning}", file=sys.stderr)
    print(f"wrote {report['files']['overview.png']}, {report['files']['report.md']}, {report['files']['report.json']}")
    return 0


def _mask_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _progress_bar(total: "int | None", desc: str, unit: str):
    """A tqdm bar on stderr when it is a terminal (None otherwise: logs and pipes get no bar)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def _progress_printer(name: str):
    """A progress callback drawing one updating line on stderr (only when stderr is a terminal)."""
    interactive = sys.stderr.isatty()
    last = {"pct": -1}

    def progress(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if interactive and pct != last["pct"]:
            last["pct"] = pct
            print(f"\r{name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({pct}%)", end="", file=sys.stderr, flush=True)

    return progress


def cmd_models(args) -> int:
    from . import weights

    action, names = args.action, args.names
    if action == "list":
        statuses = weights.list_models()
        if not statuses:
            print("the manifest lists no models (add your own with PRISMRT_MANIFEST)")
        for s in statuses:
            if s.converted:
                from .weights import is_available

                state = (f"converted at {s.path}" if s.installed else "made on first use from its verified source"
                         if is_available(s.name) else f"its source is missing: 'prismrt models import {s.name} FILE'")
            else:
                state = f"installed at {s.path}" if s.installed else "not installed"
            print(f"{s.name} {s.version}  {s.size / 1e6:.1f} MB  licence {s.licence}  {state}")
        return 0
    if action == "import":
        if len(names) != 2:
            raise PrismRTError("usage: prismrt models import NAME SOURCE (a folder or .zip holding the model's files, "
                               "or the file itself for a one-file model)")
        print(weights.import_model(names[0], names[1]))
        return 0
    if not names:
        raise PrismRTError(f"name the model(s) to {action}: see 'prismrt models list'")
    for name in names:
        if action == "download":
            try:  # Ctrl-C stops it; the partial file stays and the next download resumes from it
                path = weights.ensure_model(name, progress=_progress_printer(name))
            finally:
                if sys.stderr.isatty():
                    print(file=sys.stderr)
            print(path)
        elif action == "path":
            print(weights.model_path(name))
        elif action == "remove":
            for path in weights.remove_model(name):
                print(f"removed {path}")
    return 0


def _warn(message: str) -> None:
    print(f"prismrt: warning: {message}", file=sys.stderr)


def _check_output(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an existing output (without --overwrite) or one that cannot be written, before any work starts."""
    import os

    if path.is_dir():
        raise PrismRTError(f"{flag} '{path}' is a folder: give a file name, e.g. '{path / 'gtv.nii.gz'}'")
    if path.exists() and not overwrite:
        raise PrismRTError(f"'{path}' already exists: choose another {flag} or pass --overwrite")
    probe = path.parent  # the nearest folder that exists: the missing ones are made in it
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PrismRTError(f"cannot write '{path}': '{probe}' is a file, not a folder; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PrismRTError(f"cannot write '{path}': the folder '{probe}' is read-only or not writable by you; "
                           f"choose another {flag}")


def _check_prompts(image, summary, orientation: str, positives, negatives, corners) -> None:
    """Clicks and a box that cannot work, refused before a model loads: outside the volume, a box across slices, a
    positive click on air (CT)."""
    import numpy as np
    import SimpleITK as sitk

    from .errors import GeometryError
    from .imaging import Geometry, SlicePlane
    from .imaging.intensity import AIR_HU

    geometry = Geometry.from_image(image)
    plane = SlicePlane.create(geometry, orientation)
    for _, point in positives + negatives:
        plane.locate(point)  # a clear error for a point outside the volume
    if corners is not None:
        ia, ib = plane.locate(corners[0])[0], plane.locate(corners[1])[0]
        if ia != ib:
            raise GeometryError(f"the box corners are on different {plane.orientation.value} slices ({ia} and {ib}): "
                                "draw the box on one slice")
    if summary.is_ct:
        values = sitk.GetArrayViewFromImage(image)
        for text, point in positives:
            i, j, k = geometry.physical_to_voxel(point)
            # the in-plane 3 x 3 median, so that one noisy voxel neither refuses nor passes a click
            value = float(np.median(values[k, max(j - 1, 0):j + 2, max(i - 1, 0):i + 2]))
            if value < AIR_HU:
                raise PrismRTError(f"the positive click --point {text} is on air ({value:.0f} HU): click on the "
                                   "structure itself (a click to leave something out goes with --negative)")


def _split_model(spec: str) -> tuple[str, str | None]:
    """'teachers=NAME' -> ("teachers", "NAME"); 'NAME' -> ("auto", "NAME"); 'teachers' -> ("teachers", None)."""
    for backend in BACKEND_CHOICES:
        if spec == backend:
            return backend, None
        if spec.startswith(backend + "="):
            return backend, spec[len(backend) + 1:] or None
    return "auto", spec


def cmd_segment(args) -> int:
    from .imaging.geometry import parse_point, ras_to_lps

    def point(text):
        p = parse_point(text)
        return ras_to_lps(p) if args.coords == "ras" else p

    positives, negatives = [(t, point(t)) for t in args.point], [(t, point(t)) for t in args.negative]
    corners = None
    if args.box:
        values = [v for v in args.box.replace(";", ",").split(",") if v.strip()]
        if len(values) != 6:
            raise PrismRTError(f"--box needs six numbers X0,Y0,Z0,X1,Y1,Z1 (two corners in mm), got '{args.box}'")
        corners = point(",".join(values[:3])), point(",".join(values[3:]))
    if not positives and corners is None:
        raise PrismRTError("give at least one --point on the structure (or a --box)")
    if args.window:
        from .imaging.intensity import get_window

        get_window(args.window)  # an unknown preset is refused before anything loads
    from .imaging import check_volume, read_image
    from .imaging.io import check_image_suffix

    _check_output(args.out, args.overwrite)
    check_image_suffix(args.out)
    image = read_image(args.image)
    summary = check_volume(image)
    if args.window and not summary.is_ct:
        raise PrismRTError(_not_ct_message(args, summary))
    _check_prompts(image, summary, args.orientation, positives, negatives, corners)
    for warning in summary.warnings:
        _warn(warning)
    from .device import resolve_device

    device = resolve_device(args.device)  # before any weights are fetched or loaded

    import numpy as np

    from .features import open_backend
    from .imaging import write_image
    from .segmentation import SegmentationSession

    backend = open_backend(args.backend, args.model, device, progress=_progress_printer("weights"))
    session = SegmentationSession(backend, image, args.orientation, window=args.window)
    results = []
    if corners is not None:
        results.append(session.set_box(*corners))
    for _, p in positives:
        results.append(session.add_point(p, positive=True))
    for _, p in negatives:
        results.append(session.add_point(p, positive=False))
    # each slice's warnings as its last prompt left it: an earlier click's doubt, since corrected, is not news
    warnings = [w for r in {r.index: r for r in results}.values() for w in r.warnings]
    if args.propagate:
        bar = _progress_bar(None, "propagating", "slice")  # a count: where it stops is not known beforehand
        try:
            session.propagate(cross_views=args.cross_views,
                              progress=None if bar is None else (lambda index: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()
        warnings += session.last_propagation.warnings
    mask = session.result()
    write_image(mask, args.out, overwrite=args.overwrite)
    voxels = int(np.count_nonzero(session.mask))
    cc = voxels * float(np.prod(image.GetSpacing())) / 1000.0
    slices = int(np.count_nonzero(session.plane.stack_view(session.mask).any(axis=(1, 2))))
    last = results[-1]
    print(f"wrote {args.out}: {cc:.1f} cm3 on {slices} {args.orientation} slice(s); "
          f"predicted IoU on slice {last.index}: {last.score:.2f} ({backend.describe()}, {backend.device}; "
          f"{session.intensity.describe()})")
    if args.propagate:
        print(session.last_propagation.describe(args.orientation))
    for warning in dict.fromkeys(warnings):
        _warn(warning)
    if backend.fallback_message:
        _warn(backend.fallback_message)
    return 0


def cmd_eval_seg(args) -> int:
    import time

    modes = list(dict.fromkeys(args.mode or ["3d"]))
    firsts = list(dict.fromkeys(args.first or ["click"]))
    outputs = [args.out / "results.json", args.out / "results.md"]
    if any(p.exists() for p in outputs) and not args.overwrite:
        raise PrismRTError(f"{args.out} already holds results: choose another --out or pass --overwrite")
    _check_output(args.out / "results.json", True)
    if args.clicks < 1:
        raise PrismRTError("--clicks must be at least 1")
    if args.window:
        from .imaging.intensity import get_window

        get_window(args.window)
    if args.baseline and "box" not in firsts:
        raise PrismRTError("--baseline box-filled is a box baseline: add --first box")
    if args.limit is not None and args.limit < 1:
        raise PrismRTError("--limit must be at least 1")

    import SimpleITK as sitk

    from .features import VolumeFeatures, open_backend
    from .imaging import check_volume, read_image, slice_intensity
    from .segmentation.cases import load_cases, select
    from .segmentation.evaluation import (BOX_FILLED, evaluate_case, markdown_tables, prompt_label, summarise,
                                          to_records, wilcoxon, write_results)
    pairs, seen = [], {}
    for source in args.cases:
        cases = load_cases(source)[: args.limit]
        for case in cases:
            if case.id in seen:
                raise PrismRTError(f"case '{case.id}' is in both {seen[case.id]} and {source}: give each case set "
                                   "once, or rename the case in one of them")
            seen[case.id] = source
        pairs += select(cases, args.structure or None)
    if not pairs:
        raise PrismRTError(f"no case has the structure(s) {', '.join(args.structure)}: see the cases' mask names")
    from .device import resolve_device

    device = resolve_device(args.device)  # before any weights are fetched or loaded
    # every method resolved (and its files fetched) before any work, so a bad --model fails at once
    from .features.resolve import model_folder
    from .models.bundle import read_bundle_config

    methods, labels = [], []
    for spec in args.model or ["auto"]:
        backend_name, model = _split_model(spec)
        if model is not None:
            kind = read_bundle_config(model_folder(model, progress=_progress_printer("weights")))["kind"]
            if backend_name not in ("auto", kind):
                raise PrismRTError(f"--model {spec}: '{model}' is a '{kind}' model: write {kind}={model}")
        label = model or backend_name
        if label in labels:
            raise PrismRTError(f"--model {spec} is given twice")
        methods.append((backend_name, model))
        labels.append(label)
    results, timing = [], {}
    bar = _progress_bar(len(pairs) * len(methods), "eval-seg", "case")
    say = bar.write if bar is not None else (lambda text: print(text, file=sys.stderr))
    for (backend_name, model), label in zip(methods, labels):
        backend = open_backend(backend_name, model, device, progress=_progress_printer("weights"))
        start = time.perf_counter()
        window = args.window or backend.default_window
        images = {}
        for case, structure in pairs:
            if case.id not in images:  # one CT in memory at a time; its features shared by its structures
                image = read_image(case.image)
                intensity = slice_intensity(sitk.GetArrayViewFromImage(image), window, check_volume(image).is_ct)
                images = {case.id: (image, VolumeFeatures(backend, image, intensity, max_slices=256))}
            image, features = images[case.id]
            reference = case.reference(structure, image)
            if not reference.any():
                if bar is not None:
                    bar.update(1)
                continue
            results += evaluate_case(backend, image, reference, case=case.id, structure=structure, method=label,
                                     modes=modes, firsts=firsts, max_prompts=args.clicks,
                                     orientation=args.orientation, window=window, cross_views=args.cross_views,
                                     group=case.group, features=features)
            last = results[-1]
            say(f"{label} {structure} {case.id}: DSC {last.dice:.3f} ({last.mode}, "
                f"{prompt_label(last.first, last.prompts)})")
            if bar is not None:
                bar.update(1)
        timing[label] = time.perf_counter() - start
        del images, backend  # this method's models and features go before the next one loads
    if bar is not None:
        bar.close()
    if args.baseline:
        from .segmentation.evaluation import BaselineBackend

        labels.append(BOX_FILLED)
        images = {}
        for case, structure in pairs:
            if case.id not in images:  # one CT in memory at a time, read once for all its structures
                images = {case.id: read_image(case.image)}
            image = images[case.id]
            reference = case.reference(structure, image)
            if reference.any():
                results += evaluate_case(BaselineBackend(), image, reference, case=case.id, structure=structure,
                                         modes=modes, firsts=["box"], orientation=args.orientation,
                                         group=case.group, baseline=True, window=args.window or "soft-tissue")
    rows = summarise(results)
    tests = {}
    for other in labels[1:]:
        if other == BOX_FILLED:
            continue
        for mode in modes:
            for first in firsts:
                for n in range(1, args.clicks + 1):
                    tests[f"{labels[0]} vs {other}/{mode}/{prompt_label(first, n)}"] = wilcoxon(
                        results, labels[0], other, mode=mode, first=first, prompts=n)
    text = markdown_tables(rows, labels)
    if tests:
        text += "\n\nPaired Wilcoxon signed-rank test of DSC over (case, structure) pairs:\n\n"
        text += "| comparison | n | p |\n|---|---|---|\n" + "\n".join(
            f"| {k} | {v['n']} | {v['p_value']:.3g} |" for k, v in tests.items())
    payload = {"command": "prismrt " + " ".join(args.argv), "methods": labels,
               "modes": modes, "first_prompts": firsts, "summary": rows, "wilcoxon_dice": tests,
               "seconds": timing, "cases": to_records(results)}
    write_results(args.out, payload, text)
    print(text)
    return 0


def _structure_masks(paths) -> dict:
    """Structure masks from files (named after the file) and folders of them; refuses duplicate names."""
    from .imaging import read_image

    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _mask_name(p) != p.name)
            if not found:
                raise PrismRTError(f"'{path}' holds no mask files (.nii.gz, .nii, .nrrd, .mha)")
            files += found
        else:
            files.append(path)
    import SimpleITK as sitk

    masks = {}
    for path in files:
        name = _mask_name(path)
        if name in masks:
            raise PrismRTError(f"two masks are named '{name}': rename one of them")
        image = read_image(path)
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        is_mask = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                         sitk.sitkUInt32, sitk.sitkInt32) and stats.GetMinimum() >= 0 \
            and stats.GetMaximum() <= 1
        if not is_mask:
            if path.parent in paths and path not in paths:  # a folder's other images (the CT, a dose): skipped
                continue
            raise PrismRTError(f"'{path}' is not a mask (values 0 and 1): give structure masks")
        masks[name] = image
    return masks


def cmd_register(args) -> int:
    from .registration.outputs import REGISTRATION_FILES

    if not 0 <= args.smoothness <= 10:
        raise PrismRTError(f"--smoothness must be between 0 and 10, got {args.smoothness:g}")
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise PrismRTError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if args.slice_step < 1:
        raise PrismRTError(f"--slice-step must be 1 or more, got {args.slice_step}")
    if args.max_folding < 0:
        raise PrismRTError("--max-folding is a percentage: 0 or more")
    if args.out.exists() and not args.out.is_dir():
        raise PrismRTError(f"--out '{args.out}' is a file: give a folder")
    for name in REGISTRATION_FILES:
        _check_output(args.out / name, args.overwrite)

    from .imaging import check_volume, read_image
    from .registration.pipeline import register
    from .registration.qa import Tolerances, read_landmarks
    from .registration.outputs import write_registration

    fixed, moving = read_image(args.fixed), read_image(args.moving)
    fixed_summary, moving_summary = check_volume(fixed), check_volume(moving)
    if fixed_summary.is_ct != moving_summary.is_ct and not args.multimodal:
        which = "fixed" if fixed_summary.is_ct else "moving"
        raise PrismRTError(f"the {which} image looks like CT and the other does not: pass --multimodal if that is "
                           "intended (MIND-SSC compares structure, not intensities), or check the inputs")
    fixed_mask = read_image(args.fixed_mask) if args.fixed_mask else None
    fixed_structures = _structure_masks(args.fixed_segmentation)
    moving_structures = _structure_masks(args.moving_segmentation)
    landmarks = (read_landmarks(args.fixed_landmarks), read_landmarks(args.moving_landmarks)) \
        if args.fixed_landmarks else (None, None)

    bar = _progress_bar(100, "register", "%")

    def progress(fraction, text=""):
        if bar is not None:
            bar.set_description(text or "register", refresh=False)
            bar.update(int(round(100 * fraction)) - bar.n)

    features = None
    if args.method != "mind":
        from .registration.backbone import BackboneFeatures

        features = BackboneFeatures.from_model(args.model, args.backend, args.device, role=args.feature_role,
                                               slice_step=args.slice_step)
    try:
        result = register(fixed, moving, method=args.method, smoothness=args.smoothness, fixed_mask=fixed_mask,
                          inverse_consistency=args.inverse_consistency, device=args.device, progress=progress,
                          features=features)
    finally:
        if bar is not None:
            bar.close()
    for warning in result.warnings:
        _warn(warning)
    inputs = {"fixed": str(args.fixed), "moving": str(args.moving),
              "method": args.method if features is None else f"{args.method} ({features.describe()})",
              "smoothness": f"{args.smoothness:g}", "device": result.device,
              "time": f"{result.timings.get('total_s', 0.0):.0f} s"}
    report = write_registration(
        result, args.out, fixed=fixed, moving=moving, fixed_structures=fixed_structures,
        moving_structures=moving_structures, fixed_landmarks=landmarks[0], moving_landmarks=landmarks[1],
        tolerances=Tolerances(max_folding_percent=args.max_folding), inputs=inputs, overwrite=args.overwrite)
    print(f"wrote {args.out}/: displacement.nii.gz, transform.h5, warped.nii.gz, qa.md, qa.json and images")
    print(f"QA: {report.summary}")
    for reason in report.reasons:
        print(f"  - {reason}")
    return 0


def cmd_eval_reg(args) -> int:
    import shlex

    from .registration.evaluation import Case, evaluate, openkbp_pairs, synthetic_cases, write_results

    methods = list(dict.fromkeys(args.method or ["mind", "affine", "elastix-affine", "elastix-bspline"]))
    if not (args.openkbp or args.synthetic or args.mr):
        raise PrismRTError("nothing to evaluate: give --openkbp FOLDER, --synthetic CT and/or --mr FIXED MOVING")
    if args.pairs < 1 or args.slice_step < 1:
        raise PrismRTError("--pairs and --slice-step must be 1 or more")
    for name in ("results.json", "results.md"):
        _check_output(args.out / name, args.overwrite)
    cases = []
    if args.openkbp:
        cases += openkbp_pairs(args.openkbp, args.pairs)
    cases += synthetic_cases(args.synthetic)
    if args.mr:
        cases.append(Case("mr", f"{args.mr[0].name}<-{args.mr[1].name}", args.mr[0], args.mr[1]))

    def factory():
        from .registration.backbone import BackboneFeatures

        return BackboneFeatures.from_model(args.model, args.backend, args.device, role=args.feature_role,
                                           slice_step=args.slice_step)

    bar = _progress_bar(len(cases) * len(methods), "eval-reg", "run")

    def progress(row):
        if bar is not None:
            bar.update(1)
        score = (f"Dice {row['dice']:.3f}" if "dice" in row else f"TRE {row['tre_mean_mm']:.2f} / "
                 f"{row['tre_max_mm']:.1f} mm" if "tre_mean_mm" in row else f"NCC {row.get('ncc_after', 0):.3f}")
        print(f"{row['method']} {row['case']}: {score}, folding {row['folding_percent']:.3f} %, "
              f"{row['cpu_s']:.0f} CPU s", flush=True)

    try:
        results = evaluate(cases, methods, features_factory=factory, smoothness=args.smoothness,
                           device=args.device, threads=args.threads, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    command = "prismrt " + " ".join(shlex.quote(a) for a in args.argv)
    write_results(results, args.out, command)
    print(f"wrote {args.out}/results.md and results.json")
    for method, why in results["skipped"].items():
        _warn(f"{method} not run: {why}")
    return 0


def _image_model_factory(args):
    def factory():
        from .chat.engines.image import ImageModelEngine

        return ImageModelEngine.default(device=args.device, backend=args.backend, model=args.model)

    return factory


def _read_questions(path: Path) -> list[tuple]:
    """The batch file's (id, question, slice) items; every line is checked before anything is answered."""
    import json

    items, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismRTError(f"{path}, line {number}: not JSON ({exc.msg}): write one object a line, "
                               '{"id": ..., "question": ..., "slice": "axial:63" or null}') from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise PrismRTError(f"{path}, line {number}: needs a \"question\" string (and an \"id\")")
        qid = item.get("id", number)
        if qid in seen:
            raise PrismRTError(f"{path}, line {number}: the id {qid!r} is used twice: give each question its own")
        seen.add(qid)
        items.append((qid, item["question"], item.get("slice")))
    if not items:
        raise PrismRTError(f"{path} holds no questions")
    return items


def _print_answer(answer, as_json: bool, qid=None) -> None:
    import json

    if as_json:
        out = answer.to_dict()
        if qid is not None:
            out = {"id": qid, **out}
        print(json.dumps(out, default=str), flush=True)
        return
    prefix = f"[{qid}] " if qid is not None else ""
    print(f"{prefix}{answer.answer}")
    print(f"{' ' * len(prefix)}(source: {answer.source}; confidence {answer.confidence:.2f}"
          + (f"; slice {answer.slice}" if answer.slice else "") + ")", flush=True)


def cmd_ask(args) -> int:
    from .chat.session import ChatSession
    from .chat.structures import StructureSet
    from .chat.types import SliceRef
    from .imaging.io import read_image

    if (args.question is None) == (args.questions is None):
        raise PrismRTError("give a QUESTION or --questions FILE.jsonl (one of them)")
    if args.questions is not None and args.slice:
        raise PrismRTError("--slice is for a single question: in a batch file each line has its own \"slice\"")
    ref = SliceRef.parse(args.slice)
    image = read_image(args.image)
    structures = StructureSet.from_files(args.segmentation, image) if args.segmentation else None
    session = ChatSession(image, structures, image_model=None if args.no_image_model else "auto",
                          image_model_factory=None if args.no_image_model else _image_model_factory(args))
    if args.questions is None:
        _print_answer(session.ask(args.question, ref), args.json)
        return 0
    for qid, answer in session.ask_many(_read_questions(args.questions)):
        _print_answer(answer, args.json, qid)
    return 0


def _case_folders(paths) -> list[Path]:
    """Case folders (holding ct.nii.gz); a folder of them stands for all of them."""
    out = []
    for path in paths:
        if (path / "ct.nii.gz").exists():
            out.append(path)
            continue
        found = sorted(p for p in path.iterdir() if (p / "ct.nii.gz").exists()) if path.is_dir() else []
        if not found:
            raise PrismRTError(f"'{path}' is not a case (no ct.nii.gz in it) and holds no case folders")
        out += found
    return out


def cmd_eval_ask(args) -> int:
    import shlex

    from .chat.evaluation import run_eval

    for name in ("results.json", "results.md"):
        _check_output(args.out / name, args.overwrite)
    if args.max_per_case is not None and args.max_per_case < 1:
        raise PrismRTError("--max-per-case must be 1 or more")
    cases = _case_folders(args.cases)
    command = "prismrt " + " ".join(shlex.quote(a) for a in args.argv)
    run_eval(cases, args.out, backend=args.backend, model=args.model, device=args.device,
             max_per_case=args.max_per_case, command=command)
    print(f"wrote {args.out}/results.md and results.json")
    return 0


COMMANDS = {
    "info": cmd_info,
    "overview": cmd_overview,
    "segment": cmd_segment,
    "eval-seg": cmd_eval_seg,
    "register": cmd_register,
    "eval-reg": cmd_eval_reg,
    "ask": cmd_ask,
    "eval-ask": cmd_eval_ask,
    "models": cmd_models,
}


_POINT_OPTIONS = ("--point", "--negative", "--box")
_NUMBER_LIST = re.compile(r"^-?[\d.]+([,;]\s*-?[\d.]+)+$")


def _attach_negative_values(argv: list[str]) -> list[str]:
    """Let "--point -12,40,-3" work: argparse would read the value as an option because it starts with '-'."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _POINT_OPTIONS and i + 1 < len(argv) and _NUMBER_LIST.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# errno values of an environment the user can fix (permissions, a read-only or full disk), not of a bug
_FIXABLE_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR", "EEXIST", "ENOENT"}


def _fixable_os_error(exc: OSError) -> str | None:
    import errno

    if exc.filename is None or errno.errorcode.get(exc.errno) not in _FIXABLE_ERRNOS:
        return None
    return f"cannot use '{exc.filename}': {exc.strerror}: check the path, its permissions and the free disk space"


def _run_quietly(command, args) -> int:
    """Run a command with other libraries' warnings off the terminal (Python's and ITK's), restored afterwards."""
    import warnings

    try:
        import SimpleITK as sitk

        itk_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        sitk = None
    with warnings.catch_warnings():
        if not args.debug:
            warnings.filterwarnings("ignore", module=r"(?!PRISMRTLib)")
            if sitk is not None:
                sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            return command(args)
        finally:
            if sitk is not None:
                sitk.ProcessObject.SetGlobalWarningDisplay(itk_warnings)


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_attach_negative_values(argv))
    args.argv = argv  # what was typed, for the evaluation reports
    try:
        return _run_quietly(COMMANDS[args.command], args)
    except PrismRTError as exc:
        if args.debug:
            raise
        print(f"prismrt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prismrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _fixable_os_error(exc) if isinstance(exc, OSError) else None
        if message is not None and not args.debug:  # the environment (permissions, disk), not a bug
            print(f"prismrt: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        # a bug, not bad input: say so, keep the traceback one flag away
        if args.debug:
            raise
        print(f"prismrt: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
