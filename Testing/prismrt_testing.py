"""Shared test helpers (a module with its own name, so test folders never import each other's conftest)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "Testing" / "Data" / "openkbp_pt_226"
SHARED_DATA = Path(os.environ.get("PRISMRT_SHARED_DATA", REPO.parent / "shared" / "data"))


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


# Direction matrices the geometry must handle (columns = index axes in LPS).
DIRECTIONS = {
    "openkbp": np.diag([1.0, 1.0, -1.0]),  # i R->L, j A->P, k S->I (as the OpenKBP CTs)
    "ras-stored": np.diag([-1.0, -1.0, 1.0]),  # as NIfTI files written in RAS (TotalSegmentator samples)
    "coronal-acq": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),  # j runs S->I, k runs A->P
    "oblique": rotation(2, 12.0) @ rotation(0, -7.0) @ np.diag([1.0, 1.0, -1.0]),
}


def make_volume(direction, size=(40, 36, 24), spacing=(3.9, 3.9, 2.5), origin=(-80.0, 12.5, 140.0), dtype=np.int16):
    """A volume with distinct values everywhere (value = linear index mod 30000) and the given geometry."""
    arr = (np.arange(np.prod(size)).reshape(size[::-1]) % 30000).astype(dtype)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    return image


def make_tiny_bundle(kind: str, folder: Path, seed: int = 0, words=None) -> dict:
    """A randomly initialised bundle of the 'tiny' presets ('teachers' or 'prismrt'); returns its modules."""
    import torch

    from PRISMRTLib.models import build_components, preset_configs, save_bundle
    from PRISMRTLib.models.biomedclip import write_vocab

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(words or "an axial ct slice of the left right parotid spinal cord target".split(),
                        folder.parent / f".{folder.name}-vocab.txt")
    torch.manual_seed(seed)
    configs = preset_configs("tiny", "tiny" if kind == "prismrt" else None)
    modules = build_components(kind, configs)
    save_bundle(folder, kind, configs, modules, vocab, name=f"tiny-{kind}", version="0.0.1")
    return modules


# ---- an oracle segmentation backend ---------------------------------------------------------------------------------
ORACLE_MODEL_SIZE = 128
ECHO_RADIUS = 3.0  # model pixels: what a click adds or removes in OracleBackend(echo_mask=True)


class _OraclePrompts:
    def __call__(self, points=None, boxes=None, masks=None):
        return (points, boxes, masks), None

    def get_dense_pe(self):
        return None


class _OracleDecoder:
    def __init__(self, echo_mask: bool = False):
        self.echo_mask = echo_mask

    def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                 multimask_output):
        import torch

        points, boxes, masks = sparse_prompt_embeddings
        obj = image_embeddings[0, 0] > 0.5
        n = 3 if multimask_output else 1
        if self.echo_mask and masks is not None:  # the mask input, edited by the clicks (disks of ECHO_RADIUS)
            out = torch.nn.functional.interpolate(masks.float(), obj.shape, mode="nearest")[0, 0] > 0
            if points is not None:
                yy, xx = torch.meshgrid(torch.arange(obj.shape[0]), torch.arange(obj.shape[1]), indexing="ij")
                for (x, y), label in zip(points[0][0].tolist(), points[1][0].tolist()):
                    x, y = (x + 0.5) / ORACLE_MODEL_SIZE * obj.shape[-1] - 0.5, (y + 0.5) / ORACLE_MODEL_SIZE * \
                        obj.shape[-1] - 0.5
                    disk = (yy - y) ** 2 + (xx - x) ** 2 <= ECHO_RADIUS ** 2
                    out = out | disk if label == 1 else out & ~disk
            logits = torch.where(out, 10.0, -10.0)
            return logits[None, None].expand(1, n, -1, -1), torch.full((1, n), 0.9)
        hit = points is None and boxes is None
        if points is not None:
            coords, labels = points
            positives = coords[0][labels[0] == 1]
            hit = len(positives) > 0  # negative points alone find nothing
            if hit:
                # SAM's prompt encoder adds 0.5 and divides by the input size: pixel centres at integers
                x, y = (positives[0] + 0.5) / ORACLE_MODEL_SIZE * obj.shape[-1] - 0.5
                hit = bool(obj[int(round(float(y))), int(round(float(x)))])
        if boxes is not None and not hit:  # a box prompt also finds the object inside it
            x0, y0, x1, y1 = ((boxes[0] + 0.5) / ORACLE_MODEL_SIZE * obj.shape[-1] - 0.5).round().int().tolist()
            inside = torch.zeros_like(obj)
            inside[max(y0, 0): y1 + 1, max(x0, 0): x1 + 1] = True
            hit = bool((obj & inside).any())
            if points is None:  # a box alone (the user's): only what it holds, so a misplaced box shows
                obj = obj & inside
        logits = torch.where(obj, 10.0, -10.0) if hit else torch.full_like(image_embeddings[0, 0], -10.0)
        iou = torch.full((1, n), 0.95 if hit else 0.05)
        return logits[None, None].expand(1, n, -1, -1), iou


def OracleBackend(echo_mask: bool = False):
    """A feature backend with SAM's interface and coordinate conventions whose "embedding" is the windowed slice
    letterboxed into a 128 px model grid and whose decoder returns the slice's bright object (window value > 0.5)
    when the first positive point falls on it, or a box holds part of it (a box alone: the part it holds). Learned
    weights play no part, so a test with it fails on geometry only: a flipped axis, swapped x/y, shifted letterbox
    or wrong slice index. ``echo_mask``: given a mask input, the decoder returns it with a disk added at each positive
    click and removed at each negative one (what the caller fed the model shows in the result)."""
    import torch

    from PRISMRTLib.features import FeatureBackend, SliceFeatures
    from PRISMRTLib.imaging import Letterbox

    class _Oracle(FeatureBackend):
        name = "oracle"
        prompt_encoder = _OraclePrompts()
        mask_decoder = _OracleDecoder(echo_mask)

        def __init__(self):
            self.device, self.half, self.batch_size, self.fallback_message = "cpu", False, 8, None
            self.calls = 0

        def encode(self, slices, pixel_spacing=(1.0, 1.0), sam_only=False):
            self.calls += 1
            slices = np.asarray(slices, np.float32)
            slices = slices[None] if slices.ndim == 2 else slices
            box = Letterbox.fit(slices.shape[1:], pixel_spacing, ORACLE_MODEL_SIZE)
            emb = torch.from_numpy(np.stack([box.resize_to_model(s, antialias=False) for s in slices]))[:, None]
            z = torch.zeros(len(slices), 1)
            return SliceFeatures(emb, z, emb, z, emb, z, letterbox=box)

    return _Oracle()


def slicer_core_or_skip():
    """``import slicer`` from slicer-core (the MRML library of Slicer, from PyPI), or skip the calling test module:
    another, unrelated PyPI package is also named ``slicer``."""
    import pytest

    slicer = pytest.importorskip(
        "slicer", reason="slicer-core is not installed (pip install slicer-core): it runs the module's MRML logic"
    )
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip(f"the installed 'slicer' package ({getattr(slicer, '__file__', '?')}) is not slicer-core",
                    allow_module_level=True)
    return slicer


def ptv_phantom():
    """The real PTV70 of OpenKBP pt_226 as a bright object (200 HU) in a dark volume (-1000 HU) on the real CT grid
    (direction z = -1, 3.9 x 3.9 x 2.5 mm): (image, PTV70 as a (k, j, i) bool array)."""
    ct = sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))
    ptv = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / "PTV70.nii.gz"))) > 0
    image = sitk.GetImageFromArray(np.where(ptv, 200, -1000).astype(np.int16))
    image.CopyInformation(ct)
    return image, ptv
