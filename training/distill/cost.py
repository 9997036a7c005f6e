"""The cost table of issue #16: one student pass against the three official-size teachers and the actual teachers.

Every model is built with random weights on CPU in eval mode (cost does not depend on the weights) and measured in
the same run, on one (1, S, S) slice at its own input size:

- **FLOPs** of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix multiplications
  (mm/addmm/bmm/baddbmm, so Linear, einsum and matmul attention), convolutions and scaled-dot-product attention,
  each as 2 x multiply-accumulates. CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu``) is not in
  torch's table and is added here with torch's own SDPA formula. Not counted: element-wise ops, normalisations,
  softmax, activations, interpolation, pooling (a few percent for these ViTs);
- **parameters** of the module that runs (image encoders only: the SAM image encoder, the DINOv3 trunk, the
  BiomedCLIP visual tower; no prompt encoder, mask decoder or text tower);
- **CPU time** per image: the median of ``repeats`` timed passes after ``warmup`` untimed ones, batch 1, under
  ``torch.inference_mode``, with ``torch.set_num_threads(threads)``;
- **peak RSS** (optional, ``--memory``): each model is built and run once in a fresh subprocess; the number is its
  peak RSS (VmHWM, its mark reset just before building) after one pass minus the RSS at the reset (weights + one
  pass's working memory).

The student is :class:`PRISMRTLib.models.student.Student` for a preset at an input size, with its translators aimed
at a teacher set (``--teacher-set``, default "lite"); its FLOPs are also split into backbone and each translator.
Teachers run through :meth:`TeacherSpec.encode` (their preprocessing included) at their own input size::

    .venv/bin/python -m training.distill.cost [--students vit_small@256,vit_small@512,vit_base@512]
        [--teacher-set lite] [--threads 1] [--repeats 5] [--quick] [--memory] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from PRISMRTLib.models.registry import TEACHER_SETS, TeacherSpec, get_teacher

DEFAULT_STUDENTS = "vit_small@256,vit_small@512,vit_base@512"
FLOP_NOTE = (
    "FLOPs: torch.utils.flop_counter.FlopCounterMode, one forward pass of one image; matmul (mm/addmm/bmm/baddbmm: "
    "Linear, einsum, matmul attention), convolution and scaled-dot-product attention (CPU flash kernel added with "
    "torch's SDPA formula) counted as 2 x MACs; element-wise ops, normalisations, softmax, activations, "
    "interpolation and pooling not counted."
)


# ---- counting and timing -----------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV (torch's SDPA formula), from the shapes FlopCounterMode passes."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_mapping() -> dict:
    """Ops torch's flop table lacks that these models use on CPU."""
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:  # keyed by overload packet, as torch's table
        mapping[op] = _cpu_sdpa_flops
    return mapping


