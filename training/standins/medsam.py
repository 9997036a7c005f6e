"""MedSAM-like stand-in teacher: SAM's architecture (segment_anything) at 128 px, trained on OpenKBP head-and-neck CT.

Training follows SAM's interactive recipe on the ten OpenKBP structures, in axial, coronal and sagittal slices:

- each step takes ``batch_size`` slices (:class:`training.data.SliceSampler`: counter-based, so resumable; half of
  them axial, the rest coronal and sagittal; mirrored left-right where anatomy allows), windowed with jitter
  (:func:`training.data.augment_window`), and prompts ``prompts_per_image`` structures visible in each (one encoder
  pass serves them, as in SAM);
- an object's first prompt is either a box (its bounding box, each side jittered by a few pixels) or one positive
  click at a random interior point (at least half as deep as the deepest);
- a share ``p_propagate`` of the slices is prompted as 3D propagation prompts a slice (SAM has no such prompts): the
  structures are chosen on the sampled slice, and the image and targets are the next slice's, prompted with the
  sampled slice's box, most interior point and mask (as +-4..12 logits, :func:`mask_prompt`); ``end_share`` of them
  step out of a structure's last slice, where the target is empty, so propagation can learn where a structure ends;
- then ``iterations - 1`` corrective rounds: a click is added in the current error region (positive in a false
  negative, negative in a false positive; see :func:`corrective_click`) and the previous low-res mask logits are fed
  back as the mask prompt;
- every round is supervised: BCE + soft Dice on the mask (upsampled to the input size), and MSE between the predicted
  and the actual IoU. A first single-click prompt asks for SAM's three masks and the loss takes the best one
  (the IoU head is trained on all three); every other prompt asks for one mask.

Evaluation (:func:`evaluate`) is deterministic: on each structure's central axial slice (its centre of mass along the
axial axis; or the slice of largest area), clicks are simulated as above but always at the deepest point (first click:
of the structure; then: of the largest error region), and a tight box is tried alone. The soft-tissue window W350/L60
is used; the first click's mask is the one of SAM's three with the highest predicted IoU.

Coordinates follow segment_anything: points are (x=column, y=row) pixel indices of the model input and boxes are
(x0, y0, x1, y1) with inclusive pixel indices; the prompt encoder shifts both to pixel centres itself.

Command line (``python -m training.standins.medsam --help``)::

    python -m training.standins.medsam train --out training/runs/medsam_base --steps 2500   # then evaluates
    python -m training.standins.medsam train --out training/runs/medsam --steps 700 --lr 2e-4 \
        --p-propagate 0.4 --end-share 0.5 --init-from training/runs/medsam_base          # the shipped model
    python -m training.standins.medsam evaluate --out training/runs/medsam [--slice largest]
"""

from __future__ import annotations

import argparse
from fractions import Fraction
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from PRISMRTLib.imaging import Letterbox, Orientation, SlicePlane
from PRISMRTLib.imaging.intensity import Window
from PRISMRTLib.models.medsam import MEDSAM_PRESETS, MedSAMConfig, build_medsam, medsam_input
from training.data import STRUCTURES, CTCase, SliceSampler, augment_window, cut_slice, load_cases
from training.data import TRAIN_DIR, VAL_DIR
from training.standins.runfiles import open_curves, save_atomic, save_curves, write_json
from training.sam_interactive import (boxes_tensor, decode, dice, interactive_step,  # noqa: F401 (tests)
                                      mask_prompt, points_tensor, select_masks, upsample_logits)
from PRISMRTLib.segmentation.prompts import (corrective_click, first_click, inside_distance,  # noqa: F401
                                             jittered_box, tight_box)


WEIGHTS_NAME = "medsam_standin.safetensors"
CONFIG_NAME = "medsam_standin.json"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.json"
EVAL_WINDOW = Window(60, 350)  # soft tissue: augment_window's centre, and what evaluation feeds the model
MIN_PIXELS = 10  # a structure must cover this many pixels of a slice to be prompted


