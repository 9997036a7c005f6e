"""DINOv3-like stand-in teacher: timm's DINOv3 ViT (registers, RoPE), scaled down, self-supervised on OpenKBP CT.

Method (``SSLConfig.objective``; default ``"contrastive"``, the shipped run): an EMA teacher, iBOT-style masking,
and a dense objective between two views whose geometric correspondence is known exactly. Not masked image
modelling: the features are used for *matching* (registration looks for the same anatomy in another patient or
time point), so a patch's feature must say *which anatomy it is*, invariantly to contrast, noise and small geometric
changes; pixel regression keeps intensity detail and is known to be weak for nearest-neighbour retrieval.

- ``"contrastive"`` (dense InfoNCE, as self-supervised anatomical embeddings, Yan et al., IEEE TMI 2022, and
  PixPro/VADeR): each body patch of one view must pick the EMA teacher's key at the same anatomy in the other view
  among the keys of every other body patch of that slice (keys within ``nce_exclusion`` patches of the true point
  are neither positive nor negative). Negatives come only from the same slice, so the same anatomy in another
  patient is never pushed away. Masked patches must find their key from context alone. CLS: cosine regression.
- ``"regression"`` (BYOL/data2vec-style self-distillation): the student's predictor regresses the EMA teacher's
  centred tokens with a cosine loss (CLS across views; masked patches against the teacher's unmasked view; visible
  patches against the other view at the corresponding point). Measured: learns within-slice invariance but its
  features matched structures across patients no better than random initialisation (REPORT.md history).
- ``"dino"`` (DINO + iBOT proper): prototype heads, cross-entropy to Sinkhorn-Knopp-centred, sharpened teacher
  targets. Kept because it is the real recipe; measured here it does not learn at this budget: with batches of 16
  slices whose body covers a few dozen patches, the student settled on a uniform output (cross-entropy = log K for
  K = 8 to 256 prototypes, 80-150 steps, also with weaker augmentation).

Views: a slice (axial twice as often as coronal or sagittal; structure-biased sampling from
:class:`training.data.SliceSampler`) gets one random zoom/rotation about the body shared by both views plus a small
per-view jitter (scale, rotation, shift), and each view its own CT window, gamma and noise
(:func:`training.data.augment_window`). Both affines are known, so every patch of view u has an exact corresponding
point in view v. Views are 64 px crops around the body of the 128 px frame (the body covers a tenth of the frame;
crops cut the cost fourfold), and each crop's tokens get the RoPE rows of *their place in the frame*
(:func:`window_rope`): DINOv3 normalises RoPE coordinates by the grid size, so a crop encoded on its own would see
its tokens twice as far apart as inference on the whole slice does. 10-50% of the body patches of half the views
are replaced by a learned mask token. Only body patches count in the losses (air is trivial and would dominate).

Schedule: AdamW with warm-up and cosine decay, gradient clipping, EMA momentum 0.99 -> 1 (cosine), layer scale
started at 0.1 (timm's 1e-5 is meant for long schedules). Resumable bit for bit: batches and augmentations are
counter-based (sample n depends only on the seed and n) and the checkpoint holds student, teacher, heads, optimiser
and centres. The exported weights are the EMA teacher's backbone (as DINO evaluates), a plain timm state dict that
loads strictly into ``build_dinov3(DINOV3_PRESETS["standin"])`` (patch 4 at 128 px: a 32 x 32 dense grid).

Evaluation (:func:`evaluate`): cross-patient nearest-neighbour matching on corresponding axial slices of validation
patients, scored by whether the match lands on the same structure; raw intensity patches and MIND-SSC
(:func:`mind_ssc`) are compared on exactly the same queries and candidates.

Commands (from the repository root)::

    python -m training.standins.dinov3 train --out training/runs/dinov3 --steps 2000 --eval   # the shipped run
    python -m training.standins.dinov3 evaluate --out training/runs/dinov3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from PRISMRTLib.imaging import Letterbox, SlicePlane
from PRISMRTLib.imaging.intensity import Window
from PRISMRTLib.models.dinov3 import DINOV3_PRESETS, DinoV3Config, build_dinov3, dinov3_features, dinov3_input
from training.data import AIR_HU, STRUCTURES, CTCase, SliceSampler, augment_window, cut_slice, load_cases
from training.data import REPO, TRAIN_DIR, VAL_DIR
from training.standins.runfiles import open_curves, save_atomic, save_curves


WEIGHTS_FILE = "dinov3_standin.safetensors"
CONFIG_FILE = "dinov3_standin.json"
LOG_FILE = "loss_log.json"
CHECKPOINT_FILE = "checkpoint.pt"
INPUT_WINDOW = Window(60, 350)  # head-and-neck window: the base of the training augmentation and the eval input
BODY_HU = -500.0


# ----------------------------------------------------------------------------------------------------------------
# Self-supervised training
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSLConfig:
    """Hyper-parameters of the self-distillation (defaults are the ones the reported run used)."""

    objective: str = "contrastive"  # "contrastive" (dense InfoNCE), "regression" (cosine to teacher tokens) or "dino"
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_frac: float = 0.08
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    momentum: tuple[float, float] = (0.99, 1.0)  # EMA teacher, cosine from first to second
    # "dino" objective only: temperatures, centering, prototypes
    teacher_temp: tuple[float, float] = (0.04, 0.04)  # linear warm-up over teacher_temp_warmup_frac of the run
    teacher_temp_warmup_frac: float = 0.3
    student_temp: float = 0.1
    centering: str = "sinkhorn"  # "sinkhorn" (Sinkhorn-Knopp, DINOv2/v3) or "ema" (DINO's running centre)
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9  # EMA of the teacher's mean (regression targets; "ema" centering)
    cls_prototypes: int = 32
    patch_prototypes: int = 32
    head_hidden: int = 256
    head_bottleneck: int = 64
    mask_prob: float = 0.5  # fraction of views whose body patches are partly masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    masked_target: str = "same"  # masked patches predict the teacher's "same" view (iBOT) or the "cross" view
    masked_weight: float = 1.0
    visible_weight: float = 1.0
    koleo_weight: float = 0.0  # KoLeo on the student CLS (DINOv2); off: at initialisation all CLS tokens coincide
    freeze_prototypes_frac: float = 0.03
    layerscale_init: float = 0.1
    # "contrastive" objective only: dense InfoNCE between corresponding points of the two views
    nce_temp: float = 0.2
    nce_exclusion: float = 2.0  # patches: keys this close to the corresponding point are neither positive nor negative
    proj_dim: int = 128
    crop: int | None = 64  # views are crops of this many pixels around the body (None: the whole 128 px frame)
    crop_jitter: float = 6.0  # px (std) of each crop's offset from the body's centre
    zoom: tuple[float, float] = (0.85, 1.3)  # shared by both views (zoom in = content larger)
    rotate_deg: float = 8.0  # shared rotation (std)
    jitter_scale: float = 0.05  # per-view (std of log scale)
    jitter_deg: float = 3.0  # per-view rotation (std)
    jitter_shift: float = 0.05  # per-view shift (std, normalised coordinates: 0.05 = 3.2 px at 128)
    window_strength: float = 1.0
    orientations: tuple[str, ...] = ("axial", "axial", "coronal", "sagittal")
    checkpoint_every: int = 50

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


class ProjectionHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> cosine against L2-normalised prototypes (weight norm, g = 1)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class Predictor(nn.Module):
    """BYOL/data2vec predictor: an MLP from student tokens to the teacher's token space."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SSLModel(nn.Module):
    """Backbone (the exported timm model) + training-only parts: the iBOT mask token and the objective's heads
    (prototype heads for "dino", predictors for "regression")."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig):
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        if cfg.objective == "dino":
            self.cls_head = ProjectionHead(dim, cfg.head_hidden, cfg.head_bottleneck, cfg.cls_prototypes)
            self.patch_head = ProjectionHead(dim, cfg.head_hidden, cfg.head_bottleneck, cfg.patch_prototypes)
        elif cfg.objective == "regression":
            self.cls_head = Predictor(dim, cfg.head_hidden)
            self.patch_head = Predictor(dim, cfg.head_hidden)
        elif cfg.objective == "contrastive":
            self.cls_head = Predictor(dim, cfg.head_hidden)
            self.patch_head = Predictor(dim, cfg.head_hidden, cfg.proj_dim)
        else:
            raise ValueError(f"unknown objective '{cfg.objective}': use 'contrastive', 'regression' or 'dino'")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))


def window_rope(model: nn.Module, windows: torch.Tensor, shape: tuple[int, int], frame: tuple[int, int]):
    """RoPE of crops placed in a full frame: (B, 1, h * w, dim), the rows of the frame's table under each crop.

    ``windows`` (B, 2): each crop's top-left token (row, col) in a frame of ``frame`` tokens. DINOv3 normalises RoPE
    coordinates by the grid size, so a crop encoded on its own would see its tokens further apart than the same
    tokens at inference on the whole slice; taking the frame's rows keeps training and inference consistent.
    """
    table = model.rope.get_embed(shape=frame)  # (H * W, dim)
    h, w = shape
    rows = windows[:, :1, None] + torch.arange(h)[None, :, None]  # (B, h, 1)
    cols = windows[:, 1:, None] + torch.arange(w)[None, None, :]  # (B, 1, w)
    return table[(rows * frame[1] + cols).reshape(len(windows), -1)][:, None]


def encode(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None, windows: torch.Tensor | None = None,
           frame: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm DINOv3 forward with optional iBOT masking: CLS (B, D) and patch tokens (B, N, D), N = h * w row-major.

    Without a mask this is exactly ``model.forward_features`` (tested); ``mask`` (B, h, w) bool replaces those patch
    embeddings by ``mask_token`` before the registers, RoPE and blocks. ``windows``/``frame``: the inputs are crops
    of a larger frame (see :func:`window_rope`).
    """
    if getattr(model, "rope_mixed", False):
        raise NotImplementedError("mixed-mode RoPE models are not supported")
    t = model.patch_embed(x)
    if mask is not None:
        m = mask.reshape(t.shape[:-1]) if t.ndim == 4 else mask.reshape(t.shape[0], -1)
        t = torch.where(m[..., None], mask_token.to(t.dtype).reshape(1, *([1] * (t.ndim - 2)), -1), t)
    shape = tuple(t.shape[1:3]) if t.ndim == 4 else tuple(model.patch_embed.grid_size)
    t, rope = model._pos_embed(t)
    if windows is not None:
        rope = window_rope(model, windows, shape, frame)
    t = model.norm_pre(t)
    for blk in model.blocks:
        t = blk(t, rope=rope)
    t = model.norm(t)
    return t[:, 0], t[:, model.num_prefix_tokens:]