def count_flops(fn: Callable, *args) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn(*args)`` (2 x MACs, see :data:`FLOP_NOTE`): the total and the total per module path
    ("Student.translators.sam_embedding", ...; only modules called through ``__call__`` appear)."""
    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    with torch.inference_mode(), counter:
        fn(*args)
    by_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), by_module


def time_per_image(fn: Callable, *args, repeats: int = 5, warmup: int = 2) -> tuple[float, list[float]]:
    """Median milliseconds of ``repeats`` timed calls after ``warmup`` untimed ones (inference mode), and all."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- what is measured --------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """One model to measure: ``key`` rebuilds it (in a subprocess too), ``group`` is "student", "official" or
    "actual", ``role`` the teacher role or "student"."""

    key: str  # "student:<preset>@<px>:<target set>" or "teacher:<registry name>"
    model: str
    group: str
    role: str
    input_px: int


@dataclass
class Row:
    model: str
    group: str
    role: str
    input_px: int
    params: int
    flops: int
    ms: float
    times_ms: list = field(default_factory=list)
    peak_rss_mb: float | None = None
    flops_split: dict = field(default_factory=dict)  # student: backbone and each translator
    key: str = ""


def parse_students(text: str) -> list[tuple[str, int]]:
    """"vit_small@256,vit_base@512" -> [("vit_small", 256), ("vit_base", 512)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        preset, _, px = item.partition("@")
        if not px:
            raise ValueError(f"student '{item}': write preset@pixels, e.g. vit_small@256")
        px_i = int(px)
        if px_i % 16:
            raise ValueError(f"student '{item}': the input size must be a multiple of 16")
        out.append((preset, px_i))
    return out


def subjects(students: list[tuple[str, int]], teacher_set: str = "lite", official_set: str = "official",
             student_targets: str | None = None) -> list[Subject]:
    """The table's rows, in order: students, the official-size teachers, the actual teachers."""
    targets = student_targets or teacher_set
    for name in (teacher_set, official_set, targets):
        if name not in TEACHER_SETS:
            raise ValueError(f"unknown teacher set '{name}': choose one of {', '.join(TEACHER_SETS)}")
    rows = [Subject(f"student:{p}@{px}:{targets}", f"student {p}", "student", f"student (-> {targets})", px)
            for p, px in students]
    for group, set_name in (("official", official_set), ("actual", teacher_set)):
        for role, name in TEACHER_SETS[set_name].items():
            spec = get_teacher(name)
            rows.append(Subject(f"teacher:{name}", name, group, f"{group} teacher ({set_name}: {role})",
                                spec.input_size))
    return rows


class _Holder(nn.Module):
    """Only a teacher's image encoder, under the attribute its family's ``encode`` reads."""


def teacher_image_encoder(spec: TeacherSpec) -> nn.Module:
    """The part of a teacher that encodes an image: SAM's ``image_encoder``, the DINOv3 trunk, the CLIP ``visual``
    tower (built alone: no text tower), in a module :meth:`TeacherSpec.encode` accepts."""
    if spec.role == "clip":
        from PRISMRTLib.models.biomedclip import ClipVisionTower

        holder = _Holder()
        holder.visual = ClipVisionTower(spec.config)
        return holder.eval()
    module = spec.build()
    if spec.role == "sam":
        holder = _Holder()
        holder.image_encoder = module.image_encoder
        return holder.eval()
    return module.eval()


def build_subject(subject: Subject) -> tuple[nn.Module, Callable, torch.Tensor]:
    """(module, forward function, a (1, S, S) input in [0, 1]) for a subject, random weights, eval mode."""
    kind, _, rest = subject.key.partition(":")
    x = torch.rand(1, subject.input_px, subject.input_px, generator=torch.Generator().manual_seed(0))
    if kind == "student":
        from PRISMRTLib.models.student import build_student, make_student_config

        preset_px, _, targets = rest.partition(":")
        preset, _, px = preset_px.partition("@")
        model = build_student(make_student_config(preset, targets, img_size=int(px)))
        return model, model, x
    spec = get_teacher(rest)
    module = teacher_image_encoder(spec)
    box = (0, 0, spec.input_size, spec.input_size)
    return module, (lambda images: spec.encode(module, images, box)), x


def student_split(model: nn.Module, by_module: dict[str, int], total: int) -> dict[str, int]:
    """Backbone vs each translator (the backbone is everything that is not a translator: patch embedding, blocks,
    the input normalisation)."""
    root = type(model).__name__
    split = {name: by_module.get(f"{root}.translators.{name}", 0) for name in model.translators}
    return {"backbone": total - sum(split.values()), **{f"translator {k}": v for k, v in split.items()}}


def measure(subject: Subject, repeats: int = 5, warmup: int = 2) -> Row:
    module, fn, x = build_subject(subject)
    flops, by_module = count_flops(fn, x)
    ms, times = time_per_image(fn, x, repeats=repeats, warmup=warmup)
    row = Row(subject.model, subject.group, subject.role, subject.input_px, n_parameters(module), flops, ms,
              [round(t, 3) for t in times], key=subject.key)
    if subject.group == "student":
        row.flops_split = student_split(module, by_module, flops)
    return row


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``/proc/self/clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(key: str) -> float:
    """(In a fresh process.) Peak RSS growth over building a model and one pass, in MB: the peak mark (VmHWM) is
    reset just before building and read after the pass, against the RSS at the reset; without /proc, ``ru_maxrss``
    after minus before."""
    subject = Subject(key, key, "", "", 0)
    if key.startswith("student:"):
        subject.input_px = int(key.split("@")[1].split(":")[0])
    else:
        subject.input_px = get_teacher(key.partition(":")[2]).input_size
    import gc

    gc.collect()
    use_proc = _reset_peak() and _status_kb("VmHWM") is not None
    base_kb = _status_kb("VmRSS") if use_proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, fn, x = build_subject(subject)
    with torch.inference_mode():
        fn(x)
    peak_kb = _status_kb("VmHWM") if use_proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak_kb - base_kb) / 1024.0


def peak_rss_subprocess(key: str, threads: int) -> float | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "training.distill.cost", "--probe-memory", key, "--threads",
                           str(threads)], capture_output=True, text=True, env=env)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory probe for {key} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None


def run_table(students: list[tuple[str, int]], teacher_set: str = "lite", official_set: str = "official",
              student_targets: str | None = None, repeats: int = 5, warmup: int = 2, memory: bool = False,
              threads: int = 1, log: Callable[[str], None] | None = None) -> dict:
    """Measure every subject in this process (memory, if asked, in one subprocess per model) and compute ratios."""
    torch.set_num_threads(threads)
    rows: list[Row] = []
    done: dict[str, Row] = {}
    for subject in subjects(students, teacher_set, official_set, student_targets):
        if subject.key in done:  # the same teacher in both sets: measured once
            src = done[subject.key]
            row = Row(**{**asdict(src), "group": subject.group, "role": subject.role})
        else:
            if log:
                log(f"measuring {subject.model} at {subject.input_px} px ...")
            row = measure(subject, repeats=repeats, warmup=warmup)
            if memory:
                row.peak_rss_mb = peak_rss_subprocess(subject.key, threads)
            done[subject.key] = row
        rows.append(row)
    return {"rows": [asdict(r) for r in rows], "ratios": ratios(rows), "settings": settings(
        threads=threads, repeats=repeats, warmup=warmup, teacher_set=teacher_set, official_set=official_set,
        student_targets=student_targets or teacher_set, memory=memory)}


