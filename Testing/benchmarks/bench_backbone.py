"""Cost of one student pass against the three teacher passes, in one run: parameters, FLOPs, latency per slice.

    python Testing/benchmarks/bench_backbone.py [--device cpu|cuda] [--repeats 3] [--threads N] [--markdown]

Models are the real architectures at full size (MedSAM = SAM ViT-B at 1024 px, DINOv3 ViT-B/16 at 512 px,
BiomedCLIP ViT-B/16 at 224 px; the PRISM-RT student ViT-B/16 with its translators at 256/512/1024 px), randomly
initialised: cost does not depend on the weights. Each row times what a task needs from a slice, i.e. the image
side only (the MedSAM prompt encoder/decoder and the BiomedCLIP text tower run the same in both backends).
FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions; 1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from PRISMRTLib.models.biomedclip import BIOMEDCLIP_PRESETS, ClipVisionTower, biomedclip_input
from PRISMRTLib.models.dinov3 import DINOV3_PRESETS, build_dinov3, dinov3_features, dinov3_input
from PRISMRTLib.models.medsam import MEDSAM_PRESETS, build_medsam, medsam_input
from PRISMRTLib.models.student import build_student, make_student_config


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn, x) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def _latency_ms(fn, x, repeats: int, device: str) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rows(device: str, repeats: int, student_preset: str = "vit_base"):
    torch.manual_seed(0)
    medsam = build_medsam(MEDSAM_PRESETS["vit_b"]).image_encoder.to(device)
    dino = build_dinov3(DINOV3_PRESETS["vit_base"]).to(device)
    clip_cfg = BIOMEDCLIP_PRESETS["vit_base"]
    clip = ClipVisionTower(clip_cfg).to(device).eval()
    student = build_student(make_student_config(student_preset, "official")).to(device)
    teachers = [
        ("MedSAM image encoder (SAM ViT-B)", medsam, 1024, lambda x: medsam(medsam_input(x))),
        ("DINOv3 ViT-B/16", dino, DINOV3_PRESETS["vit_base"].img_size, lambda x: dinov3_features(dino, dinov3_input(x))),
        ("BiomedCLIP image tower ViT-B/16", clip, clip_cfg.image_size, lambda x: clip(biomedclip_input(x))),
    ]
    out = []
    with torch.inference_mode():
        for name, module, size, fn in teachers:
            x = torch.rand(1, size, size, device=device)
            out.append((name, size, _params(module), _flops(fn, x), _latency_ms(fn, x, repeats, device)))
        teacher_total = ("three teachers together", None, sum(r[2] for r in out), sum(r[3] for r in out),
                         sum(r[4] for r in out))
        out.append(teacher_total)
        for size in (256, 512, 1024):
            x = torch.rand(1, size, size, device=device)
            out.append((f"PRISM-RT student ({student_preset}) + translators", size, _params(student),
                        _flops(student, x), _latency_ms(student, x, repeats, device)))
    return out, teacher_total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--student", default="vit_base", choices=("vit_base", "vit_small"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table, total = rows(args.device, args.repeats, args.student)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, median of {args.repeats}")
    print("| model | input px | params (M) | GFLOPs | latency / slice (ms) | latency vs 3 teachers |")
    print("|---|---|---|---|---|---|")
    for name, size, params, flops, ms in table:
        print(f"| {name} | {size or '-'} | {params / 1e6:.1f} | {flops / 1e9:.1f} | {ms:.0f} | {ms / total[4]:.2f}x |")


if __name__ == "__main__":
    main()
