"""One feature interface, two backends: ``prismrt`` (the student, one pass) and ``teachers`` (three models).

Both take the same input, a batch of windowed CT slices in [0, 1] with their pixel spacing, and return the same
typed :class:`SliceFeatures`, so segmentation, registration and VQA run on either. Every feature map covers the same
field of view: the slice letterboxed at the top-left of a square (:attr:`SliceFeatures.letterbox`, defined at
MedSAM's input size, where SAM prompts live; other grids are the same box at another size).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .imaging.resize import Letterbox
from .models.biomedclip import biomedclip_input
from .models.bundle import Bundle, BundleError
from .models.dinov3 import dinov3_features, dinov3_input
from .models.medsam import medsam_input

log = logging.getLogger("prismrt")
BACKENDS = ("prismrt", "teachers")


@dataclass
class SliceFeatures:
    sam_embedding: torch.Tensor  # (B, C, G, G): MedSAM image embedding (256 x 64 x 64 for ViT-B at 1024 px)
    dino_cls: torch.Tensor  # (B, D)
    dino_patches: torch.Tensor  # (B, D, Gd, Gd): dense DINOv3 features
    clip_cls: torch.Tensor  # (B, W): BiomedCLIP image feature before its projection
    clip_patches: torch.Tensor  # (B, W, Gc, Gc): BiomedCLIP patch tokens
    clip_embedding: torch.Tensor  # (B, E): in BiomedCLIP's joint image-text space (not normalised)
    letterbox: Letterbox  # the slice's place in the model grids, at MedSAM's input size

    TENSORS = ("sam_embedding", "dino_cls", "dino_patches", "clip_cls", "clip_patches", "clip_embedding")

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {name: None if getattr(self, name) is None else tuple(getattr(self, name).shape) for name in self.TENSORS}

    def __len__(self) -> int:
        return self.sam_embedding.shape[0]

    def select(self, index) -> "SliceFeatures":
        """A sub-batch (``index`` an int or slice), keeping the batch dimension."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return SliceFeatures(**{n: None if getattr(self, n) is None else getattr(self, n)[index] for n in self.TENSORS},
                             letterbox=self.letterbox)

    @staticmethod
    def concat(parts: "list[SliceFeatures]") -> "SliceFeatures":
        def cat(name):
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return SliceFeatures(**{n: cat(n) for n in SliceFeatures.TENSORS}, letterbox=parts[0].letterbox)


def _prepare(slices, pixel_spacing) -> tuple[np.ndarray, tuple[float, float]]:
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim == 2:
        slices = slices[None]
    if slices.ndim != 3 or min(slices.shape) < 1:
        raise ValueError(f"expected slices of shape (B, H, W), got {slices.shape}")
    if not np.isfinite(slices).all() or slices.min() < -1e-3 or slices.max() > 1 + 1e-3:
        raise ValueError("slices must be windowed to [0, 1] (see PRISMRTLib.imaging.Window.apply)")
    return slices, (float(pixel_spacing[0]), float(pixel_spacing[1]))


def _letterboxed(slices: np.ndarray, box: Letterbox) -> torch.Tensor:
    return torch.from_numpy(np.stack([box.resize_to_model(s) for s in slices]))