def ratios(rows: list) -> list[dict]:
    """Per student row: (sum over a teacher group) / student, for FLOPs and CPU time."""
    rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
    totals = {}
    for group in ("official", "actual"):
        members = [r for r in rows if r["group"] == group]
        totals[group] = (sum(r["flops"] for r in members), sum(r["ms"] for r in members))
    out = []
    for r in rows:
        if r["group"] != "student":
            continue
        item = {"model": r["model"], "input_px": r["input_px"]}
        for group, (flops, ms) in totals.items():
            item[f"{group}_flops_ratio"] = flops / r["flops"] if r["flops"] else float("inf")
            item[f"{group}_time_ratio"] = ms / r["ms"] if r["ms"] else float("inf")
            item[f"{group}_total_flops"] = flops
            item[f"{group}_total_ms"] = ms
        out.append(item)
    return out


def settings(**kw) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {**kw, "torch": torch.__version__, "cpu": cpu, "python": platform.python_version(),
            "flop_counting": FLOP_NOTE, "memory_note": (
                "peak RSS: growth of the process's peak RSS (VmHWM, reset just before building) over building and one "
                "pass, one fresh subprocess per model (weights + one pass's working memory; allocator caches "
                "included)" if kw.get("memory") else "memory not measured "
                "(run with --memory: one subprocess per model)")}


# ---- output ------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    rows, s = result["rows"], result["settings"]
    mem = bool(s.get("memory"))
    head = "| model | role | input px | params (M) | GFLOPs | CPU ms/image |" + (" peak RSS (MB) |" if mem else "")
    lines = [head, "|" + "---|" * (6 + mem)]
    for r in rows:
        line = (f"| {r['model']} | {r['role']} | {r['input_px']} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} "
                f"| {r['ms']:.1f} |")
        if mem:
            line += f" {r['peak_rss_mb']:.0f} |" if r["peak_rss_mb"] is not None else " - |"
        lines.append(line)
    off, act = s["official_set"], s["teacher_set"]
    lines += ["", f"| student | input px | {off} teachers / student, FLOPs | {off} / student, CPU time "
                  f"| {act} teachers / student, FLOPs | {act} / student, CPU time |", "|---|---|---|---|---|---|"]
    for q in result["ratios"]:
        lines.append(f"| {q['model']} | {q['input_px']} | {q['official_flops_ratio']:.1f}x | "
                     f"{q['official_time_ratio']:.1f}x | {q['actual_flops_ratio']:.1f}x | "
                     f"{q['actual_time_ratio']:.1f}x |")
    if result["ratios"]:
        q = result["ratios"][0]
        lines.append(f"\nTeacher totals: {off} {q['official_total_flops'] / 1e9:.1f} GFLOPs, "
                     f"{q['official_total_ms']:.0f} ms; {act} {q['actual_total_flops'] / 1e9:.1f} GFLOPs, "
                     f"{q['actual_total_ms']:.0f} ms (one image each, at each teacher's own input size).")
    students = [r for r in rows if r["group"] == "student"]
    if students:
        names = list(students[0]["flops_split"])
        lines += ["", "| student | input px | " + " | ".join(f"{n} GFLOPs" for n in names) + " |",
                  "|" + "---|" * (2 + len(names))]
        for r in students:
            lines.append(f"| {r['model']} | {r['input_px']} | "
                         + " | ".join(f"{r['flops_split'].get(n, 0) / 1e9:.3f}" for n in names) + " |")
    lines += ["", f"CPU: {s['cpu']}; torch {s['torch']}; {s['threads']} thread(s); batch 1; median of "
                  f"{s['repeats']} timed passes after {s['warmup']} warm-up; random weights, eval mode, "
                  "torch.inference_mode. Teachers: image encoders only, their preprocessing included.",
              s["flop_counting"], s["memory_note"] + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default=DEFAULT_STUDENTS, help="preset@px, comma-separated")
    ap.add_argument("--teacher-set", default="lite", help="the actual teachers (and the student's targets)")
    ap.add_argument("--official-set", default="official", help="the official-size teachers")
    ap.add_argument("--student-targets", default=None, help="teacher set the student's translators aim at "
                                                            "(default: --teacher-set)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per model (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 2; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--memory", action="store_true", help="peak RSS per model, one subprocess each")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(f"{probe_memory(args.probe_memory):.1f}")
        return 0
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    result = run_table(parse_students(args.students), args.teacher_set, args.official_set, args.student_targets,
                       repeats=repeats, warmup=warmup, memory=args.memory, threads=args.threads,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
