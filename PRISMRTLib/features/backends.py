"""One feature interface, two backends: ``prismrt`` (the student, one pass) and ``teachers`` (one model per role).

Both take the same input, a batch of windowed CT slices in [0, 1] with their pixel spacing, and return the same
typed :class:`SliceFeatures`, so segmentation, registration and chat run on either. Every feature map covers the same
field of view: the slice letterboxed at the top-left of a square (:attr:`SliceFeatures.letterbox`, defined at the SAM
teacher's input size, where SAM prompts live; other grids are the same box at another size). What each teacher
needs (input size, normalisation) comes from the teacher registry.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import PrismRTError
from ..imaging.resize import Letterbox
from ..models.bundle import Bundle
from ..models.litemedsam import set_memory_format
from ..models.registry import ROLE_OUTPUTS, ROLES, TeacherSpec
from .types import SliceFeatures

log = logging.getLogger("prismrt")
BACKENDS = ("prismrt", "teachers")
DEFAULT_SAM_INPUT = 1024  # the reference letterbox of a backend without a SAM teacher


class MissingTeacherError(PrismRTError):
    """A task needs a role (sam, dino, clip) the chosen model does not provide."""


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

    Task heads (identical in both backends): ``prompt_encoder`` and ``mask_decoder`` (the SAM teacher's), ``clip_text``
    with ``tokenizer``, ``clip_visual_proj`` and ``logit_scale`` (the CLIP teacher's).
    """

    name = ""
    default_window = "soft-tissue"  # the CT window delineation uses unless told (the SAM teacher's, if known)
    propagation = "mask-prompt"  # how delineation's propagation prompts a slice (registry.propagation_rule)

    def __init__(self, device: str = "cpu", half: bool | None = None, batch_size: int = 8):
        self.batch_size = max(1, int(batch_size))
        self.device = "cpu"
        self.half = bool(half)
        self._half_request = half
        self.fallback_message: str | None = None
        self.to(device, half)

    # ---- device handling -----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def to(self, device: str, half: bool | None = None) -> "FeatureBackend":
        self.device = str(device)
        # half precision only on GPU (CPU kernels are slower and less accurate in fp16)
        self.half = self.device.startswith("cuda") if half is None else (bool(half) and self.device.startswith("cuda"))
        for module in self.modules().values():
            set_memory_format(module.to(self.device), self.device)
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

    # ---- what the backend is -------------------------------------------------------------------------------------
    @property
    def sam_input_size(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the models behind this backend (for messages and reports)."""
        return self.name

    # ---- features ------------------------------------------------------------------------------------------------
    def reference_letterbox(self, slice_shape, pixel_spacing) -> Letterbox:
        return Letterbox.fit(slice_shape, pixel_spacing, self.sam_input_size)

    def encode(self, slices, pixel_spacing=(1.0, 1.0), *, sam_only: bool = False,
               roles: "tuple[str, ...] | None" = None) -> SliceFeatures:
        """Features of a batch of slices (B, H, W) in [0, 1] sharing one pixel spacing (row, col) in mm.

        ``roles``: only these roles' features are needed (e.g. ``("dino",)`` for registration); ``sam_only`` is
        ``roles=("sam",)`` (delineation). The teachers backend then runs only those teachers, the student only those
        translators (its trunk runs once either way); the other fields are ``None``.
        """
        roles = ("sam",) if sam_only else (None if roles is None else tuple(roles))
        unknown = set(roles or ()) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}: expected some of {ROLES}")
        slices, spacing = _prepare(slices, pixel_spacing)
        box = self.reference_letterbox(slices.shape[1:], spacing)
        parts = []
        for start in range(0, len(slices), self.batch_size):
            chunk = slices[start:start + self.batch_size]
            parts.append(self._with_fallback(self._encode_chunk, chunk, box, roles))
        return SliceFeatures.concat(parts)

    def _encode_chunk(self, slices: np.ndarray, box: Letterbox, roles: "tuple[str, ...] | None") -> SliceFeatures:
        raise NotImplementedError

    def _finish(self, box: Letterbox, tensors: dict) -> SliceFeatures:
        return SliceFeatures(**{n: None if tensors.get(n) is None else tensors[n].float()
                                for n in SliceFeatures.TENSORS}, letterbox=box)

    # ---- heads ---------------------------------------------------------------------------------------------------
    def head(self, name: str):
        raise NotImplementedError

    prompt_encoder = property(lambda self: self.head("prompt_encoder"))
    mask_decoder = property(lambda self: self.head("mask_decoder"))
    clip_text = property(lambda self: self.head("text"))
    clip_visual_proj = property(lambda self: self.head("visual_proj"))
    logit_scale = property(lambda self: self.head("logit_scale"))

    @property
    def tokenizer(self):
        raise NotImplementedError

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, E) in the joint space (not normalised)."""
        ids = self.tokenizer(texts).to(self.device)
        with self._autocast():
            return self.clip_text(ids).float()


_HEAD_ROLE = {"prompt_encoder": "sam", "mask_decoder": "sam", "text": "clip", "visual_proj": "clip",
              "logit_scale": "clip"}


class StudentBackend(FeatureBackend):
    """The PRISM-RT student: one backbone pass gives every teacher's features through the translators."""

    name = "prismrt"

    def __init__(self, bundle: Bundle, device: str = "cpu", half: bool | None = None, batch_size: int = 8,
                 input_size: int | None = None):
        if bundle.kind != "prismrt":
            raise ValueError(f"the prismrt backend needs a 'prismrt' bundle, got '{bundle.kind}'")
        self.bundle = bundle
        self.input_size = int(input_size or bundle.modules["student"].config.img_size)
        if self.input_size % 16:
            raise ValueError(f"the student's input size must be a multiple of 16, got {self.input_size}")
        super().__init__(device, half, batch_size)

    def modules(self):
        return self.bundle.modules

    @property
    def sam_input_size(self) -> int:
        sam = self.bundle.teachers.get("sam")
        return sam.input_size if sam is not None else DEFAULT_SAM_INPUT

    def describe(self) -> str:
        heads = (self.bundle.meta or {}).get("sam_heads", "")
        return f"prismrt: {self.bundle.name} {self.bundle.version}".rstrip() + (f" (SAM heads {heads})" if heads else "")

    @property
    def default_window(self) -> str:
        sam = self.bundle.teachers.get("sam")
        return sam.default_window if sam is not None else FeatureBackend.default_window

    @property
    def propagation(self) -> str:
        from ..models.registry import propagation_rule

        if "sam" not in self.bundle.teachers:
            return FeatureBackend.propagation
        return propagation_rule((self.bundle.meta or {}).get("sam_heads", ""))  # the heads the student ships

    @torch.inference_mode()
    def _encode_chunk(self, slices, box, roles=None):
        student = self.bundle.modules["student"]
        at = box.at_size(self.input_size)
        x = _letterboxed(slices, at).to(self.device)
        # only the roles asked for (delineation: the SAM map alone); clip_embedding is clip_cls projected
        only = None if roles is None else {n for r in roles for n in ROLE_OUTPUTS[r]} | (
            {"clip_cls"} if "clip" in roles else set())
        with self._autocast():
            out = dict(student(x, at.content_box, only))
            if "clip_cls" in out and "clip_heads" in self.bundle.modules:
                out["clip_embedding"] = self.clip_visual_proj(out["clip_cls"])
        return self._finish(box, out)

    def head(self, name):
        modules = self.bundle.modules
        if name in ("prompt_encoder", "mask_decoder") and name in modules:
            return modules[name]
        if name in ("text", "visual_proj", "logit_scale") and "clip_heads" in modules:
            return getattr(modules["clip_heads"], name)
        raise MissingTeacherError(
            f"the student '{self.bundle.name}' has no {_HEAD_ROLE[name]} teacher's heads: choose a model that has "
            "them (prismrt models list)")

    @property
    def tokenizer(self):
        if self.bundle.tokenizer is None:
            raise MissingTeacherError(f"the student '{self.bundle.name}' has no CLIP teacher (no tokenizer)")
        return self.bundle.tokenizer


@dataclass
class Teacher:
    """One teacher of the teachers backend: its spec, its module, and where it came from."""

    spec: TeacherSpec
    module: torch.nn.Module
    model: str  # the bundle's name (and version)
    tokenizer: object | None = None


class TeacherBackend(FeatureBackend):
    """One teacher per role, each at its own input size and with its own normalisation (from the registry).

    ``teachers`` maps a role to a :class:`Teacher`, or to a callable that loads one: roles are loaded when first
    used, so delineation never loads the DINO and CLIP teachers.
    """

    name = "teachers"

    def __init__(self, teachers: "dict[str, Teacher | Callable[[], Teacher]]", device: str = "cpu",
                 half: bool | None = None, batch_size: int = 8):
        unknown = set(teachers) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}: expected some of {ROLES}")
        if not teachers:
            raise ValueError("the teachers backend needs at least one teacher")
        self._sources = dict(teachers)
        self._loaded: dict[str, Teacher] = {}
        self._load_lock = threading.Lock()
        super().__init__(device, half, batch_size)

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu", **kw) -> "TeacherBackend":
        if bundle.kind != "teachers":
            raise ValueError(f"the teachers backend needs a 'teachers' bundle, got '{bundle.kind}'")
        return cls(teachers_of(bundle), device, **kw)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self._sources)

    def teacher(self, role: str) -> Teacher:
        if role not in self._sources:
            raise MissingTeacherError(
                f"no {role} teacher is configured for the teachers backend: pass a model that has one (--model)")
        # first use may come from inside encode()'s inference mode: weights loaded there would be inference
        # tensors, which a later move to another device (the out-of-memory fallback) cannot use
        with self._load_lock, torch.inference_mode(False):
            if role not in self._loaded:
                source = self._sources[role]
                teacher = source if isinstance(source, Teacher) else source()
                set_memory_format(teacher.module.to(self.device), self.device).eval()
                self._loaded[role] = teacher
        return self._loaded[role]

    def modules(self):
        return {role: t.module for role, t in self._loaded.items()}

    @property
    def sam_input_size(self) -> int:
        if "sam" not in self._sources:
            return DEFAULT_SAM_INPUT
        return self.teacher("sam").spec.input_size

    @property
    def default_window(self) -> str:
        return self.teacher("sam").spec.default_window if "sam" in self._sources else FeatureBackend.default_window

    @property
    def propagation(self) -> str:
        from ..models.registry import propagation_rule

        return propagation_rule(self.teacher("sam").model) if "sam" in self._sources else FeatureBackend.propagation

    def describe(self) -> str:
        """The teachers loaded so far (those a task used), e.g. "teachers: sam=litemedsam-clicks 1"."""
        loaded = [f"{role}={self._loaded[role].model}" for role in self.roles if role in self._loaded]
        return "teachers: " + (", ".join(loaded) if loaded else "none loaded yet")

    @torch.inference_mode()
    def _encode_chunk(self, slices, box, roles=None):
        out: dict[str, torch.Tensor] = {}
        roles = self.roles if roles is None else roles
        with self._autocast():
            for role in roles:
                teacher = self.teacher(role)
                at = box.at_size(teacher.spec.input_size)
                x = _letterboxed(slices, at).to(self.device)
                out.update(teacher.spec.encode(teacher.module, x, at.content_box))
        return self._finish(box, out)

    def head(self, name):
        teacher = self.teacher(_HEAD_ROLE[name])
        return teacher.spec.heads(teacher.module)[name]

    @property
    def tokenizer(self):
        teacher = self.teacher("clip")
        if teacher.tokenizer is None:
            raise MissingTeacherError(f"the CLIP teacher of '{teacher.model}' has no tokenizer vocabulary")
        return teacher.tokenizer


def teachers_of(bundle: Bundle) -> dict[str, Teacher]:
    """The teachers a loaded ``teachers`` bundle holds, by role."""
    label = f"{bundle.name} {bundle.version}".rstrip()
    return {role: Teacher(spec, bundle.modules[role], label, bundle.tokenizer if role == "clip" else None)
            for role, spec in bundle.teachers.items()}


def create_backend(bundle: Bundle, device: str = "cpu", **kw) -> FeatureBackend:
    """The backend a bundle provides: 'prismrt' bundles give the student, 'teachers' bundles their teachers."""
    if bundle.kind == "prismrt":
        return StudentBackend(bundle, device, **kw)
    return TeacherBackend.from_bundle(bundle, device, **kw)