class FeatureBackend:
    """Common behaviour: device and precision, batching, GPU out-of-memory fallback, and the task heads.

    Task heads (identical in both backends): ``prompt_encoder`` and ``mask_decoder`` (MedSAM), ``clip_text``
    with ``tokenizer``, ``clip_visual_proj`` and ``logit_scale`` (BiomedCLIP).
    """

    name = ""

    def __init__(self, bundle: Bundle, device: str = "cpu", half: bool | None = None, batch_size: int = 8):
        self.bundle = bundle
        self.medsam_config = bundle.medsam_config
        self.tokenizer = bundle.tokenizer
        self.batch_size = max(1, int(batch_size))
        self.device = "cpu"
        self.half = bool(half)
        self.fallback_message: str | None = None
        self.to(device, half)

    # ---- device handling -----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return self.bundle.modules

    def to(self, device: str, half: bool | None = None) -> "FeatureBackend":
        self.device = str(device)
        # half precision only on GPU (CPU kernels are slower and less accurate in fp16)
        self.half = self.device.startswith("cuda") if half is None else (bool(half) and self.device.startswith("cuda"))
        for module in self.modules().values():
            module.to(self.device)
        return self

    def _autocast(self):
        if self.half:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _with_fallback(self, fn, *args):
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError:
            if self.device == "cpu":
                raise
            self.fallback_message = (
                f"the GPU ({self.device}) ran out of memory: PRISM-RT continues on the CPU, more slowly. "
                "Close other GPU programs or use smaller batches to stay on the GPU."
            )
            log.warning(self.fallback_message)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.to("cpu")
            return fn(*args)

    # ---- features ------------------------------------------------------------------------------------------------
    def reference_letterbox(self, slice_shape, pixel_spacing) -> Letterbox:
        return Letterbox.fit(slice_shape, pixel_spacing, self.medsam_config.img_size)

    def encode(self, slices, pixel_spacing=(1.0, 1.0), *, sam_only: bool = False) -> SliceFeatures:
        """Features of a batch of slices (B, H, W) in [0, 1] sharing one pixel spacing (row, col) in mm.

        ``sam_only``: only MedSAM's embedding is needed (delineation); the teachers backend then skips DINOv3 and
        BiomedCLIP and leaves their fields ``None`` (the student computes everything in its one pass anyway).
        """
        slices, spacing = _prepare(slices, pixel_spacing)
        box = self.reference_letterbox(slices.shape[1:], spacing)
        parts = []
        for start in range(0, len(slices), self.batch_size):
            chunk = slices[start:start + self.batch_size]
            parts.append(self._with_fallback(self._encode_chunk, chunk, box, sam_only))
        return SliceFeatures.concat(parts)

    def _encode_chunk(self, slices: np.ndarray, box: Letterbox, sam_only: bool) -> SliceFeatures:
        raise NotImplementedError

    def _finish(self, box: Letterbox, **tensors) -> SliceFeatures:
        return SliceFeatures(**{k: None if v is None else v.float() for k, v in tensors.items()}, letterbox=box)

    # ---- heads ---------------------------------------------------------------------------------------------------
    @property
    def prompt_encoder(self):
        raise NotImplementedError

    @property
    def mask_decoder(self):
        raise NotImplementedError

    @property
    def clip_text(self):
        raise NotImplementedError

    @property
    def clip_visual_proj(self):
        raise NotImplementedError

    @property
    def logit_scale(self):
        raise NotImplementedError

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, E) in the joint space (not normalised)."""
        ids = self.tokenizer(texts).to(self.device)
        with self._autocast():
            return self.clip_text(ids).float()


class StudentBackend(FeatureBackend):
    """The PRISM-RT student: one backbone pass gives every teacher's features through the translators."""

    name = "prismrt"

    def __init__(self, bundle: Bundle, device: str = "cpu", half: bool | None = None, batch_size: int = 8,
                 input_size: int | None = None):
        if bundle.kind != "prismrt":
            raise ValueError(f"the prismrt backend needs a 'prismrt' bundle, got '{bundle.kind}'")
        self.input_size = int(input_size or bundle.modules["student"].config.img_size)
        if self.input_size % 16:
            raise ValueError(f"the student's input size must be a multiple of 16, got {self.input_size}")
        super().__init__(bundle, device, half, batch_size)

    @torch.inference_mode()
    def _encode_chunk(self, slices, box, sam_only=False):
        student = self.bundle.modules["student"]
        x = _letterboxed(slices, box.at_size(self.input_size)).to(self.device)
        with self._autocast():
            out = student(x)
            embedding = self.clip_visual_proj(out["clip_cls"])
        return self._finish(
            box, sam_embedding=out["medsam"], dino_cls=out["dino_cls"], dino_patches=out["dino_patches"],
            clip_cls=out["clip_cls"], clip_patches=out["clip_patches"], clip_embedding=embedding,
        )

    prompt_encoder = property(lambda self: self.bundle.modules["prompt_encoder"])
    mask_decoder = property(lambda self: self.bundle.modules["mask_decoder"])
    clip_text = property(lambda self: self.bundle.modules["clip_heads"].text)
    clip_visual_proj = property(lambda self: self.bundle.modules["clip_heads"].visual_proj)
    logit_scale = property(lambda self: self.bundle.modules["clip_heads"].logit_scale)