# ---------------------------------------------------------------------------------------------------------------------
# click simulation and metrics (numpy, one slice at a time)
# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# model pieces
# ---------------------------------------------------------------------------------------------------------------------
def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Everything that fixes a run's result besides the data (a resumed run must match its checkpoint)."""

    steps: int
    seed: int = 0
    batch_size: int = 8  # slices per step (each with prompts_per_image objects)
    config: dict | None = None
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: int = 0  # steps; 0 = 5% of the run
    prompts_per_image: int = 2  # objects prompted per slice (each with its own prompts)
    axial_share: float = 0.5  # fraction of axial slices (the rest coronal and sagittal, equally)
    iterations: int = 4  # prompt rounds per object: the first prompt, then corrective clicks
    p_box: float = 0.5  # chance that the first prompt is a box (else one click)
    p_propagate: float = 0.0  # chance that a slice is prompted as propagation does, from its neighbour's masks
    end_share: float = 0.0  # of those, the share stepping out of a structure's last slice (the target is empty)
    init_from: str = ""  # a finished run whose weights start this one (fine-tuning); "" = random initialisation
    focus: tuple[str, ...] = ()  # structures drawn more often (the product's own: the targets), "" = none
    focus_share: float = 0.0  # share of images that show one of them and prompt it first
    zoom_share: float = 0.0  # share of click/box images cropped around their first structure and enlarged
    iou_weight: float = 1.0
    clip: float = 1.0
    train_cases: str = ""


def _orientations(axial_share: float) -> tuple[str, ...]:
    """Orientations to draw from uniformly: about ``axial_share`` axial, the rest coronal and sagittal equally."""
    if not 0 < axial_share <= 1:
        raise ValueError("axial_share must be in (0, 1]")
    f = Fraction(axial_share).limit_denominator(20)
    return ("axial",) * (2 * f.numerator) + ("coronal", "sagittal") * (f.denominator - f.numerator)


