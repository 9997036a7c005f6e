"""The distillation's data: label-free views of every training CT, and a sharded cache of the teachers' features.

A *view* is one slice of a CT (axial, coronal or sagittal), optionally cropped to a smaller field of view (scale
augmentation: structures appear at the sizes a zoomed clinical CT shows them), windowed with a jittered preset (soft
tissue, lung, head and neck, bone) and letterboxed top-left with square pixels, exactly as inference prepares a slice
(window first, then :class:`PRISMRTLib.imaging.Letterbox`). The plan is counter-based: view ``n`` depends only on
(seed, n), so a build stops and resumes, and grows by raising ``items``.

Each teacher sees the view rendered at its own input size (LiteMedSAM 256 px, the stand-ins 128 px) and its
features are stored per shard: ``images`` (N, S, S) uint8 at the cache's image size (what the student sees; other
student sizes are resampled from it), ``body`` (N, S*S/8) bit-packed (HU > -400: where prompts are placed),
``sam_embedding`` int8 with per item and channel scales (``sam_embedding_scale``, float16) or float16, the other
features float16. ``shards.json`` records each finished shard's SHA-256, checked when a shard is read.

Sources (``../shared/data``): OpenKBP ``train-pats`` (170 head-and-neck CTs, 3.9 mm), the NSCLC-Radiomics planning
CTs LUNG1-001/002 (0.98 mm; images only, label-free, as the click heads were trained on them), TotalSegmentator's
abdomen-pelvis CT and contrast chest CT. Held out (the evaluation's images): OpenKBP ``validation-pats``, the
sarcomas STS_001/002, the IBSI phantom PAT1 (a crop of LUNG1-002), ``ts_ct_dicom`` and the MR pair. LUNG1-001/002
are training *images* while their GTVs are evaluation targets: the evaluation reports them apart from the unseen
sarcomas.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from PRISMRTLib.imaging import Geometry, Letterbox, SlicePlane, read_image
from PRISMRTLib.imaging.intensity import Window
from PRISMRTLib.imaging.resize import crop_with_padding
from PRISMRTLib.weights.cache import sha256_file

from training.views import WINDOW_WEIGHTS, WINDOWS, weighted_choice

from .config import CacheConfig, RunConfig

PLAN_VERSION = 1
ITEMS_PER_SHARD = 16
AIR_HU = -1024.0
BODY_HU = -400.0
HELD_OUT = {
    "openkbp": "validation-pats (all 33: the delineation and registration evaluations)",
    "clinical": "STS_001, STS_002, PAT1 (IBSI phantom; a crop of LUNG1-002). LUNG1-001/002 images are in training "
                "(label-free); their GTVs are evaluation targets",
    "samples": "ts_ct_dicom (the liver / spleen click test), mr_brain_tumor_pair",
}


def shared_data() -> Path:
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("PRISMRT_SHARED_DATA", repo.parent / "shared" / "data"))


@dataclass
class CTVolume:
    name: str
    source: str
    hu: np.ndarray  # (k, j, i) int16
    geometry: Geometry


def _load(path: Path, name: str, source: str) -> CTVolume:
    ct = read_image(path)
    hu = np.clip(sitk.GetArrayFromImage(ct), -1024, 3071).astype(np.int16)
    return CTVolume(name, source, hu, Geometry.from_image(ct))


def training_cts(data: Path | None = None, sources=("openkbp", "lung1", "ts_abdomen", "ts_aorta"),
                 openkbp_limit: int | None = None) -> dict[str, list[CTVolume]]:
    """The training CTs by source (images only); sources whose data is absent are left out."""
    data = Path(data) if data is not None else shared_data()
    out: dict[str, list[CTVolume]] = {}
    if "openkbp" in sources and (data / "openkbp" / "train-pats").is_dir():
        folders = sorted((data / "openkbp" / "train-pats").glob("pt_*"), key=lambda p: int(p.name.split("_")[1]))
        out["openkbp"] = [_load(f / "ct.nii.gz", f.name, "openkbp") for f in folders[:openkbp_limit]]
    lung = data / "clinical" / "nsclc_radiomics_lung1"
    if "lung1" in sources and lung.is_dir():
        out["lung1"] = [_load(f / "ct.nii.gz", f.name, "lung1") for f in sorted(lung.glob("LUNG1-*"))
                        if (f / "ct.nii.gz").exists()]
    abdomen = data / "samples" / "ts_abdomen_ct" / "example_ct.nii.gz"
    if "ts_abdomen" in sources and abdomen.exists():
        out["ts_abdomen"] = [_load(abdomen, "ts_abdomen", "ts_abdomen")]
    aorta = data / "samples" / "ts_chest_cta_aorta"
    if "ts_aorta" in sources and aorta.is_dir():
        path = aorta / "ct.nii.gz" if (aorta / "ct.nii.gz").exists() else aorta / "ct_cropped.nii.gz"
        if path.exists():
            out["ts_aorta"] = [_load(path, "ts_aorta", "ts_aorta")]
    return {k: v for k, v in out.items() if v}


@dataclass
class ViewSpec:
    source: str
    volume: str
    orientation: str
    index: int
    crop: tuple[float, float, float, float]  # (row0, col0, rows, cols) in slice pixels; may reach outside
    window: tuple[float, float]  # (level, width) HU


class Planner:
    """View ``n`` of the plan (counter-based): source, CT, orientation, slice with body in it, crop, window."""

    def __init__(self, volumes: dict[str, list[CTVolume]], config: CacheConfig):
        self.volumes, self.config = volumes, config
        self.weights = {k: v for k, v in config.sources.items() if k in volumes and v > 0}
        if not self.weights:
            raise ValueError(f"none of the sources {sorted(config.sources)} has data here")
        self._planes: dict = {}
        self._body: dict = {}

    def plane(self, volume: CTVolume, orientation: str) -> SlicePlane:
        key = (volume.name, orientation)
        if key not in self._planes:
            self._planes[key] = SlicePlane.create(volume.geometry, orientation)
        return self._planes[key]

    def body_slices(self, volume: CTVolume, orientation: str) -> np.ndarray:
        """Slices with at least 2 % of their pixels in the body (above -400 HU)."""
        key = (volume.name, orientation)
        if key not in self._body:
            stack = self.plane(volume, orientation).stack_view(volume.hu > BODY_HU)
            share = stack.reshape(len(stack), -1).mean(1)
            self._body[key] = np.flatnonzero(share >= 0.02)
        return self._body[key]

    def plan(self, n: int) -> ViewSpec:
        c = self.config
        rng = np.random.default_rng([c.seed, PLAN_VERSION, int(n)])
        source = weighted_choice(rng, self.weights)
        volumes = self.volumes[source]
        volume = volumes[int(rng.integers(len(volumes)))]
        orientation = weighted_choice(rng, c.orientations)
        plane = self.plane(volume, orientation)
        slices = self.body_slices(volume, orientation)
        index = int(slices[int(rng.integers(len(slices)))]) if len(slices) else int(rng.integers(plane.num_slices))
        rows, cols = plane.slice_shape
        sr, sc = plane.pixel_spacing
        crop = (0.0, 0.0, float(rows), float(cols))
        if rng.random() < c.crop_share:
            side_mm = max(rows * sr, cols * sc) * float(rng.uniform(*c.crop_range))
            h, w = side_mm / sr, side_mm / sc
            body = np.argwhere(plane.extract(volume.hu, index) > BODY_HU)
            centre = body[int(rng.integers(len(body)))].astype(float) if len(body) else np.array([rows, cols]) / 2
            crop = (float(centre[0] - h / 2), float(centre[1] - w / 2), float(h), float(w))
        preset = weighted_choice(rng, WINDOW_WEIGHTS.get(source, WINDOW_WEIGHTS["ts_abdomen"]))
        level, width = WINDOWS[preset]
        window = (level + float(rng.normal(0, 0.08 * width)), max(50.0, width * float(np.exp(rng.normal(0, 0.2)))))
        return ViewSpec(source, volume.name, orientation, index, crop, window)


def render(volume: CTVolume, plane: SlicePlane, spec: ViewSpec, sizes) -> dict:
    """The view at each size: {size: (image01 float32 (S, S), Letterbox)}, plus "body": bool (S0, S0) at the
    first size. Windowed first, then letterboxed (as inference does)."""
    r0, c0, h, w = spec.crop
    in_shape = (max(1, int(round(h))), max(1, int(round(w))))
    hu = plane.extract(volume.hu, spec.index).astype(np.float32)
    window = Window(*spec.window)
    windowed = crop_with_padding(window.apply(hu).astype(np.float32), r0, c0, in_shape, 0.0)
    body = crop_with_padding((hu > BODY_HU).astype(np.float32), r0, c0, in_shape, 0.0)
    out = {}
    for k, size in enumerate(sizes):
        box = Letterbox.fit(in_shape, plane.pixel_spacing, int(size))
        image = np.clip(box.resize_to_model(windowed, order=1, pad_value=0.0), 0.0, 1.0)
        out[int(size)] = (image.astype(np.float32), box)
        if k == 0:
            out["body"] = box.resize_to_model(body, order=1, pad_value=0.0, antialias=False) > 0.5
    return out


# ---- teachers ----------------------------------------------------------------------------------------------------
class TeacherEncoders:
    """The run's teachers (registry specs, weights from the configured models), frozen, in inference mode."""

    def __init__(self, config: RunConfig, device: str = "cpu"):
        from PRISMRTLib.features.backends import teachers_of
        from PRISMRTLib.features.resolve import model_folder
        from PRISMRTLib.models.bundle import load_bundle
        from PRISMRTLib.models.registry import teacher_set

        wanted = teacher_set(config.teachers.set)
        self.teachers = {}
        bundles = {}
        for role, spec in wanted.items():
            model = config.teachers.models.get(role)
            if model is None:
                raise ValueError(f"teachers.models has no model for the '{role}' role")
            folder = model_folder(model)
            key = str(Path(folder).resolve())
            bundles.setdefault(key, load_bundle(folder, device=device))
            teachers = teachers_of(bundles[key])
            if role not in teachers:
                raise ValueError(f"the model '{model}' has no {role} teacher")
            teacher = teachers[role]
            if teacher.spec.name != spec.name:
                raise ValueError(f"the '{config.teachers.set}' set's {role} teacher is '{spec.name}', but '{model}' "
                                 f"holds '{teacher.spec.name}'")
            teacher.module.eval().requires_grad_(False)
            self.teachers[role] = teacher
        self.device = device

    @property
    def sizes(self) -> list[int]:
        return sorted({t.spec.input_size for t in self.teachers.values()})

    @torch.inference_mode()
    def encode(self, views: dict) -> dict[str, torch.Tensor]:
        """One rendered view -> every teacher's features (batch of one), ``clip_embedding`` included."""
        out = {}
        for role, teacher in self.teachers.items():
            image, box = views[teacher.spec.input_size]
            x = torch.from_numpy(image)[None].to(self.device)
            out.update(teacher.spec.encode(teacher.module, x, box.content_box))
        return {k: v.float().cpu() for k, v in out.items()}


