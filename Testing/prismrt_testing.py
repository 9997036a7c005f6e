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