class TeacherBackend(FeatureBackend):
    """MedSAM, DINOv3 and BiomedCLIP, each at its own input size and with its own normalisation."""

    name = "teachers"

    def __init__(self, bundle: Bundle, device: str = "cpu", half: bool | None = None, batch_size: int = 8):
        if bundle.kind != "teachers":
            raise ValueError(f"the teachers backend needs a 'teachers' bundle, got '{bundle.kind}'")
        super().__init__(bundle, device, half, batch_size)

    @torch.inference_mode()
    def _encode_chunk(self, slices, box, sam_only=False):
        m = self.bundle.modules
        dino_size = m["dinov3"].patch_embed.img_size[0]
        clip_size = self.bundle.clip_config.image_size
        with self._autocast():
            sam = m["medsam"].image_encoder(medsam_input(_letterboxed(slices, box).to(self.device)))
            if sam_only:
                return self._finish(box, sam_embedding=sam, dino_cls=None, dino_patches=None, clip_cls=None,
                                    clip_patches=None, clip_embedding=None)
            dino_cls, dino_patches = dinov3_features(
                m["dinov3"], dinov3_input(_letterboxed(slices, box.at_size(dino_size)).to(self.device))
            )
            visual = m["biomedclip"].visual
            tokens = visual.tokens(biomedclip_input(_letterboxed(slices, box.at_size(clip_size)).to(self.device)))
            clip_cls = visual.pre_projection(tokens)
            g = clip_size // visual.trunk.patch_embed.patch_size[0]
            clip_patches = tokens[:, visual.trunk.num_prefix_tokens:].transpose(1, 2).reshape(len(slices), -1, g, g)
            embedding = visual.head(clip_cls)
        return self._finish(
            box, sam_embedding=sam, dino_cls=dino_cls, dino_patches=dino_patches, clip_cls=clip_cls,
            clip_patches=clip_patches, clip_embedding=embedding,
        )

    prompt_encoder = property(lambda self: self.bundle.modules["medsam"].prompt_encoder)
    mask_decoder = property(lambda self: self.bundle.modules["medsam"].mask_decoder)
    clip_text = property(lambda self: self.bundle.modules["biomedclip"].text)
    clip_visual_proj = property(lambda self: self.bundle.modules["biomedclip"].visual.head.proj)
    logit_scale = property(lambda self: self.bundle.modules["biomedclip"].logit_scale)


def create_backend(bundle: Bundle, device: str = "cpu", **kw) -> FeatureBackend:
    """The backend a bundle provides: 'prismrt' bundles give the student, 'teachers' bundles the teachers."""
    return (StudentBackend if bundle.kind == "prismrt" else TeacherBackend)(bundle, device, **kw)


# The models each backend uses unless told otherwise (manifest names, in order of preference): the first one
# installed wins; if none is, the first one the manifest knows is downloaded. The official teachers are converted
# by each user (training/convert_teachers.py); the stand-ins ship with PRISM-RT.
DEFAULT_MODELS = {
    "prismrt": ("prismrt-student-vitb",),
    "teachers": ("teachers-official", "teachers-standin-openkbp"),
}


def resolve_model(backend: str, progress=None, cancel=None):
    """The folder of the model a backend uses by default (see :data:`DEFAULT_MODELS`)."""
    from .weights import UnknownModelError, WeightsNotInstalledError, default_manifest, ensure_model, model_path

    manifest = default_manifest()
    known = [n for n in DEFAULT_MODELS[backend] if n in manifest.models]
    for name in known:
        try:
            return model_path(name, manifest)
        except WeightsNotInstalledError:
            continue
    if not known:
        raise UnknownModelError(
            f"no model for the '{backend}' backend is published yet ({', '.join(DEFAULT_MODELS[backend])}): "
            "pass a bundle folder with --model, or use the other backend"
        )
    return ensure_model(known[0], progress=progress, cancel=cancel, manifest=manifest)


def open_backend(
    backend: str = "prismrt",
    model: str | None = None,
    device: str = "auto",
    *,
    progress=None,
    cancel=None,
    **kw,
) -> FeatureBackend:
    """Get a backend ready to run: weights from the cache (or shipped), downloaded and verified on first use.

    ``model`` is a manifest name or a bundle folder (default: :data:`DEFAULT_MODELS`); ``device`` "auto" picks
    CUDA when present, else the CPU.
    """
    from pathlib import Path

    from .device import resolve_device
    from .models.bundle import load_bundle
    from .weights import ensure_model

    if backend not in BACKENDS:
        raise BundleError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if model is None:
        folder = resolve_model(backend, progress, cancel)
    elif Path(model).is_dir():
        folder = Path(model)
    else:
        folder = ensure_model(model, progress=progress, cancel=cancel)
    bundle = load_bundle(folder)
    if bundle.kind != backend:
        raise BundleError(
            f"model '{model or folder}' is a '{bundle.kind}' bundle, not one for the '{backend}' backend: "
            f"choose a '{backend}' model (prismrt models list)"
        )
    return create_backend(bundle, resolve_device(device), **kw)