# ---- cache -------------------------------------------------------------------------------------------------------
def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) float -> int8 values and float16 per-channel scales (symmetric)."""
    scale = np.abs(x).reshape(len(x), -1).max(1) / 127.0
    scale = np.maximum(scale, 1e-8).astype(np.float16)
    q = np.clip(np.round(x / scale.astype(np.float32)[:, None, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantise_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None, None]


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_shard(out: Path, shard: int, arrays: dict[str, list], specs: list[dict], shards: dict) -> str:
    """Write shard ``shard`` atomically and record its SHA-256 in ``shards`` and ``shards.json``."""
    file = f"shard_{shard:05d}.npz"
    tmp = out / f".{file}.tmp.npz"
    np.savez(tmp, **{k: np.stack(v) for k, v in arrays.items()},
             items=np.frombuffer(json.dumps(specs).encode(), np.uint8))
    os.replace(tmp, out / file)
    shards[file] = {"sha256": sha256_file(out / file), "items": len(specs)}
    _write_json(out / "shards.json", dict(sorted(shards.items())))
    return file


def cache_settings(config: RunConfig, teachers: "TeacherEncoders | None" = None) -> dict:
    c = asdict(config.cache)
    c.pop("items")
    settings = {"plan_version": PLAN_VERSION, "items_per_shard": ITEMS_PER_SHARD, **json.loads(json.dumps(c)),
                "teacher_set": config.teachers.set, "teacher_models": config.teachers.models}
    if teachers is not None:
        settings["teachers"] = {role: t.model for role, t in teachers.teachers.items()}
    return settings


def build(config: RunConfig, out: Path, threads: int = 1, openkbp_limit: int | None = None, device: str = "cpu",
          data: Path | None = None, log=print) -> Path:
    """Build, resume or extend the cache to ``config.cache.items`` views."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    teachers = TeacherEncoders(config, device)
    settings = {**cache_settings(config, teachers), "openkbp_limit": openkbp_limit}
    index_path, shards_path = out / "index.json", out / "shards.json"
    if index_path.exists():
        stored = json.loads(index_path.read_text())["settings"]
        if stored != settings:
            raise SystemExit(f"{out} was built with other settings ({stored}); use another folder")
    _write_json(index_path, {"settings": settings, "held_out": HELD_OUT})
    shards = json.loads(shards_path.read_text()) if shards_path.exists() else {}
    log("loading CTs ...")
    volumes = training_cts(data, tuple(config.cache.sources), openkbp_limit)
    by_name = {(s, v.name): v for s, vs in volumes.items() for v in vs}
    planner = Planner(volumes, config.cache)
    size = config.cache.image_size
    sizes = [size] + [s for s in teachers.sizes if s != size]
    n_shards = -(-config.cache.items // ITEMS_PER_SHARD)
    start, built_now = time.time(), 0
    for shard in range(n_shards):
        file = f"shard_{shard:05d}.npz"
        if file in shards and (out / file).exists():
            continue
        t0 = time.time()
        specs, arrays = [], {}
        for k in range(ITEMS_PER_SHARD):
            n = shard * ITEMS_PER_SHARD + k
            spec = planner.plan(n)
            volume = by_name[(spec.source, spec.volume)]
            plane = planner.plane(volume, spec.orientation)
            views = render(volume, plane, spec, sizes)
            features = teachers.encode(views)
            row = {"images": np.round(views[size][0] * 255).astype(np.uint8),
                   "body": np.packbits(views["body"].reshape(-1))}
            for name, tensor in features.items():
                value = tensor[0].numpy()
                if name == "sam_embedding" and config.cache.sam_dtype == "int8":
                    row[name], row[name + "_scale"] = quantise_int8(value)
                else:
                    row[name] = value.astype(np.float16)
            for key, value in row.items():
                arrays.setdefault(key, []).append(value)
            box = views[size][1]
            specs.append({**asdict(spec), "n": n, "content_box": list(box.content_box),
                          "mm_per_pixel": float(max(box.in_shape[0] * plane.pixel_spacing[0],
                                                    box.in_shape[1] * plane.pixel_spacing[1]) / size)})
        write_shard(out, shard, arrays, specs, shards)
        built_now += 1
        done = sum(1 for f in shards if int(f[6:11]) < n_shards)
        eta = (time.time() - start) / built_now * (n_shards - done)
        log(f"{file}: {time.time() - t0:.0f} s ({done}/{n_shards} shards; ~{eta / 60:.0f} min left)")
    return out


class TargetCache:
    """A built cache: item ``i`` -> the student's image and the teachers' features (float32 tensors). Shards are
    verified against ``shards.json`` when first read and kept in memory (a few hundred MB for a CPU run)."""

    def __init__(self, folder: "str | Path", max_items: int | None = None, verify: bool = True):
        self.folder = Path(folder)
        if not (self.folder / "shards.json").exists():
            raise FileNotFoundError(f"{self.folder} is not a built target cache (no shards.json): build it with "
                                    "'python -m training.distill.targets build --config CONFIG --out FOLDER'")
        self.settings = json.loads((self.folder / "index.json").read_text())["settings"]
        shards = json.loads((self.folder / "shards.json").read_text())
        self.files = sorted(shards)
        if max_items is not None:
            self.files = self.files[: -(-max_items // ITEMS_PER_SHARD)]
        self._sha = {f: shards[f]["sha256"] for f in self.files}
        self.verify = verify
        self._loaded: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.files) * ITEMS_PER_SHARD

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])

    def _shard(self, file: str) -> dict:
        if file not in self._loaded:
            path = self.folder / file
            if self.verify and sha256_file(path) != self._sha[file]:
                raise ValueError(f"{path} does not match its SHA-256 in shards.json: delete it and run build again")
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            data["items"] = json.loads(data["items"].tobytes().decode())
            self._loaded[file] = data
        return self._loaded[file]

    def item(self, i: int) -> dict:
        data = self._shard(self.files[i // ITEMS_PER_SHARD])
        k = i % ITEMS_PER_SHARD
        size = self.image_size
        out = {"image": torch.from_numpy(data["images"][k].astype(np.float32) / 255.0),
               "body": torch.from_numpy(np.unpackbits(data["body"][k])[: size * size].reshape(size, size).astype(bool)),
               "spec": data["items"][k]}
        for name in data:
            if name in ("images", "body", "items") or name.endswith("_scale"):
                continue
            value = data[name][k]
            if name + "_scale" in data:
                value = dequantise_int8(value, data[name + "_scale"][k])
            out[name] = torch.from_numpy(value.astype(np.float32))
        return out

    def batch(self, indices) -> dict:
        items = [self.item(int(i)) for i in indices]
        out = {"spec": [it["spec"] for it in items]}
        for key in items[0]:
            if key != "spec":
                out[key] = torch.stack([it[key] for it in items])
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or resume, or extend) the target cache of a run config")
    b.add_argument("--config", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--items", type=int, help="override the config's cache.items")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--openkbp-limit", type=int)
    b.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    config = RunConfig.load(args.config)
    if args.items:
        config.cache.items = args.items
    build(config, args.out, args.threads, args.openkbp_limit, args.device)


if __name__ == "__main__":
    main()