def _rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def patch_centres(grid: int) -> np.ndarray:
    """(grid, grid, 2) patch centres in normalised (x, y) coordinates (align_corners=False convention)."""
    c = (np.arange(grid) + 0.5) / grid * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.stack([xx, yy], -1)


def make_views(hu: np.ndarray, rng: np.random.Generator, cfg: SSLConfig, patch: int):
    """Two augmented views of one HU slice, their patch-level body masks and cross-view patch correspondences.

    Each view is a full frame (the slice's size) under its own affine, cropped to ``cfg.crop`` pixels around the body
    (aligned to the patch grid; no crop when ``cfg.crop`` is None). Returns ``images`` (2, C, C) in [0, 1];
    ``body`` (2, g, g) bool; ``grids`` (2, g, g, 2): for each patch of view u the normalised (x, y) point of the same
    anatomy in view 1 - u's crop; ``valid`` (2, g, g) whether that point is inside it; ``windows`` (2, 2) each crop's
    top-left token in the frame. Affines map a frame's normalised coordinates to the slice's: ``p = A q + t``.
    """
    size = hu.shape[-1]
    crop = int(cfg.crop or size)
    if crop % patch or crop > size:
        raise ValueError(f"crop {crop} must be a multiple of the patch size {patch} and at most {size}")
    grid = crop // patch
    fg = hu > BODY_HU
    if fg.any():
        ys, xs = np.nonzero(fg)
        centre = np.array([(xs.mean() + 0.5) / size * 2 - 1, (ys.mean() + 0.5) / size * 2 - 1])
    else:
        centre = np.zeros(2)
    zoom = math.exp(rng.uniform(math.log(cfg.zoom[0]), math.log(cfg.zoom[1])))
    a0 = _rotation(rng.normal(0, cfg.rotate_deg)) / zoom
    t0 = centre - a0 @ centre  # zoom and rotate about the body's centre
    affines = []
    for _ in range(2):
        a = a0 @ _rotation(rng.normal(0, cfg.jitter_deg)) * math.exp(rng.normal(0, cfg.jitter_scale))
        t = t0 + rng.normal(0, cfg.jitter_shift, 2)
        affines.append((a, t))
    theta = torch.tensor(np.stack([np.concatenate([a, t[:, None]], 1) for a, t in affines]), dtype=torch.float32)
    src = torch.from_numpy(hu.astype(np.float32) - AIR_HU)[None, None].expand(2, 1, size, size)
    sampling = F.affine_grid(theta, (2, 1, size, size), align_corners=False)
    warped = (F.grid_sample(src, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
              + AIR_HU).numpy()
    # crop windows around the body, on the patch grid of the frame
    corners = []
    for u in range(2):
        body_u = warped[u] > BODY_HU
        cy, cx = (np.array(np.nonzero(body_u)).mean(1) if body_u.any() else np.array([size / 2, size / 2]))
        jitter = rng.normal(0, cfg.crop_jitter, 2)
        r0 = int(np.clip(round((cy - crop / 2 + jitter[0]) / patch), 0, (size - crop) // patch)) * patch
        c0 = int(np.clip(round((cx - crop / 2 + jitter[1]) / patch), 0, (size - crop) // patch)) * patch
        corners.append((r0, c0))
    views = np.stack([warped[u, r0:r0 + crop, c0:c0 + crop] for u, (r0, c0) in enumerate(corners)])
    images = np.stack([augment_window(w, rng, INPUT_WINDOW, cfg.window_strength) for w in views])
    body = F.avg_pool2d(torch.from_numpy((views > BODY_HU).astype(np.float32))[:, None], patch)[:, 0].numpy() > 1 / 16
    ii, jj = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    grids, valid = [], []
    for u in range(2):
        (au, tu), (av, tv) = affines[u], affines[1 - u]
        (ru, cu), (rv, cv) = corners[u], corners[1 - u]
        # patch centres of u's crop -> u's frame (normalised) -> slice -> v's frame -> v's crop (normalised)
        frame_u = np.stack([(cu + (jj + 0.5) * patch) / size * 2 - 1, (ru + (ii + 0.5) * patch) / size * 2 - 1], -1)
        in_slice = frame_u.reshape(-1, 2) @ au.T + tu
        frame_v = (in_slice - tv) @ np.linalg.inv(av).T
        pix_v = (frame_v + 1) / 2 * size - np.array([cv, rv])
        crop_v = pix_v / crop * 2 - 1
        grids.append(crop_v.reshape(grid, grid, 2))
        valid.append((np.abs(crop_v) < 1).all(-1).reshape(grid, grid))
    windows = np.array([[r0 // patch, c0 // patch] for r0, c0 in corners])
    return (images.astype(np.float32), body, np.stack(grids).astype(np.float32), np.stack(valid), windows)


def random_mask(body: np.ndarray, rng: np.random.Generator, cfg: SSLConfig) -> np.ndarray:
    """(g, g) bool: with probability mask_prob, a random 10-50% of the body patches."""
    mask = np.zeros(body.shape, bool)
    if rng.random() < cfg.mask_prob:
        idx = np.flatnonzero(body)
        n = int(round(rng.uniform(*cfg.mask_ratio) * len(idx)))
        if n:
            mask.flat[rng.choice(idx, n, replace=False)] = True
    return mask


def make_batch(sampler: SliceSampler, step: int, batch_size: int, seed: int, cfg: SSLConfig, patch: int) -> dict:
    """Batch ``step``: tensors with views stacked view-major, (2 * B, ...) = [view 0 of all samples, view 1 of all]."""
    images, body, grids, valid, masks, windows = [], [], [], [], [], []
    for i, sample in enumerate(sampler.batch(step, batch_size)):
        rng = np.random.default_rng([seed, step, i, 0x1D0])
        im, b, g, v, w = make_views(sample.hu, rng, cfg, patch)
        images.append(im), body.append(b), grids.append(g), valid.append(v), windows.append(w)
        masks.append(np.stack([random_mask(b[u], rng, cfg) for u in range(2)]))

    def view_major(arrays):
        return torch.from_numpy(np.stack(arrays).swapaxes(0, 1).reshape(-1, *arrays[0].shape[1:]).copy())

    frame = sampler.size // patch
    return {"images": view_major(images), "body": view_major(body), "grids": view_major(grids),
            "valid": view_major(valid), "masks": view_major(masks), "windows": view_major(windows).long(),
            "frame": (frame, frame)}


def _schedule(step: int, steps: int, cfg: SSLConfig) -> dict:
    warm = max(1, int(round(cfg.warmup_frac * steps)))
    if step < warm:
        lr = cfg.lr * (step + 1) / warm
    else:
        progress = (step - warm) / max(1, steps - warm)
        lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    progress = step / max(1, steps - 1)
    momentum = cfg.momentum[1] - 0.5 * (cfg.momentum[1] - cfg.momentum[0]) * (1 + math.cos(math.pi * progress))
    tw = max(1, int(round(cfg.teacher_temp_warmup_frac * steps)))
    temp = cfg.teacher_temp[0] + (cfg.teacher_temp[1] - cfg.teacher_temp[0]) * min(1.0, step / tw)
    return {"lr": lr, "momentum": momentum, "teacher_temp": temp}


def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) with balanced prototype use: Sinkhorn-Knopp centering, as DINOv2/DINOv3 do."""
    q = torch.exp((logits - logits.max()) / temp).T.double()  # (K, N)
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True).clamp_min(1e-30)
        q /= k
        q /= q.sum(0, keepdim=True).clamp_min(1e-30)
        q /= n
    return (q * n).T.float()


def _teacher_targets(logits: torch.Tensor, center: torch.Tensor, temp: float, cfg: SSLConfig) -> torch.Tensor:
    if cfg.centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp, cfg.sinkhorn_iterations)
    if cfg.centering == "ema":
        return F.softmax((logits - center) / temp, -1)
    raise ValueError(f"unknown centering '{cfg.centering}': use 'sinkhorn' or 'ema'")


def _koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (DINOv2): spreads the normalised CLS features of a batch."""
    x = F.normalize(x, dim=-1)
    dist = torch.cdist(x, x)
    dist = dist + torch.eye(len(x), dtype=x.dtype) * 1e3
    return -torch.log(dist.min(dim=1).values + eps).mean()


def _cross_view(maps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch values of the *other* view at each patch's corresponding point: maps (2B, C, g, g) -> (2B, N, C),
    and the fraction of body under that point (2B, N)."""
    b = maps.shape[0] // 2
    other = torch.cat([maps[b:], maps[:b]])
    body_other = torch.cat([batch["body"][b:], batch["body"][:b]]).float()[:, None]
    values = F.grid_sample(other, batch["grids"], mode="bilinear", align_corners=False)
    body = F.grid_sample(body_other, batch["grids"], mode="bilinear", align_corners=False)[:, 0]
    return values.flatten(2).transpose(1, 2), body.flatten(1)


def ssl_losses(student: SSLModel, teacher: SSLModel, batch: dict, centers: dict, sched: dict, cfg: SSLConfig) -> dict:
    """All loss terms of one step (the total under "loss"); updates ``centers`` in place from the teacher.

    Terms: ``cls`` (CLS of view u against the teacher's CLS of view v), ``patch_masked`` (masked patches against the
    teacher's same view, iBOT/data2vec), ``patch_visible`` (visible patches against the teacher's other view at the
    corresponding point: dense invariance). Only body patches count.
    """
    x = dinov3_input(batch["images"])
    n2 = x.shape[0]
    b = n2 // 2
    body = batch["body"].reshape(n2, -1)
    masked = batch["masks"].reshape(n2, -1)
    with torch.no_grad():
        t_cls, t_patch = encode(teacher.backbone, x, windows=batch["windows"], frame=batch["frame"])
    s_cls, s_patch = encode(student.backbone, x, batch["masks"], student.mask_token, batch["windows"], batch["frame"])
    zero = s_cls.sum() * 0
    if cfg.objective == "dino":
        terms, diag = _dino_terms(student, teacher, t_cls, t_patch, s_cls, s_patch, batch, centers, sched, cfg)
    elif cfg.objective == "contrastive":
        terms, diag = _contrastive_terms(student, teacher, t_cls, t_patch, s_cls, s_patch, batch, centers, cfg)
    else:
        terms, diag = _regression_terms(student, t_cls, t_patch, s_cls, s_patch, batch, centers, cfg)
    koleo = 0.5 * (_koleo(s_cls[:b]) + _koleo(s_cls[b:])) if (b > 1 and cfg.koleo_weight) else zero
    loss = (terms["cls"] + cfg.masked_weight * terms["patch_masked"] + cfg.visible_weight * terms["patch_visible"]
            + cfg.koleo_weight * koleo)
    with torch.no_grad():  # collapse watch: mean cosine between the teacher's body tokens (1 = all the same)
        tb = F.normalize(t_patch[body], dim=-1)
        token_cos = float((tb.mean(0) ** 2).sum() * len(tb) / max(len(tb) - 1, 1) - 1 / max(len(tb) - 1, 1)) \
            if len(tb) > 1 else 1.0
    out = {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "koleo": koleo.detach(),
           "teacher_token_cos": token_cos, "patches": int(body.sum()), "masked_patches": int((masked & body).sum())}
    out.update(diag)
    return out


def _regression_terms(student, t_cls, t_patch, s_cls, s_patch, batch, centers, cfg):
    """BYOL/data2vec-style: the student's predictor regresses the teacher's centred tokens (cosine loss)."""
    n2, b = t_cls.shape[0], t_cls.shape[0] // 2
    g = batch["body"].shape[-1]
    body = batch["body"].reshape(n2, -1)
    masked = batch["masks"].reshape(n2, -1)
    with torch.no_grad():
        # centring (an EMA of the teacher's mean body token) keeps a collapsed, constant target from being fit
        mean_patch = t_patch[body].mean(0, keepdim=True) if body.any() else centers["patch"]
        mean_cls = t_cls.mean(0, keepdim=True)
        tp = t_patch - centers["patch"]
        tc = t_cls - centers["cls"]
        cross, other_body = _cross_view(tp.transpose(1, 2).reshape(n2, -1, g, g), batch)
        use = body & batch["valid"].reshape(n2, -1) & (other_body > 0.5)
        cm = cfg.center_momentum
        centers["patch"].mul_(cm).add_(mean_patch, alpha=1 - cm)
        centers["cls"].mul_(cm).add_(mean_cls, alpha=1 - cm)

    def cos_loss(pred, target):
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean() if len(pred) else pred.sum() * 0

    cls = cos_loss(student.cls_head(s_cls), torch.cat([tc[b:], tc[:b]]))
    sel_m = body & masked
    sel_v = use & ~masked
    pred = student.patch_head(s_patch[sel_m | sel_v])
    is_m = sel_m[sel_m | sel_v]
    patch_masked = cos_loss(pred[is_m], tp[sel_m])
    patch_visible = cos_loss(pred[~is_m], cross[sel_v])
    return {"cls": cls, "patch_masked": patch_masked, "patch_visible": patch_visible}, {}


def _contrastive_terms(student, teacher, t_cls, t_patch, s_cls, s_patch, batch, centers, cfg):
    """Dense contrastive (InfoNCE) with known correspondences, as in self-supervised anatomical embeddings (Yan et
    al., SAM, IEEE TMI 2022) and PixPro/VADeR: each body patch of view u (query: student, projected) must pick the
    EMA teacher's key at the *same anatomy* in view v among the keys of every other body patch of v of the same
    slice (negatives; keys within ``nce_exclusion`` patches of the true point are left out). Only the same slice
    gives negatives: the same anatomy in another patient must stay close, since that is what matching looks for.
    Masked queries (iBOT masking) must find their key from context alone. CLS: cosine regression as "regression"."""
    n2, b = t_cls.shape[0], t_cls.shape[0] // 2
    g = batch["body"].shape[-1]
    body = batch["body"].reshape(n2, -1)
    masked = batch["masks"].reshape(n2, -1)
    with torch.no_grad():
        tc = t_cls - centers["cls"]
        centers["cls"].mul_(cfg.center_momentum).add_(t_cls.mean(0, keepdim=True), alpha=1 - cfg.center_momentum)
        keys = F.normalize(teacher.patch_head(t_patch), dim=-1)  # (2B, N, P)
        positive, other_body = _cross_view(keys.transpose(1, 2).reshape(n2, -1, g, g), batch)
        positive = F.normalize(positive, dim=-1)
        keys_other = torch.cat([keys[b:], keys[:b]])
        body_other = torch.cat([body[b:], body[:b]])
        centres = torch.from_numpy(patch_centres(g).reshape(-1, 2)).float()  # key positions in the other crop
        near = torch.cdist(batch["grids"].reshape(n2, -1, 2), centres[None].expand(n2, -1, -1)) \
            < cfg.nce_exclusion * 2 / g
        negative_ok = body_other[:, None, :] & ~near  # (2B, N queries, N keys)
        use = body & batch["valid"].reshape(n2, -1) & (other_body > 0.5)
    cls = (1 - F.cosine_similarity(student.cls_head(s_cls), torch.cat([tc[b:], tc[:b]]), dim=-1)).mean()
    q = F.normalize(student.patch_head(s_patch), dim=-1)
    pos = (q * positive).sum(-1, keepdim=True) / cfg.nce_temp  # (2B, N, 1)
    neg = torch.einsum("bnp,bmp->bnm", q, keys_other) / cfg.nce_temp
    neg = neg.masked_fill(~negative_ok, float("-inf"))
    nce = torch.logsumexp(torch.cat([pos, neg], -1), -1) - pos[..., 0]  # (2B, N)
    zero = s_cls.sum() * 0
    sel_m, sel_v = use & masked, use & ~masked
    with torch.no_grad():
        top1 = float((pos[..., 0] > neg.max(-1).values)[use].float().mean()) if use.any() else float("nan")
    return ({"cls": cls, "patch_masked": nce[sel_m].mean() if sel_m.any() else zero,
             "patch_visible": nce[sel_v].mean() if sel_v.any() else zero},
            {"nce_top1": top1, "negatives_per_query": float(negative_ok[use].sum(-1).float().mean()) if use.any()
             else 0.0})


def _dino_terms(student, teacher, t_cls, t_patch, s_cls, s_patch, batch, centers, sched, cfg):
    """DINO/iBOT-style: prototype heads, teacher targets centred (Sinkhorn-Knopp or EMA) and sharpened."""
    n2, b = t_cls.shape[0], t_cls.shape[0] // 2
    g = batch["body"].shape[-1]
    body = batch["body"].reshape(n2, -1)
    masked = batch["masks"].reshape(n2, -1)
    with torch.no_grad():
        t_cls_logits = teacher.cls_head(t_cls)
        t_patch_logits = teacher.patch_head(t_patch)  # (2B, N, K)
        t_cls_p = _teacher_targets(t_cls_logits, centers["cls"], sched["teacher_temp"], cfg)
        t_patch_p = torch.zeros_like(t_patch_logits)
        if body.any():
            t_patch_p[body] = _teacher_targets(t_patch_logits[body], centers["patch"], sched["teacher_temp"], cfg)
        cross, other_body = _cross_view(t_patch_p.transpose(1, 2).reshape(n2, -1, g, g), batch)
        cross = cross / cross.sum(-1, keepdim=True).clamp_min(1e-12)  # air neighbours carry no mass
        use = body & batch["valid"].reshape(n2, -1) & (other_body > 0.5)
        cm = cfg.center_momentum
        centers["cls"].mul_(cm).add_(t_cls_logits.mean(0, keepdim=True), alpha=1 - cm)
        if body.any():
            centers["patch"].mul_(cm).add_(t_patch_logits[body].mean(0, keepdim=True), alpha=1 - cm)
        entropy = -(t_patch_p[body] * torch.log(t_patch_p[body] + 1e-12)).sum(-1).mean() if body.any() else 0.0
    s_cls_logp = F.log_softmax(student.cls_head(s_cls) / cfg.student_temp, -1)
    cls = -(torch.cat([t_cls_p[b:], t_cls_p[:b]]) * s_cls_logp).sum(-1).mean()
    sel_m = body & masked
    sel_v = use & ~masked
    logp = F.log_softmax(student.patch_head(s_patch[sel_m | sel_v]) / cfg.student_temp, -1)
    is_m = sel_m[sel_m | sel_v]
    zero = s_cls.sum() * 0
    patch_masked = -(t_patch_p[sel_m] * logp[is_m]).sum(-1).mean() if is_m.any() else zero
    patch_visible = -(cross[sel_v] * logp[~is_m]).sum(-1).mean() if (~is_m).any() else zero
    return ({"cls": cls, "patch_masked": patch_masked, "patch_visible": patch_visible},
            {"teacher_patch_entropy": float(entropy)})


def _param_groups(model: SSLModel, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("token", "gamma_1", "gamma_2")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _run_signature(model_config: DinoV3Config, cfg: SSLConfig, seed: int, steps: int, batch_size: int) -> dict:
    return {"model": model_config.to_dict(), "ssl": cfg.to_dict(), "seed": seed, "steps": steps,
            "batch_size": batch_size}



def train(out_dir: "str | Path", steps: int, seed: int = 0, batch_size: int = 16, threads: int = 1,
          resume: bool = True, *, cases: list[CTCase] | None = None, train_dir: "str | Path | None" = None,
          model_config: DinoV3Config | None = None, ssl: SSLConfig | None = None, stop_at: int | None = None,
          max_seconds: float | None = None, log_every: int = 10, verbose: bool = True) -> Path | None:
    """Self-supervised training; returns the exported weights' path (None when stopped at ``stop_at``).

    ``out_dir`` gets ``checkpoint.pt`` (every ``ssl.checkpoint_every`` steps and at the end; a later call with
    ``resume=True`` continues from it, bit for bit), ``loss_log.json`` and finally ``dinov3_standin.safetensors`` +
    ``dinov3_standin.json``. ``stop_at`` stops after that many steps with a checkpoint (an interruption on
    purpose); ``max_seconds`` stops early on wall time, checkpoints and exports what it has.
    """
    cfg = ssl or SSLConfig()
    model_config = model_config or DINOV3_PRESETS["standin"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(threads))
    if cases is None:
        cases = load_cases(train_dir or TRAIN_DIR)
    sampler = SliceSampler(cases, seed=seed, size=model_config.img_size, orientations=cfg.orientations)
    signature = _run_signature(model_config, cfg, seed, steps, batch_size)

    torch.manual_seed(seed)
    backbone = build_dinov3(model_config)
    for blk in backbone.blocks:
        for name in ("gamma_1", "gamma_2"):
            if isinstance(getattr(blk, name, None), torch.Tensor):
                getattr(blk, name).data.fill_(cfg.layerscale_init)
    student = SSLModel(backbone, cfg).train()
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    width = {"dino": (cfg.cls_prototypes, cfg.patch_prototypes)}.get(cfg.objective, (backbone.embed_dim,) * 2)
    centers = {"cls": torch.zeros(1, width[0]), "patch": torch.zeros(1, width[1])}
    log: list[dict] = []
    start = 0
    ckpt_path = out / CHECKPOINT_FILE
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["signature"] != signature:
            raise ValueError(
                f"{ckpt_path} belongs to a different run (settings differ); use another out_dir or resume=False"
            )
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        centers = state["centers"]
        start = int(state["step"])
        log = json.loads(state["log"])
        if verbose:
            print(f"[dinov3] resumed at step {start}/{steps}", flush=True)

    patch = backbone.patch_embed.patch_size[0]
    freeze = int(round(cfg.freeze_prototypes_frac * steps))
    t0 = time.time()

    def save(step: int) -> None:
        save_atomic({"signature": signature, "student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "centers": centers, "step": step,
                     "log": json.dumps(log)}, ckpt_path, torch.save)
        (out / LOG_FILE).write_text(json.dumps({"signature": signature, "log": log}, indent=1))

    step = start
    stopped_early = False
    while step < steps:
        if stop_at is not None and step >= stop_at:
            save(step)
            return None
        if max_seconds is not None and time.time() - t0 > max_seconds:
            stopped_early = True
            break
        ts = time.time()
        torch.manual_seed(seed * 1_000_003 + step)  # nothing random in the forward today; keeps it so if that changes
        batch = make_batch(sampler, step, batch_size, seed, cfg, patch)
        t_data = time.time() - ts
        sched = _schedule(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = sched["lr"]
        losses = ssl_losses(student, teacher, batch, centers, sched, cfg)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if step < freeze and cfg.objective == "dino":
            student.cls_head.prototypes.grad = None
            student.patch_head.prototypes.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        optimizer.step()
        with torch.no_grad():
            m = sched["momentum"]
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        entry = {k: (float(v.detach()) if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}
        entry.update(step=step + 1, grad_norm=float(grad_norm), seconds=time.time() - ts, data_seconds=t_data, **sched)
        log.append(entry)
        step += 1
        if verbose and (step % log_every == 0 or step == steps):
            print(f"[dinov3] step {step}/{steps} loss {entry['loss']:.3f} cls {entry['cls']:.3f} "
                  f"masked {entry['patch_masked']:.3f} visible {entry['patch_visible']:.3f} "
                  f"teacher token cos {entry['teacher_token_cos']:.3f} "
                  + (f"nce top1 {entry['nce_top1']:.2f} " if "nce_top1" in entry else "") +
                  f"lr {sched['lr']:.2e} {entry['seconds']:.2f} s/step", flush=True)
        if step % cfg.checkpoint_every == 0 and step < steps:
            save(step)
    save(step)
    return export(teacher.backbone, out, model_config, {
        "steps_done": step, "steps": steps, "seed": seed, "batch_size": batch_size, "stopped_early": stopped_early,
        "method": METHODS[cfg.objective],
        "data": "OpenKBP head-and-neck CT (train-pats), letterboxed 128 px slices",
    })


METHODS = {
    "contrastive": "dense contrastive learning between corresponding points of two views (InfoNCE, EMA keys, "
                   "iBOT masking); EMA teacher backbone",
    "regression": "self-distillation by cosine regression of an EMA teacher's tokens (iBOT masking); EMA teacher backbone",
    "dino": "DINO + iBOT self-distillation (EMA teacher backbone)",
}


def export(backbone: nn.Module, out_dir: "str | Path", model_config: DinoV3Config, info: dict | None = None) -> Path:
    """The timm model's state dict as safetensors + a JSON with its DinoV3Config and how it was trained."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    path = out / WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt", "config": json.dumps(model_config.to_dict())})
    (out / CONFIG_FILE).write_text(json.dumps({
        "config": model_config.to_dict(),
        "note": ("stand-in DINOv3-like teacher trained self-supervised on OpenKBP head-and-neck CTs; "
                 "not for clinical use"),
        "training": info or {},
    }, indent=1))
    return path


def load_trained(out_dir: "str | Path", config: DinoV3Config | None = None) -> nn.Module:
    """The exported model, loaded strictly into ``build_dinov3`` (config from the run's JSON, else the preset)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    if config is None:
        cfg_path = out / CONFIG_FILE
        config = (DinoV3Config.from_dict(json.loads(cfg_path.read_text())["config"]) if cfg_path.exists()
                  else DINOV3_PRESETS["standin"])
    model = build_dinov3(config)
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# MIND-SSC (Heinrich et al., MICCAI 2013: "Towards realtime multimodal fusion for image-guided interventions using
# self-similarities"; MIND: Heinrich et al., Medical Image Analysis 2012)
# ----------------------------------------------------------------------------------------------------------------

SIX_NEIGHBOURHOOD = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]]) - 1
# the 12 self-similarity pairs: neighbours at squared distance 2 (i.e. all pairs except the 3 opposite ones)
SSC_PAIRS = [(a, b) for a in range(6) for b in range(a + 1, 6)
             if int(((SIX_NEIGHBOURHOOD[a] - SIX_NEIGHBOURHOOD[b]) ** 2).sum()) == 2]


def mind_ssc(volume, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> np.ndarray:
    """MIND-SSC of a 3D array (k, j, i) -> (12, k, j, i) float32 in (0, 1], max 1 over the channels at each voxel.

    For each pair (a, b) of the 6-neighbourhood at squared distance 2 (offsets scaled by ``dilation``): the patch
    distance D_ab(x) = box mean over (2 radius + 1)^3 of (I(x + d a) - I(x + d b))^2. Then
    MIND = exp(-(D - min_ab D) / V) with V = mean_ab (D - min D), clamped to [1e-3, 1e3] times its volume mean.
    Invariant to intensity offset and scale; edges of equal geometry give equal descriptors whatever their contrast.
    """
    img = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    if img.ndim != 3:
        raise ValueError(f"MIND-SSC needs a 3D array (k, j, i), got shape {tuple(img.shape)}")
    d = int(dilation)
    padded = F.pad(img[None, None], (d,) * 6, mode="replicate")[0, 0]
    k, j, i = img.shape

    def shifted(offset):
        o = (np.asarray(offset) * d + d).tolist()
        return padded[o[0]:o[0] + k, o[1]:o[1] + j, o[2]:o[2] + i]

    diffs = torch.stack([(shifted(SIX_NEIGHBOURHOOD[a]) - shifted(SIX_NEIGHBOURHOOD[b])) ** 2 for a, b in SSC_PAIRS])
    r = int(radius)
    if r > 0:
        diffs = F.avg_pool3d(F.pad(diffs[None], (r,) * 6, mode="replicate"), 2 * r + 1, stride=1)[0]
    mind = diffs - diffs.min(0, keepdim=True).values
    var = mind.mean(0, keepdim=True)
    mean_var = float(var.mean())
    var = torch.clamp(var, max(mean_var * 1e-3, eps), max(mean_var * 1e3, eps))
    return torch.exp(-mind / var).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: cross-patient nearest-neighbour matching of dense descriptors
# ----------------------------------------------------------------------------------------------------------------

ANCHORS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Pixels inside the body: HU above -500 plus the holes (airway) not connected to the image border."""
    fg = hu > BODY_HU
    outside = np.zeros_like(fg)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~fg[0, :], ~fg[-1, :], ~fg[:, 0], ~fg[:, -1]
    while True:  # flood fill of the air reachable from the border
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~fg
        if (grown == outside).all():
            return ~outside
        outside = grown


def central_slices(case: CTCase, anchors=ANCHORS) -> dict[str, int]:
    """Axial index of the central slice of each anchor structure present in the case."""
    plane = SlicePlane.create(case.geometry, "axial")
    stack = plane.stack_view(case.labels)
    out = {}
    for name in anchors:
        idx = np.flatnonzero(np.any(stack & np.uint16(1 << STRUCTURES.index(name)), axis=(1, 2)))
        if len(idx):
            out[name] = int(idx[len(idx) // 2])
    return out


def _unfold(image: torch.Tensor, kernel: int, dilation: int, stride: int) -> torch.Tensor:
    """(C, S, S) -> (C * kernel^2, (S / stride)^2): a window around every stride-th pixel (zero padding)."""
    pad = dilation * (kernel - 1) // 2
    return F.unfold(image[None], kernel, dilation=dilation, padding=pad, stride=stride)[0]


GRIDS = ("pixels", "patches")


@dataclass
class _Slice:
    labels: np.ndarray  # (P,) uint16 structure bits at the grid points
    body: np.ndarray  # (P,) bool
    desc: dict = field(default_factory=dict)  # name -> (C, P) float32 tensor


def _bits_pooled(labels: np.ndarray, cell: int, min_fraction: float = 0.5) -> np.ndarray:
    """(S, S) structure bits -> (S/cell)^2 bits: a cell carries a structure when it covers >= min_fraction of it."""
    out = np.zeros((labels.shape[0] // cell) ** 2, np.uint16)
    for s in range(len(STRUCTURES)):
        m = torch.from_numpy(((labels >> s) & 1).astype(np.float32))[None, None]
        out |= (F.avg_pool2d(m, cell).flatten().numpy() >= min_fraction).astype(np.uint16) << s
    return out


def _descriptor_slices(case: CTCase, indices: list[int], models: dict, stride: int, mind_params: dict,
                       grids=GRIDS) -> dict:
    """Descriptors of the given axial slices of one case, per grid: ``{grid: {index: _Slice}}``.

    ``pixels``: every ``stride``-th pixel, windows centred on it (intensity 9 x 9; MIND 5 x 5 samples at stride 2 of
    its 12 channels; learned features bilinearly upsampled to pixels). ``patches``: the model's patch grid (16 x 16
    at 128 px), each cell's own footprint (intensity: its 8 x 8 pixels; MIND: its 12 channels averaged over 2 x 2,
    4 x 4 x 12; learned: the patch token); a cell carries a structure (or the body) covering half of it or more.
    """
    samples = [cut_slice(case, "axial", k) for k in indices]
    size = samples[0].hu.shape[-1]
    plane = SlicePlane.create(case.geometry, "axial")
    box = Letterbox.fit(plane.slice_shape, plane.pixel_spacing, size)
    mind = np.moveaxis(mind_ssc(case.hu.astype(np.float32), **mind_params), 0, -1)  # (k, j, i, 12)
    images = np.stack([INPUT_WINDOW.apply(s.hu) for s in samples]).astype(np.float32)
    maps = {}
    with torch.inference_mode():
        for name, model in models.items():
            feats = []
            model_size = tuple(model.patch_embed.img_size)
            for chunk in range(0, len(images), 16):
                x = torch.from_numpy(images[chunk:chunk + 16])[:, None]
                if tuple(x.shape[-2:]) != model_size:
                    x = F.interpolate(x, size=model_size, mode="bilinear", align_corners=False)
                feats.append(dinov3_features(model, dinov3_input(x[:, 0]))[1].float())
            maps[name] = torch.cat(feats)
    ref = next(iter(models.values()), None)  # patch grid of the (first) model, in pixels of the slice
    patch = ref.patch_embed.patch_size[0] * size // ref.patch_embed.img_size[0] if ref is not None else 8
    out = {g: {} for g in grids}
    for n, (k, s) in enumerate(zip(indices, samples)):
        m = torch.from_numpy(np.stack([box.resize_to_model(plane.extract(mind[..., c], k), pad_value=0.0)
                                       for c in range(mind.shape[-1])]).astype(np.float32))
        image = torch.from_numpy(images[n])[None]
        body = body_mask(s.hu)
        if "pixels" in grids:
            yy, xx = np.meshgrid(np.arange(0, size, stride), np.arange(0, size, stride), indexing="ij")
            desc = {"intensity": _unfold(image, 9, 1, stride), "MIND-SSC": _unfold(m, 5, 2, stride),
                    "position": torch.tensor(np.stack([yy.ravel(), xx.ravel()]), dtype=torch.float32)}
            for name, f in maps.items():
                up = F.interpolate(f[n:n + 1], size=(size, size), mode="bilinear", align_corners=False)[0]
                desc[name] = up[:, ::stride, ::stride].flatten(1)
            out["pixels"][k] = _Slice(s.labels[::stride, ::stride].ravel(), body[::stride, ::stride].ravel(), desc)
        if "patches" in grids:
            g = size // patch
            yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
            desc = {"intensity": F.unfold(image[None], patch, stride=patch)[0],
                    "MIND-SSC": F.unfold(F.avg_pool2d(m[None], 2), patch // 2, stride=patch // 2)[0],
                    "position": torch.tensor(np.stack([yy.ravel(), xx.ravel()]), dtype=torch.float32)}
            for name, f in maps.items():  # a control on another grid is resampled to this one
                fn = f[n:n + 1] if f.shape[-1] == g else F.interpolate(f[n:n + 1], size=(g, g), mode="bilinear",
                                                                      align_corners=False)
                desc[name] = fn[0].flatten(1)
            body_cells = F.avg_pool2d(torch.from_numpy(body.astype(np.float32))[None, None], patch).flatten() >= 0.5
            out["patches"][k] = _Slice(_bits_pooled(s.labels, patch), body_cells.numpy(), desc)
    return out


COSINE = "cosine"
SSD = "ssd"


def nearest_neighbours(query: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """Index of the nearest candidate for each query; descriptors are (C, Q) and (C, N)."""
    if metric == COSINE:
        score = F.normalize(query, dim=0).T @ F.normalize(candidates, dim=0)
        return score.argmax(1)
    dist = (query ** 2).sum(0)[:, None] - 2 * query.T @ candidates + (candidates ** 2).sum(0)[None]
    return dist.argmin(1)


def match_scores(query_labels: np.ndarray, match_labels: np.ndarray) -> dict[str, tuple[int, int]]:
    """Per structure: (hits, queries) where a query carrying the structure is matched to a point carrying it."""
    out = {}
    for s, name in enumerate(STRUCTURES):
        has = (query_labels >> s & 1).astype(bool)
        if has.any():
            out[name] = (int((match_labels[has] >> s & 1).sum()), int(has.sum()))
    return out


def _summarise(totals: dict) -> dict:
    out = {}
    for name, per_s in totals.items():
        per = {s: {"hits": h, "n": c, "rate": (h / c if c else float("nan"))} for s, (h, c) in per_s.items()}
        rates = [v["rate"] for v in per.values() if v["n"]]
        hits = sum(v["hits"] for v in per.values())
        count = sum(v["n"] for v in per.values())
        out[name] = {"per_structure": per, "micro": hits / count if count else float("nan"),
                     "macro": float(np.mean(rates)) if rates else float("nan")}
    return out


def evaluate(model: nn.Module | None, val_cases: list[CTCase], *, controls: dict | None = None,
             shifts=(1, 2), neighbours: int = 1, stride: int = 2, anchors=ANCHORS, grids=GRIDS,
             mind_params: dict | None = None) -> dict:
    """Cross-patient nearest-neighbour matching of dense descriptors on corresponding axial slices.

    Pairs: patient i against patient (i + s) mod n for each s in ``shifts``. For each anchor structure present in
    both, patient A's central axial slice of the anchor is matched against patient B's central slice of it and
    ``neighbours`` slices either side. Queries: every labelled point of A's slice; candidates: B's body points. The
    score of a structure is the fraction of A's points in it whose nearest neighbour in B is in it too.

    Two grids (see :func:`_descriptor_slices`): ``pixels`` (every ``stride``-th pixel, 64 x 64 at 128 px; learned
    features bilinearly upsampled) and ``patches`` (the model's 16 x 16 patch grid, each descriptor over the patch's
    own footprint). Descriptors, all at the same points of the same letterboxed 128 px slices: ``intensity``
    (windowed HU, SSD), ``MIND-SSC`` (3D MIND-SSC of the volume, radius 1, dilation 2, SSD), ``learned`` (the model's
    patch tokens, cosine) and any ``controls`` (more models, cosine). References: ``position`` (the point at the
    same place in the image) and ``chance`` (expected score of a random body point of B).

    Returns ``{"settings": ..., "grids": {grid: {descriptor: {"per_structure", "micro", "macro"}}}}``.
    """
    models = dict(controls or {})
    if model is not None:
        models = {"learned": model, **models}
    metrics = {"intensity": SSD, "MIND-SSC": SSD, "position": SSD, **{name: COSINE for name in models}}
    mind_params = mind_params or {"radius": 1, "dilation": 2}
    n = len(val_cases)
    pairs = sorted({(a, (a + s) % n) for s in shifts for a in range(n) if (a + s) % n != a})
    centrals = [central_slices(c, anchors) for c in val_cases]
    needed = [set() for _ in val_cases]
    jobs = []
    for a, b in pairs:
        for anchor in anchors:
            if anchor in centrals[a] and anchor in centrals[b]:
                kb = centrals[b][anchor]
                nb = SlicePlane.create(val_cases[b].geometry, "axial").num_slices
                b_slices = [k for k in range(kb - neighbours, kb + neighbours + 1) if 0 <= k < nb]
                jobs.append((a, b, anchor, centrals[a][anchor], b_slices))
                needed[a].add(centrals[a][anchor])
                needed[b].update(b_slices)
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    slices = {g: {} for g in grids}
    try:
        for c, case in enumerate(val_cases):
            if needed[c]:
                per_grid = _descriptor_slices(case, sorted(needed[c]), models, stride, mind_params, grids)
                for g in grids:
                    for k, s in per_grid[g].items():
                        slices[g][c, k] = s
    finally:
        for name, m in models.items():
            m.train(was_training[name])

    ref = next(iter(models.values()), None)
    model_grid = ref.patch_embed.img_size[0] // ref.patch_embed.patch_size[0] if ref is not None else None
    results = {"settings": {"pairs": len(pairs), "slice_pairs": len(jobs), "shifts": list(shifts),
                            "model_grid": model_grid,
                            "neighbours": neighbours, "stride": stride, "anchors": list(anchors),
                            "mind": mind_params, "metrics": metrics, "patients": [c.name for c in val_cases]},
               "grids": {}}
    for g in grids:
        names = list(metrics) + ["chance"]
        totals = {name: {s: [0.0, 0] for s in STRUCTURES} for name in names}
        for a, b, anchor, ka, b_slices in jobs:
            qa = slices[g][a, ka]
            q = np.flatnonzero(qa.labels)
            cand = [(slices[g][b, k], np.flatnonzero(slices[g][b, k].body)) for k in b_slices]
            cand_labels = np.concatenate([s.labels[idx] for s, idx in cand])
            if not len(q) or not len(cand_labels):
                continue
            for name, metric in metrics.items():
                candidates = torch.cat([s.desc[name][:, idx] for s, idx in cand], dim=1)
                nn_idx = nearest_neighbours(qa.desc[name][:, q], candidates, metric).numpy()
                for s_name, (hits, count) in match_scores(qa.labels[q], cand_labels[nn_idx]).items():
                    totals[name][s_name][0] += hits
                    totals[name][s_name][1] += count
            for s_idx, s_name in enumerate(STRUCTURES):
                count = int((qa.labels[q] >> s_idx & 1).sum())
                if count:
                    totals["chance"][s_name][0] += count * float((cand_labels >> s_idx & 1).mean())
                    totals["chance"][s_name][1] += count
        results["grids"][g] = _summarise(totals)
    return results


MAIN_DESCRIPTORS = ("intensity", "MIND-SSC", "learned")
REFERENCES = ("position", "chance")


def markdown_table(results: dict, grid: str = "pixels", order=None) -> str:
    """Structures as rows, descriptors as columns (% of queries matched to the same structure); best in bold."""
    desc = results["grids"][grid]
    order = order or [n for n in MAIN_DESCRIPTORS if n in desc] + \
        [n for n in desc if n not in MAIN_DESCRIPTORS + REFERENCES] + [n for n in REFERENCES if n in desc]
    compared = [n for n in order if n not in REFERENCES]
    lines = ["| structure | queries | " + " | ".join(order) + " |", "|" + "---|" * (len(order) + 2)]

    def row(label, values, count):
        best = max((values[n] for n in compared if not math.isnan(values[n])), default=None)
        cells = []
        for n in order:
            v = values[n]
            text = "-" if math.isnan(v) else f"{100 * v:.1f}"
            cells.append(f"**{text}**" if best is not None and n in compared and v == best else text)
        return f"| {label} | {count} | " + " | ".join(cells) + " |"

    first = desc[order[0]]["per_structure"]
    for s in STRUCTURES:
        if first[s]["n"]:
            lines.append(row(s, {n: desc[n]["per_structure"][s]["rate"] for n in order}, first[s]["n"]))
    lines.append(row("all (micro)", {n: desc[n]["micro"] for n in order}, sum(v["n"] for v in first.values())))
    lines.append(row("mean of structures", {n: desc[n]["macro"] for n in order}, ""))
    return "\n".join(lines)


def _grid_title(grid: str, settings: dict) -> str:
    g = settings.get("model_grid")
    if grid == "pixels":
        return (f"Pixels (a stride-{settings['stride']} lattice of the 128 px slice; learned features bilinearly "
                f"upsampled from their {g} x {g} grid)")
    if grid == "patches":
        return f"Patches (the model's {g} x {g} grid; a cell carries a structure covering >= 50% of it)"
    return grid


def write_report(results: dict, out_dir: "str | Path", extra: str = "") -> Path:
    out = Path(out_dir)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    s = results["settings"]
    text = (
        "# DINOv3-like stand-in: cross-patient nearest-neighbour matching (validation-pats)\n\n"
        f"{len(s['patients'])} patients, {s['pairs']} ordered pairs, {s['slice_pairs']} slice pairs (central axial "
        f"slice of each anchor structure in A against B's central slice +-{s['neighbours']}). Score: % of A's "
        "labelled points whose nearest neighbour among B's body points is in the same structure.\n"
    )
    for g, table in results["grids"].items():
        text += f"\n## {_grid_title(g, s)}\n\n" + markdown_table(results, g) + "\n"
    if extra:
        text += f"\n{extra}\n"
    path = out / "eval.md"
    path.write_text(text)
    return path


def plot_log(out_dir: "str | Path") -> Path | None:
    """Training curves (PNG) from the loss log; None without matplotlib."""
    opened = open_curves(Path(out_dir) / LOG_FILE)
    if opened is None:
        return None
    fig, axes, log, steps = opened
    for key in ("loss", "cls", "patch_masked", "patch_visible"):
        axes[0].plot(steps, [e[key] for e in log], label=key, lw=1)
    axes[0].set_xlabel("step"), axes[0].legend(), axes[0].set_title("DINOv3-like stand-in: losses")
    axes[1].plot(steps, [e["teacher_token_cos"] for e in log], lw=1)
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step"), axes[1].set_title("mean cosine between teacher body tokens (1 = collapse)")
    return save_curves(fig, Path(out_dir) / "dinov3_curves.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="self-supervised training (resumes from out/checkpoint.pt)")
    t.add_argument("--out", default=str(REPO / "training" / "runs" / "dinov3"))
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--objective", choices=("contrastive", "regression", "dino"), default=SSLConfig.objective)
    t.add_argument("--train-dir", default=str(TRAIN_DIR))
    t.add_argument("--limit", type=int, default=None, help="first N training patients only (quick runs)")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--eval", action="store_true", help="evaluate on validation-pats afterwards")
    t.add_argument("--val-dir", default=str(VAL_DIR))
    e = sub.add_parser("evaluate", help="nearest-neighbour matching table for a trained run")
    e.add_argument("--out", default=str(REPO / "training" / "runs" / "dinov3"))
    e.add_argument("--val-dir", default=str(VAL_DIR))
    e.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        t0 = time.time()
        path = train(args.out, args.steps, seed=args.seed, batch_size=args.batch_size, threads=args.threads,
                     resume=not args.no_resume, cases=load_cases(args.train_dir, limit=args.limit),
                     ssl=SSLConfig(objective=args.objective),
                     max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
        print(f"[dinov3] wrote {path} in {time.time() - t0:.0f} s", flush=True)
        plot_log(args.out)
        if not args.eval:
            return 0
    out = Path(args.out)
    val = load_cases(args.val_dir)
    torch.manual_seed(0)
    control = build_dinov3(json_config(out))
    t0 = time.time()
    results = evaluate(load_trained(out), val, controls={"random init": control})
    info = json.loads((out / CONFIG_FILE).read_text()).get("training", {})
    extra = (f"Learned: {info.get('steps_done')} steps of batch {info.get('batch_size')}, seed {info.get('seed')}. "
             "'random init' is the same architecture untrained (control); 'position' matches the same pixel "
             "position, 'chance' a random body pixel (references, not descriptors).")
    path = write_report(results, out, extra)
    print(path.read_text())
    print(f"[dinov3] evaluation took {time.time() - t0:.0f} s", flush=True)
    return 0


def json_config(out_dir: "str | Path") -> DinoV3Config:
    cfg_path = Path(out_dir) / CONFIG_FILE
    if cfg_path.exists():
        return DinoV3Config.from_dict(json.loads(cfg_path.read_text())["config"])
    return DINOV3_PRESETS["standin"]


if __name__ == "__main__":
    sys.exit(main())
