"""LiteMedSAM's TinyViT image encoder (the shipped student's trunk and the SAM teacher) in PyTorch's default
(NCHW) and channels_last memory layouts, on the CPU, in one run: the two layouts are timed in alternation so that
load from other processes falls on both alike.

    python Testing/benchmarks/bench_memory_format.py [--threads 1 2] [--batch 1 8] [--repeats 5]

The weights are random (the cost does not depend on them); the outputs of the two layouts are compared too.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from PRISMRTLib.models.litemedsam import LITEMEDSAM_PRESETS, build_image_encoder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = LITEMEDSAM_PRESETS["released"]
    default = build_image_encoder(config).eval()
    last = copy.deepcopy(default).to(memory_format=torch.channels_last)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"TinyViT at {config.img_size} px, median of {args.repeats} (alternating layouts, after a warm-up)\n")
    print("| threads | batch | NCHW (ms / image) | channels_last (ms / image) | channels_last vs NCHW | max abs diff |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                x = torch.rand(batch, 3, config.img_size, config.img_size)
                a, b = default(x), last(x)  # warm-up, and the outputs to compare
                diff = float((a - b).abs().max())
                times = {"nchw": [], "last": []}
                for _ in range(args.repeats):
                    for name, model in (("nchw", default), ("last", last)):
                        t0 = time.perf_counter()
                        model(x)
                        times[name].append((time.perf_counter() - t0) / batch * 1000)
                nchw, cl = statistics.median(times["nchw"]), statistics.median(times["last"])
                print(f"| {threads} | {batch} | {nchw:.0f} | {cl:.0f} | {cl / nchw:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