def _lr_factor(step: int, s: TrainSettings) -> float:
    warm = s.warmup or max(1, s.steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _sample(sampler: SliceSampler, seed: int, n: int, prompts: int = 1, p_propagate: float = 0.0,
            end_share: float = 0.0, focus: tuple[str, ...] = (), focus_share: float = 0.0, zoom_share: float = 0.0):
    """Image ``n`` of a run: the windowed slice (S, S), ``prompts`` masks of structures visible in it (distinct while
    there are enough), one generator per mask (window, prompts, clicks), and per mask the mask it is prompted from
    (None: prompted by clicks or a box as SAM is); depends only on (seed, n).

    With probability ``p_propagate`` the image is a *propagation* step: the structures are chosen on the sampled
    slice, and the image and targets are those of the next slice up or down, prompted from the sampled slice's masks
    as :meth:`SegmentationSession.propagate` prompts a new slice from its neighbour's result. In ``end_share`` of
    those the sampled slice is moved to the last slice of one of its structures and the step goes outward, where the
    target is empty: the model must learn that the structure has ended (brainstem into spinal cord, say), or
    propagation never stops.

    In ``focus_share`` of the images (drawn only when ``focus`` is given, so other runs are unchanged) the slice
    shows one of the ``focus`` structures and that one is prompted first: the targets, which the product delineates,
    are rarer and harder than the organs.

    In ``zoom_share`` of the click/box images (own generator, so other runs are unchanged) image and masks are a
    square crop around the first prompted structure, enlarged to the full size (:func:`zoom_crop`): the model then
    also knows anatomy larger than the native grid shows it, as a zoomed-in view of a small target needs.
    """
    rng = np.random.default_rng([seed, 0x5A4D, n])
    wanted = bool(focus) and rng.random() < focus_share
    for attempt in range(64 if not wanted else 256):
        s = sampler.sample(n + (attempt << 40))
        visible = s.visible(MIN_PIXELS)
        focused = [v for v in visible if v in focus]
        if wanted and not focused:
            continue
        if visible:
            target, first = s, None
            if p_propagate > 0 and rng.random() < p_propagate:
                step = 1 if rng.random() < 0.5 else -1
                if end_share > 0 and rng.random() < end_share:
                    pool = focused if wanted else visible
                    first = pool[int(rng.integers(len(pool)))]
                    s = sampler.last_slice(s, first, step, MIN_PIXELS)
                    visible = s.visible(MIN_PIXELS)
                target = sampler.neighbour(s, step) or sampler.neighbour(s, -step)
            image = augment_window(target.hu, rng)
            order = list(rng.permutation(len(visible)))
            chosen = [visible[order[p % len(order)]] for p in range(prompts)]
            if wanted and first is None:
                first = focused[int(rng.integers(len(focused)))]
            if first is not None and first in visible:
                # known: when ``first`` was also drawn later in ``chosen`` it is prompted twice here; moving it to
                # the front instead would change the samples of the shipped runs (reproduced bit for bit), so it
                # waits for the next retraining
                chosen[0] = first
            rngs = [np.random.default_rng([seed, 0x5A4D, n, p + 1]) for p in range(prompts)]
            sources = [s.mask(c) if target is not s else None for c in chosen]
            masks = [target.mask(c) for c in chosen]
            if zoom_share > 0 and target is s:
                zrng = np.random.default_rng([seed, 0x200A, n])
                if zrng.random() < zoom_share:
                    image, masks = zoom_crop(image, masks, zrng)
            return image, masks, rngs, sources
    raise RuntimeError(f"no slice showing {'one of ' + ', '.join(focus) if wanted else 'a structure'} in "
                       f"{attempt + 1} draws: are the structure masks empty?")


def zoom_window(mask: np.ndarray, rng: np.random.Generator, expand=(1.4, 3.0), min_side: int = 24,
                jitter: float = 0.15) -> tuple[int, int, int]:
    """A square window (row0, col0, side) around a 2D mask: its bounding box's longer side times a random factor in
    ``expand`` (at least ``min_side``, at most the image), centred on the box up to ``jitter`` of the side away,
    inside the image."""
    size = mask.shape[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * rng.uniform(*expand)
    side = int(round(min(size, max(min_side, side))))
    centre = np.array([(rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2]) + rng.uniform(-jitter, jitter, 2) * side
    r0, c0 = (int(round(min(max(v - side / 2, 0), size - side))) for v in centre)
    return r0, c0, side


def zoom_crop(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator):
    """Crop image and masks to :func:`zoom_window` of the first mask and enlarge them to the full size (linear, on
    the letterbox's half-pixel grid; masks by area fraction > 0.5). A mask the crop leaves below MIN_PIXELS is
    replaced by the first one."""
    size = image.shape[0]
    r0, c0, side = zoom_window(masks[0], rng)
    box = Letterbox.fit((side, side), out_size=size)

    def enlarge(a: np.ndarray) -> np.ndarray:
        return box.resize_to_model(a[r0:r0 + side, c0:c0 + side].astype(np.float32))

    zoomed = [enlarge(m) > 0.5 for m in masks]
    zoomed = [z if z.sum() >= MIN_PIXELS else zoomed[0] for z in zoomed]
    return enlarge(image).astype(image.dtype), zoomed


def train_step(model: Sam, images: np.ndarray, masks: np.ndarray, owners: np.ndarray,
               rngs: list[np.random.Generator], s: TrainSettings,
               sources: list[np.ndarray | None] | None = None) -> tuple[torch.Tensor, dict]:
    """One SAM-style interactive step: ``images`` (B, S, S) in [0, 1]; ``masks`` (N, S, S), the objects to segment,
    mask ``i`` in image ``owners[i]`` (SAM also prompts several objects per image: one encoder pass serves them);
    one generator per object; ``sources``: per object the neighbouring slice's mask it is prompted from as
    propagation does (None: box or clicks). Returns the loss (to backpropagate) and statistics
    (:func:`training.sam_interactive.interactive_step` on the encoder's embeddings)."""
    device = next(model.parameters()).device
    embeddings = model.image_encoder(medsam_input(torch.from_numpy(images).to(device)))[torch.as_tensor(owners)]
    return interactive_step(model, embeddings, masks, rngs, p_box=s.p_box, iterations=s.iterations,
                            iou_weight=s.iou_weight, sources=sources, size=images.shape[-1])


def adapt_state_dict(state: dict, model: Sam) -> dict:
    """A trained Sam's weights for ``model`` with another patch size (same widths and depths): the patch embedding
    kernel is area-resized and scaled so a new patch sees what an old one saw on a proportionally upsampled image
    (FlexiViT's observation), the absolute position embedding is resampled to the new grid, and the global
    attention layers' relative position tables are resampled to the new range. Windowed layers keep theirs."""
    target = model.state_dict()
    out = {}
    for key, value in state.items():
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif key.endswith("patch_embed.proj.weight"):  # (C, 3, p, p)
            scale = (value.shape[-1] / want[-1]) ** 2
            out[key] = F.interpolate(value.float(), size=want[-2:], mode="area") * scale
        elif key.endswith("pos_embed"):  # (1, G, G, C)
            out[key] = F.interpolate(value.permute(0, 3, 1, 2).float(), size=want[1:3], mode="bicubic",
                                     align_corners=False).permute(0, 2, 3, 1)
        elif ".rel_pos_" in key:  # (2G - 1, head_dim)
            out[key] = F.interpolate(value.T[None].float(), size=want[0], mode="linear", align_corners=True)[0].T
        else:
            raise ValueError(f"cannot adapt {key} from {tuple(value.shape)} to {tuple(want)}: only the patch size "
                             "may differ between the two configurations")
    return out


def _resolve_config(config) -> MedSAMConfig:
    if isinstance(config, MedSAMConfig):
        return config
    if isinstance(config, dict):
        return MedSAMConfig.from_dict(config)
    return MEDSAM_PRESETS[config]


def train(out_dir, steps: int, seed: int = 0, batch_size: int = 8, threads: int = 1, resume: bool = True,
          train_dir=TRAIN_DIR, log_every: int = 10, ckpt_every: int = 100, *, config="standin", cases=None,
          limit: int | None = None, stop_at: int | None = None, lr: float = 5e-4, iterations: int = 4,
          p_box: float = 0.5, p_propagate: float = 0.25, end_share: float = 0.0, init_from=None,
          focus=(), focus_share: float = 0.0, zoom_share: float = 0.0, prompts_per_image: int = 2,
          axial_share: float = 0.5, device: str = "cpu", verbose: bool = True) -> Sam:
    """Train the MedSAM-like stand-in; returns the model (weights also saved in ``out_dir``).

    ``out_dir`` gets ``checkpoint.pt`` every ``ckpt_every`` steps (model, optimizer, step, log; resumed from when
    ``resume``), ``train_log.json``, and at the end ``medsam_standin.safetensors`` + ``medsam_standin.json`` (the
    Sam state dict and its :class:`MedSAMConfig`). ``cases`` (a list of CTCase) replaces ``train_dir`` (``limit``:
    first patients only). ``stop_at`` ends this call after that step (checkpointed) without finishing the run, so a
    run can be done in slices; the schedule always follows ``steps``.
    """
    torch.set_num_threads(int(threads))
    out = Path(out_dir)
    cfg = _resolve_config(config)
    unknown = sorted(set(focus or ()) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"focus: unknown structure(s) {', '.join(unknown)}; choose from {', '.join(STRUCTURES)}")
    if focus and not 0 < focus_share <= 1:
        raise ValueError(f"focus_share must be in (0, 1], got {focus_share}")
    if not 0 <= zoom_share <= 1:
        raise ValueError(f"zoom_share must be in [0, 1], got {zoom_share}")
    out.mkdir(parents=True, exist_ok=True)  # after the checks: bad arguments leave nothing behind
    if cases is None:
        cases = load_cases(train_dir, limit=limit)
    settings = TrainSettings(steps=int(steps), seed=int(seed), batch_size=int(batch_size), config=cfg.to_dict(),
                             lr=float(lr), iterations=int(iterations), p_box=float(p_box),
                             p_propagate=float(p_propagate), end_share=float(end_share),
                             init_from=str(init_from or ""), focus=tuple(focus or ()),
                             focus_share=float(focus_share) if focus else 0.0, zoom_share=float(zoom_share),
                             prompts_per_image=int(prompts_per_image), axial_share=float(axial_share),
                             train_cases=",".join(c.name for c in cases))
    torch.manual_seed(settings.seed)
    model = build_medsam(cfg).to(device).train()
    if settings.init_from:
        start_weights = Path(settings.init_from) / WEIGHTS_NAME
        if not start_weights.is_file():
            raise FileNotFoundError(f"--init-from {settings.init_from}: no {WEIGHTS_NAME} there; finish that run first")
        model.load_state_dict(adapt_state_dict(load_file(str(start_weights)), model), strict=True)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: _lr_factor(k, settings))
    log: list[dict] = []
    start = 0
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = {"zoom_share": 0.0, **ckpt["settings"]}  # checkpoints from before the option
        if saved != asdict(settings):
            diff = sorted(k for k, v in asdict(settings).items() if saved.get(k) != v)
            raise ValueError(f"{ckpt_path} was made with other settings (differing: {', '.join(diff)}): "
                             "use another output folder, or resume=False to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, log = int(ckpt["step"]), json.loads(ckpt["log"])
        if verbose:
            print(f"resumed from step {start} ({ckpt_path})", flush=True)

    def checkpoint(step: int) -> None:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "settings": asdict(settings),
                     "log": json.dumps(log)}, ckpt_path, torch.save)
        write_json(out / LOG_NAME, {"settings": asdict(settings), "log": log})

    sampler = SliceSampler(cases, seed=settings.seed, size=cfg.img_size,
                           orientations=_orientations(settings.axial_share))
    end = settings.steps if stop_at is None else min(settings.steps, int(stop_at))
    window, t0 = {"loss": [], "dice": [], "round_dice": [], "time": 0.0}, time.perf_counter()
    for step in range(start, end):
        t = time.perf_counter()
        items = [_sample(sampler, settings.seed, step * settings.batch_size + i, settings.prompts_per_image,
                         settings.p_propagate, settings.end_share, settings.focus, settings.focus_share,
                         settings.zoom_share)
                 for i in range(settings.batch_size)]
        images = np.stack([x[0] for x in items])
        masks = np.stack([m for x in items for m in x[1]])
        owners = np.repeat(np.arange(len(items)), settings.prompts_per_image)
        loss, stats = train_step(model, images, masks, owners, [r for x in items for r in x[2]], settings,
                                 [m for x in items for m in x[3]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        scheduler.step()
        window["loss"].append(float(loss.detach()))
        window["round_dice"].append(stats["dice"])
        window["time"] += time.perf_counter() - t
        done = step + 1
        if done % log_every == 0 or done == end:
            n = len(window["loss"])
            entry = {"step": done, "loss": float(np.mean(window["loss"])),
                     "train_dice_per_round": [round(float(v), 4) for v in np.mean(window["round_dice"], 0)],
                     "lr": optimizer.param_groups[0]["lr"], "sec_per_step": window["time"] / n,
                     "elapsed_s": round(time.perf_counter() - t0, 1)}
            log.append(entry)
            window = {"loss": [], "dice": [], "round_dice": [], "time": 0.0}
            if verbose:
                print(f"step {done}/{settings.steps} loss {entry['loss']:.4f} dice/round "
                      f"{entry['train_dice_per_round']} lr {entry['lr']:.2e} {entry['sec_per_step']:.2f} s/step",
                      flush=True)
        if done % ckpt_every == 0 or done == end:
            checkpoint(done)
    if end >= settings.steps:
        save_trained(model, cfg, out, metadata={"steps": str(settings.steps), "seed": str(settings.seed)})
        write_json(out / LOG_NAME, {"settings": asdict(settings), "log": log})
    return model.eval()


def save_trained(model: Sam, config: MedSAMConfig, out_dir, metadata: dict | None = None) -> Path:
    """The Sam state dict as safetensors, and its config as JSON next to it."""
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(config.to_dict()), "format": "pt", **(metadata or {})}
    save_atomic(state, out / WEIGHTS_NAME, lambda s, p: save_file(s, str(p), metadata=meta))
    write_json(out / CONFIG_NAME, config.to_dict())
    return out / WEIGHTS_NAME


def load_trained(out_dir, device: str = "cpu") -> Sam:
    """The trained stand-in from ``out_dir`` (``medsam_standin.safetensors`` + ``medsam_standin.json``), in eval
    mode."""
    out = Path(out_dir)
    config = MedSAMConfig.from_dict(json.loads((out / CONFIG_NAME).read_text()))
    model = build_medsam(config)
    model.load_state_dict(load_file(str(out / WEIGHTS_NAME), device="cpu"), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------------
def _axial_areas(case: CTCase, structure: str) -> np.ndarray:
    plane = SlicePlane.create(case.geometry, Orientation.AXIAL)
    stack = plane.stack_view(case.labels) & np.uint16(1 << STRUCTURES.index(structure))
    return np.count_nonzero(stack, axis=(1, 2))


def largest_axial_slice(case: CTCase, structure: str) -> int | None:
    """Index of the axial slice where the structure's area is largest (first on ties); None if absent."""
    areas = _axial_areas(case, structure)
    return int(np.argmax(areas)) if areas.max() > 0 else None


def central_axial_slice(case: CTCase, structure: str) -> int | None:
    """Index of the structure's central axial slice: its centre of mass along the axial axis, rounded (the nearest
    slice that shows it, should that one not); None if absent."""
    areas = _axial_areas(case, structure)
    if areas.max() == 0:
        return None
    centre = float((areas * np.arange(len(areas))).sum() / areas.sum())
    shown = np.flatnonzero(areas)
    return int(shown[np.argmin(np.abs(shown - centre))])


SLICE_CHOICES = {"central": central_axial_slice, "largest": largest_axial_slice}


@torch.inference_mode()
def segment_interactive(model: Sam, images: np.ndarray, masks: np.ndarray, clicks: int = 5,
                        with_box: bool = True) -> dict:
    """Deterministic simulated sessions on a batch of slices: Dice after each click (1..``clicks``) and from the
    tight box. ``images`` (B, S, S) in [0, 1]; ``masks`` (B, S, S) bool."""
    device = next(model.parameters()).device
    size = images.shape[-1]
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device)
    embeddings = model.image_encoder(medsam_input(x))
    history: list[list] = [[(*first_click(m), 1)] for m in masks]
    per_click = np.zeros((len(masks), clicks))
    previous = None
    for k in range(clicks):
        low, iou = decode(model, embeddings, points=points_tensor(history, device), mask_input=previous, multimask=k == 0)
        chosen = iou.argmax(1)
        previous = select_masks(low, chosen)
        pred = (upsample_logits(previous, size)[:, 0] > 0).cpu().numpy()
        for i, m in enumerate(masks):
            per_click[i, k] = dice(pred[i], m)
            if k + 1 < clicks:
                click = corrective_click(pred[i], m)
                # exact already: repeat the last click (a no-op for the user, keeps the batch's counts equal)
                history[i].append(click if click is not None else history[i][-1])
    result = {"clicks": per_click}
    if with_box:
        low, _ = decode(model, embeddings, boxes=boxes_tensor([tight_box(m) for m in masks], device))
        pred = (upsample_logits(low, size)[:, 0] > 0).cpu().numpy()
        result["box"] = np.array([dice(p, m) for p, m in zip(pred, masks)])
    return result


def evaluate(model: Sam, val_cases: list[CTCase], clicks=(1, 3, 5), window: Window = EVAL_WINDOW,
             slice_choice: str = "central") -> dict:
    """Dice per structure from ``clicks`` simulated clicks and from a tight box, averaged over patients, on each
    structure's central axial slice (``slice_choice="central"``: :func:`central_axial_slice`) or its axial slice of
    largest area (``"largest"``); ``result["markdown"]`` is the table."""
    pick_slice = SLICE_CHOICES[slice_choice]
    model.eval()
    size = int(model.image_encoder.img_size)
    n_clicks = max(clicks)
    rows = []
    for case in val_cases:
        names, images, masks, indices = [], [], [], []
        for structure in STRUCTURES:
            index = pick_slice(case, structure)
            if index is None:
                continue
            s = cut_slice(case, Orientation.AXIAL, index, size)
            mask = s.mask(structure)
            if not mask.any():
                continue
            names.append(structure)
            images.append(window.apply(s.hu).astype(np.float32))
            masks.append(mask)
            indices.append(index)
        if not names:
            continue
        out = segment_interactive(model, np.stack(images), np.stack(masks), n_clicks)
        for i, name in enumerate(names):
            row = {"case": case.name, "structure": name, "slice": indices[i], "area_px": int(masks[i].sum()),
                   "box": float(out["box"][i])}
            row.update({f"clicks_{k}": float(out["clicks"][i, k - 1]) for k in clicks})
            rows.append(row)
    keys = [f"clicks_{k}" for k in clicks] + ["box"]
    per_structure = {}
    for name in STRUCTURES:
        sel = [r for r in rows if r["structure"] == name]
        if sel:
            per_structure[name] = {"n": len(sel), **{k: float(np.mean([r[k] for r in sel])) for k in keys}}
    overall = {k: float(np.mean([v[k] for v in per_structure.values()])) for k in keys} if per_structure else {}
    result = {"slice": {"central": "central axial slice (centre of mass along the axial axis)",
                        "largest": "axial slice of largest area"}[slice_choice], "window": [window.level, window.width],
              "clicks": list(clicks), "per_structure": per_structure, "mean_over_structures": overall, "rows": rows}
    result["markdown"] = dice_table(result)
    return result


def dice_table(result: dict) -> str:
    clicks = result["clicks"]
    head = "| Structure | n | " + " | ".join(f"{k} click{'s' if k > 1 else ''}" for k in clicks) + " | box |"
    lines = [head, "|" + "---|" * (len(clicks) + 3)]
    keys = [f"clicks_{k}" for k in clicks] + ["box"]
    for name, v in result["per_structure"].items():
        lines.append(f"| {name} | {v['n']} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |")
    if result["mean_over_structures"]:
        m = result["mean_over_structures"]
        lines.append("| **mean of structures** | | " + " | ".join(f"**{m[k]:.3f}**" for k in keys) + " |")
    return "\n".join(lines)


def plot_log(out_dir) -> Path | None:
    """``medsam_curves.png``: training loss and training Dice per prompt round; None without matplotlib."""
    opened = open_curves(Path(out_dir) / LOG_NAME)
    if opened is None:
        return None
    fig, axes, log, steps = opened
    axes[0].plot(steps, [e["loss"] for e in log], lw=1)
    axes[0].set_xlabel("step"), axes[0].set_title("MedSAM-like stand-in: loss (BCE + Dice + IoU MSE)")
    rounds = np.array([e["train_dice_per_round"] for e in log])
    for r in range(rounds.shape[1]):
        label = "first prompt (box or 1 click)" if r == 0 else f"+{r} corrective click{'s' if r > 1 else ''}"
        axes[1].plot(steps, rounds[:, r], lw=1, label=label)
    axes[1].set_ylim(0, 1), axes[1].set_xlabel("step"), axes[1].legend(fontsize=8)
    axes[1].set_title("training Dice per prompt round")
    return save_curves(fig, Path(out_dir) / "medsam_curves.png")


def write_report(out_dir, results: dict) -> Path:
    """``report.md`` in the run folder: what was trained and the Dice tables (``results``: slice choice -> result)."""
    out = Path(out_dir)
    text = "# MedSAM-like stand-in: Dice from simulated clicks and a box (validation-pats)\n\n"
    log_path = out / LOG_NAME
    if log_path.exists():
        info = json.loads(log_path.read_text())
        st, log = info["settings"], info["log"]
        minutes = log[-1]["elapsed_s"] / 60 if log else 0.0
        text += (f"Trained {st['steps']} steps (seed {st['seed']}) of {st['batch_size']} slices x "
                 f"{st['prompts_per_image']} structures, {st['iterations']} prompt rounds each, "
                 f"AdamW lr {st['lr']:g} (warmup + cosine); {len(st['train_cases'].split(','))} training patients; "
                 f"{minutes:.1f} min wall time in its last training session.")
        if st.get("p_propagate"):
            text += (f" {st['p_propagate']:.0%} of the slices prompted as propagation does (the neighbour's box, "
                     f"point and mask), {st.get('end_share', 0):.0%} of those stepping out of a structure's last "
                     "slice.")
        if st.get("init_from"):
            text += f" Fine-tuned from `{st['init_from']}`."
        text += "\n\n"
    text += ("Clicks are simulated deterministically: the first at the point of the structure farthest from its "
             "boundary, each next one at the centre of the largest error region (positive in a miss, negative in a "
             "leak), with the previous mask fed back; the box is the structure's tight bounding box. Soft-tissue "
             "window W350/L60, 128 px slices (OpenKBP's grid, 3.9 mm pixels).\n")
    for result in results.values():
        text += f"\n## On each structure's {result['slice']}\n\n{result['markdown']}\n"
        ptv = result["per_structure"].get("PTV70")
        if ptv and "clicks_3" in ptv:
            verdict = "meets" if ptv["clicks_3"] >= 0.80 else "misses"
            text += f"\nPTV70 from 3 clicks: {ptv['clicks_3']:.3f} ({verdict} the 0.80 target).\n"
    path = out / "report.md"
    path.write_text(text)
    return path


def run_evaluation(out_dir, val_dir=VAL_DIR, limit: int | None = None, threads: int = 1,
                   choices=("central", "largest")) -> dict:
    """Evaluate the trained model of ``out_dir``; writes eval.json/.md (central slice), eval_largest.json/.md,
    report.md and the curves."""
    torch.set_num_threads(int(threads))
    out = Path(out_dir)
    model, cases = load_trained(out), load_cases(val_dir, limit=limit)
    results = {}
    for choice in choices:
        t0 = time.perf_counter()
        result = evaluate(model, cases, slice_choice=choice)
        result["eval_seconds"] = round(time.perf_counter() - t0, 1)
        name = "eval" if choice == "central" else f"eval_{choice}"
        write_json(out / f"{name}.json", result)
        (out / f"{name}.md").write_text(f"Dice on each structure's {result['slice']}\n\n{result['markdown']}\n")
        results[choice] = result
    write_report(out, results)
    if (out / LOG_NAME).exists():
        plot_log(out)
    return results


# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.standins.medsam", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (resumes from OUT/checkpoint.pt), then evaluate on validation-pats")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=8, help="slices per step")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--iterations", type=int, default=4, help="prompt rounds per object (1 + corrective clicks)")
    t.add_argument("--prompts-per-image", type=int, default=2)
    t.add_argument("--axial-share", type=float, default=0.5)
    t.add_argument("--p-box", type=float, default=0.5)
    t.add_argument("--p-propagate", type=float, default=0.25,
                   help="share of slices prompted from their neighbour's masks, as 3D propagation does")
    t.add_argument("--end-share", type=float, default=0.0,
                   help="share of those stepping out of a structure's last slice (empty target)")
    t.add_argument("--init-from", default=None, help="start from this finished run's weights (fine-tuning)")
    t.add_argument("--focus", action="append", default=[], choices=STRUCTURES, metavar="STRUCTURE",
                   help="draw this structure more often (repeat for several; e.g. the targets PTV56/63/70)")
    t.add_argument("--focus-share", type=float, default=0.4,
                   help="share of images that show a --focus structure and prompt it first")
    t.add_argument("--zoom-share", type=float, default=0.0,
                   help="share of click/box images cropped around their first structure and enlarged (zoom-in)")
    t.add_argument("--config", default="standin", choices=sorted(MEDSAM_PRESETS))
    t.add_argument("--train-dir", default=str(TRAIN_DIR))
    t.add_argument("--limit", type=int, default=None, help="first N training patients only")
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; run again to go on)")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--no-eval", action="store_true")
    t.add_argument("--val-dir", default=str(VAL_DIR))
    e = sub.add_parser("evaluate", aliases=["eval"], help="Dice from 1/3/5 clicks and a box on validation-pats")
    e.add_argument("--out", required=True)
    e.add_argument("--val-dir", default=str(VAL_DIR))
    e.add_argument("--limit", type=int, default=None, help="first N validation patients only")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--slice", default="both", choices=["both", *sorted(SLICE_CHOICES)],
                   help="which axial slice per structure (default: both tables)")
    a = p.parse_args(argv)
    if a.command == "train":
        train(a.out, a.steps, seed=a.seed, batch_size=a.batch_size, threads=a.threads, resume=not a.no_resume,
              train_dir=a.train_dir, log_every=a.log_every, ckpt_every=a.ckpt_every, config=a.config, limit=a.limit,
              stop_at=a.stop_at, lr=a.lr, iterations=a.iterations, prompts_per_image=a.prompts_per_image,
              axial_share=a.axial_share, p_box=a.p_box, p_propagate=a.p_propagate, end_share=a.end_share,
              init_from=a.init_from, focus=tuple(a.focus), focus_share=a.focus_share, zoom_share=a.zoom_share)
        plot_log(a.out)
        if a.no_eval or (a.stop_at is not None and a.stop_at < a.steps):
            return
        run_evaluation(a.out, a.val_dir, threads=a.threads)
    else:
        choices = ("central", "largest") if a.slice == "both" else (a.slice,)
        run_evaluation(a.out, a.val_dir, a.limit, a.threads, choices)
    print((Path(a.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
