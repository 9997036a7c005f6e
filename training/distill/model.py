"""What is trained: the student, its translators predicting each teacher's PHI-S-normalised features, and the losses.

:class:`DistillModel` holds the student (``PRISMRTLib.models.student.Student``: backbone + translators, the module
the bundle ships), one :class:`~training.distill.phis.PhiS` per feature (fitted once, buffers), the frozen SAM heads
(prompt encoder + mask decoder, the ones delineation runs) for the prompt-in-the-loop term, the frozen CLIP visual
projection for the summary term, and the training-only parts of the balancing options (teacher-weight logits for
"gating", return decoders).

Losses, per feature (``SliceFeatures`` field), averaged into one loss per teacher role:

- dense maps (``sam_embedding``, ``dino_patches``, ``clip_patches``): MSE in normalised space (or per-pixel 1 - cos);
- summary tokens (``dino_cls``; ``clip_cls`` after the teacher's frozen projection, i.e. in its image-text space):
  1 - cos, plus ``summary_mse`` times the MSE in normalised space (cosine alone leaves the length free);
- prompt-in-the-loop (EdgeSAM): the student's embedding (normalisation undone) and the teacher's go through the same
  frozen decoder with the same prompts (a click in the body, the box of the teacher's mask for it, and box + point +
  mask as propagation prompts a slice); BCE of the student's mask logits against the teacher's mask probabilities
  and MSE between their predicted IoUs. Part of the SAM role's loss.

Teacher balancing (``balance.mode``): ``fixed`` (weights 1, or ``loss.weights``), ``drop`` (UNIC teacher
dropping: each role's loss is zeroed with probability ``drop_p`` per step, one always kept, the sum rescaled),
``gating`` (MultiMedDistill's teacher level: softmax weights over roles learned with the loss, floored by an entropy
penalty; its token level is the student's ``token_gates`` option), ``attention`` (VFSS: weights from a softmax over
the roles' current normalised losses, the harder teacher weighted up). ``loss.return_decoder`` > 0 adds
MultiMedDistill's return decoder: a 1x1 map from each dense translation back to the student's tokens, so a
translator keeps what the backbone knows (training only; not shipped).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from PRISMRTLib.models.registry import ROLE_OUTPUTS
from PRISMRTLib.models.student import DenseTranslator, Student

from .config import RunConfig
from .phis import PhiS

SUMMARY = ("dino_cls", "clip_cls")
ROLE_OF = {name: role for role, names in ROLE_OUTPUTS.items() for name in names}


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) -> (B, size, size), antialiased when shrinking (the cache stores one size)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images[:, None], (size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1])[:, 0].clamp(0, 1)


class DistillModel(nn.Module):
    def __init__(self, student: Student, config: RunConfig, sam_heads: dict | None = None,
                 clip_proj: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.config = config
        # what is learnt: every target a translator produces (a trunk's own output, e.g. the LiteMedSAM trunk's SAM
        # embedding, is the teacher's by construction and is not a loss term)
        self.targets = [name for name in student.config.targets if name in student.translators]
        self.normalisers = nn.ModuleDict({
            name: PhiS(student.config.target(name).channels, config.loss.normaliser) for name in self.targets})
        self.roles = [r for r in ROLE_OUTPUTS if any(ROLE_OF[n] == r for n in self.targets)]
        # frozen teacher parts: kept outside the state dict's trainable set (requires_grad False), not shipped here
        self.sam_heads = nn.ModuleDict(sam_heads or {})
        for p in self.sam_heads.parameters():
            p.requires_grad_(False)
        self.clip_proj = clip_proj
        if clip_proj is not None:
            for p in clip_proj.parameters():
                p.requires_grad_(False)
        self.role_logits = nn.Parameter(torch.zeros(len(self.roles))) if config.balance.mode == "gating" else None
        width = student.width
        self.return_decoders = nn.ModuleDict()
        if config.loss.return_decoder > 0:
            for name in self.targets:
                if student.config.target(name).grid:
                    self.return_decoders[name] = nn.Conv2d(student.config.target(name).channels, width, 1)

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ---- normalisers -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisers(self, batch: dict, pixels_per_item: int = 1024, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for name in self.targets:
            x = batch[name].float()
            if x.ndim == 4:
                b, c, h, w = x.shape
                flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
                k = min(pixels_per_item, h * w)
                idx = torch.stack([torch.randperm(h * w, generator=g)[:k] for _ in range(b)])
                x = torch.gather(flat, 1, idx[..., None].expand(-1, -1, c)).reshape(-1, c)
            self.normalisers[name].fit(x, seed)

    def normalise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.normalisers[name](x.float(), dim=1 if x.ndim == 4 else -1)

    def denormalise(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return self.normalisers[name].inverse(z.float(), dim=1 if z.ndim == 4 else -1)

    # ---- forward -----------------------------------------------------------------------------------------------
    def uses_cached_trunk(self, batch: "dict | None") -> bool:
        """A frozen trunk whose output is a cached teacher target (the LiteMedSAM trunk, initialised from the SAM
        teacher: its embedding of a view is the cache's ``sam_embedding``) is not run in training: the cache gives
        its output."""
        return (batch is not None and self.student.trunk_frozen
                and all(name in batch for name in self.student.trunk_outputs) and bool(self.student.trunk_outputs))

    def predict(self, images01: torch.Tensor, batch: "dict | None" = None) -> tuple[dict, torch.Tensor]:
        """Normalised predictions of every learnt target, and the student's patch tokens (B, h, w, D)."""
        if self.uses_cached_trunk(batch):
            (name,) = self.student.trunk_outputs
            cls, patches = self.student.tokens_from_embedding(batch[name].to(images01.device).float())
        else:
            cls, patches = self.student.tokens(images01)
        out = self.student.translate(cls, patches)
        return {name: out[name] for name in self.targets}, patches

    def forward(self, batch: dict, images01: torch.Tensor, rngs: list[np.random.Generator],
                step_rng: np.random.Generator, reduce=None) -> tuple[torch.Tensor, dict]:
        """The step's loss on one (per-rank) batch and what to log. ``reduce(dict) -> dict`` averages detached
        numbers over ranks (for data-dependent teacher weights); identity in a single process."""
        terms = self.losses(batch, images01, rngs, step_rng)
        roles = self.role_losses(terms)
        reduced = reduce({r: float(v.detach()) for r, v in roles.items()}) if reduce else None
        total, info = self.combine(roles, step_rng, reduced)
        info.update({f"loss:{k}": float(v.detach()) for k, v in terms.items()})
        info.update({f"role:{k}": float(v.detach()) for k, v in roles.items()})
        return total, info

    def losses(self, batch: dict, images01: torch.Tensor, rngs: list[np.random.Generator],
               step_rng: np.random.Generator | None = None) -> dict:
        """Per-target losses (and the prompt and return-decoder terms) for one batch."""
        c = self.config.loss
        pred, patches = self.predict(images01, batch)
        out: dict[str, torch.Tensor] = {}
        for name in self.targets:
            target_z = self.normalise(name, batch[name])
            z = pred[name].float()
            if name in SUMMARY:
                raw = self.denormalise(name, z)
                teacher = batch[name].float()
                if name == "clip_cls" and self.clip_proj is not None and "clip_embedding" in batch:
                    raw, teacher = self.clip_proj(raw), batch["clip_embedding"].float()
                cos = 1 - F.cosine_similarity(raw, teacher, dim=-1).mean()
                out[name] = cos + c.summary_mse * F.mse_loss(z, target_z)
            elif c.dense == "cosine":
                out[name] = 1 - F.cosine_similarity(z, target_z, dim=1).mean()
            else:
                out[name] = F.mse_loss(z, target_z)
            if name in self.return_decoders:
                grid = patches.shape[1:3]
                back = self.return_decoders[name](F.interpolate(z, grid, mode="bilinear", align_corners=False))
                out[f"return:{name}"] = F.mse_loss(back.permute(0, 2, 3, 1), patches.detach().float())
        if c.prompt > 0 and "sam_embedding" in pred and len(self.sam_heads):
            n = max(1, int(math.ceil(c.prompt_share * len(rngs))))
            student_embedding = self.denormalise("sam_embedding", pred["sam_embedding"][:n])
            kinds = [str(k) for k in (step_rng or np.random.default_rng(0)).choice(
                ["click", "box", "propagate"], size=c.prompt_per_image)]
            out["prompt"] = self.prompt_loss(student_embedding, batch["sam_embedding"][:n].float(),
                                             batch["body"][:n], rngs[:n], kinds)
        return out

    def role_losses(self, terms: dict) -> dict[str, torch.Tensor]:
        c = self.config.loss
        by_role: dict[str, list] = {r: [] for r in self.roles}
        for name, value in terms.items():
            if name == "prompt":
                by_role["sam"].append(c.prompt * value)
            elif name.startswith("return:"):
                by_role[ROLE_OF[name[7:]]].append(c.return_decoder * value)
            else:
                by_role[ROLE_OF[name]].append(float(c.weights.get(name, 1.0)) * value)
        return {r: torch.stack(v).sum() for r, v in by_role.items() if v}

    def combine(self, roles: dict[str, torch.Tensor], step_rng: np.random.Generator,
                reduced: dict[str, float] | None = None) -> tuple[torch.Tensor, dict]:
        """One loss from the per-role losses by the balancing mode; ``reduced``: the roles' losses averaged over
        ranks (detached), so that data-dependent weights are the same on every rank."""
        b = self.config.balance
        names = list(roles)
        values = torch.stack([roles[r] for r in names])
        t = len(names)
        info = {}
        if b.mode == "fixed":
            weights = torch.ones(t)
        elif b.mode == "drop":
            keep = step_rng.random(t) >= b.drop_p
            if not keep.any():
                keep[int(step_rng.integers(t))] = True
            weights = torch.from_numpy(keep.astype(np.float32)) * (t / keep.sum())
        elif b.mode == "attention":
            current = torch.tensor([(reduced or {}).get(r, float(roles[r].detach())) for r in names])
            weights = t * torch.softmax(current / b.temperature, 0)
        elif b.mode == "gating":
            w = torch.softmax(self.role_logits, 0)
            entropy = -(w * torch.log(w.clamp(min=1e-12))).sum()
            info["gate_entropy"] = float(entropy.detach())
            total = (t * w * values).sum() + b.entropy * (math.log(t) - entropy)
            info.update({f"weight:{r}": float(t * w[i].detach()) for i, r in enumerate(names)})
            return total, info
        else:
            raise ValueError(f"unknown balance mode '{b.mode}'")
        weights = weights.to(values.device, values.dtype)
        info.update({f"weight:{r}": float(weights[i]) for i, r in enumerate(names)})
        return (weights * values).sum(), info

    # ---- prompt-in-the-loop --------------------------------------------------------------------------------------
    def prompt_loss(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, body: torch.Tensor,
                    rngs: list[np.random.Generator], kinds=("click",)) -> torch.Tensor:
        from training.sam_interactive import decode

        heads = self.sam_heads
        pe = heads["prompt_encoder"]
        sam_size = int(pe.input_image_size[0])
        body_np = body.cpu().numpy()
        scale = sam_size / body_np.shape[-1]
        device = student_embedding.device
        total, count = torch.zeros((), device=device), 0
        model = _Heads(heads)
        for kind in kinds:
            points = []
            for i, rng in enumerate(rngs):
                where = np.argwhere(body_np[i])
                r, cidx = where[int(rng.integers(len(where)))] if len(where) else rng.integers(body_np.shape[-1], size=2)
                points.append([(float(cidx) + 0.5) * scale - 0.5, (float(r) + 0.5) * scale - 0.5])
            coords = torch.tensor(points, dtype=torch.float32, device=device)[:, None]
            labels = torch.ones(len(points), 1, dtype=torch.int64, device=device)
            prompt_points = (coords, labels)
            with torch.no_grad():  # the teacher's masks for a click there
                t_low, t_iou = decode(model, teacher_embedding, points=prompt_points, multimask=True)
            boxes = masks = None
            multimask = kind == "click"
            if kind != "click":  # the box (and mask) of the teacher's best mask for that click, as a user or
                best = t_iou.argmax(1)  # propagation would give them
                t_mask = t_low[torch.arange(len(best)), best] > 0
                boxes = _boxes(t_mask, sam_size / t_mask.shape[-1]).to(device)
                if kind == "propagate":
                    low = pe.mask_input_size[0]
                    masks = 8.0 * (2 * F.adaptive_avg_pool2d(t_mask[:, None].float(), low) - 1)
                with torch.no_grad():
                    t_low, t_iou = decode(model, teacher_embedding, points=prompt_points, boxes=boxes,
                                          mask_input=masks, multimask=False)
            s_low, s_iou = decode(model, student_embedding, points=prompt_points, boxes=boxes, mask_input=masks,
                                  multimask=multimask)
            bce = F.binary_cross_entropy_with_logits(s_low.float(), torch.sigmoid(t_low.float()))
            iou = F.mse_loss(s_iou.float(), t_iou.float())
            total = total + bce + self.config.loss.prompt_iou * iou
            count += 1
        return total / max(count, 1)


class _Heads:
    """The attribute view ``training.sam_interactive.decode`` reads (prompt_encoder, mask_decoder)."""

    def __init__(self, heads: nn.ModuleDict):
        self.prompt_encoder, self.mask_decoder = heads["prompt_encoder"], heads["mask_decoder"]


def _boxes(masks: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, L, L) bool -> (B, 4) SAM boxes (x0, y0, x1, y1) in input pixels; an empty mask gets the whole image."""
    out = []
    size = masks.shape[-1]
    for m in masks.cpu().numpy():
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows):
            box = [cols[0], rows[0], cols[-1], rows[-1]]
        else:
            box = [0, 0, size - 1, size - 1]
        out.append([(v + 0.5) * scale - 0.5 for v in box])
    return torch.tensor(out, dtype=torch.float32)


def dense_fidelity(pred_raw: torch.Tensor, target_raw: torch.Tensor, normaliser: PhiS) -> dict[str, float]:
    """Cosine (per pixel, or per vector) and normalised MSE (MSE in PHI-S space: 1.0 = predicting the mean)."""
    dim = 1 if pred_raw.ndim == 4 else -1
    cos = F.cosine_similarity(pred_raw.float(), target_raw.float(), dim=dim).mean()
    nmse = F.mse_loss(normaliser(pred_raw.float(), dim=dim), normaliser(target_raw.float(), dim=dim))
    return {"cosine": float(cos), "nmse": float(nmse)}


def translators_of(student: Student) -> dict[str, nn.Module]:
    return {name: t for name, t in student.translators.items()}


def last_layers(student: Student) -> dict[str, nn.Module]:
    return {name: t.last for name, t in student.translators.items()}


__all__ = ["DistillModel", "DenseTranslator", "resize_images", "dense_fidelity", "last_layers"]
