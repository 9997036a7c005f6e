"""The distillation loop: one config file per run, DDP with ``torchrun``, bit-exact resume, logs and curves.

    python -m training.distill.train --config training/distill/configs/cpu_vits256.json \\
        --cache training/runs/distill_cache_lite256 --out training/runs/distill_cpu_vits256
    torchrun --nproc_per_node 8 -m training.distill.train --config CONFIG --cache CACHE --out RUN   # GPUs

Determinism (what makes resume bit-exact and DDP equal to one process): everything random in a step is a function
of (seed, step) and of an item's place in the global batch: which cache items form the batch (an epoch-wise
permutation), the input resolution, the prompts, teacher dropping, and torch's own generator, which is re-seeded
every step. Rank ``r`` of ``w`` takes global batch positions ``r, r + w, ...``; losses are per-item means, so DDP's
averaged gradients are the whole batch's. The learning rate is a function of the step (no scheduler state). A
checkpoint (model, optimiser, step, config) is written atomically every ``checkpoint_every`` steps; ``metrics.jsonl``
is cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from PRISMRTLib.models.registry import spec_record
from PRISMRTLib.models.student import Student, StudentConfig, make_student_config

from .config import RunConfig
from .model import DistillModel, dense_fidelity, resize_images
from .phis import PhiS
from .targets import TargetCache

CHECKPOINT = "checkpoint.pt"


# ---- setup -------------------------------------------------------------------------------------------------------
def load_heads(config: RunConfig, device: str = "cpu"):
    """The teachers' specs (from their bundles) and the frozen parts the loss needs: SAM's prompt encoder and mask
    decoder (``teachers.sam_heads``) and CLIP's visual projection; plus the bundles, for the export."""
    from PRISMRTLib.features.resolve import model_folder
    from PRISMRTLib.models.bundle import TextHeads, load_bundle
    from PRISMRTLib.models.registry import teacher_set

    wanted = teacher_set(config.teachers.set)
    specs, bundles, heads, clip_heads = {}, {}, {}, None
    for role in wanted:
        name = config.teachers.sam_heads if role == "sam" and config.teachers.sam_heads else config.teachers.models[role]
        folder = model_folder(name)
        bundle = bundles.setdefault(str(Path(folder).resolve()), load_bundle(folder, device=device))
        if role not in bundle.teachers:
            raise ValueError(f"the model '{name}' has no {role} teacher")
        if bundle.teachers[role].name != wanted[role].name:
            raise ValueError(f"the '{config.teachers.set}' set's {role} teacher is '{wanted[role].name}', but '{name}' "
                             f"holds '{bundle.teachers[role].name}'")
        specs[role] = bundle.teachers[role]
        module = bundle.modules[role]
        if role == "sam":
            heads = {"prompt_encoder": module.prompt_encoder, "mask_decoder": module.mask_decoder}
        if role == "clip":
            clip_heads = TextHeads(module)
    return specs, heads, clip_heads, bundles


def build_student(config: RunConfig, specs: dict) -> Student:
    student_config = make_student_config(config.student.preset, specs, **config.student.overrides)
    torch.manual_seed(config.train.seed)
    student = Student(student_config)
    init = config.student.init
    if init.startswith("bundle:"):
        from PRISMRTLib.features.resolve import model_folder
        from PRISMRTLib.models.bundle import load_bundle

        source = load_bundle(model_folder(init[7:]))
        if source.kind != "prismrt":
            raise ValueError(f"student.init '{init}' is a '{source.kind}' bundle; it needs a prismrt one")
        student.load_state_dict(source.modules["student"].state_dict(), strict=True)
    elif init.startswith("run:"):
        pass  # the Run loads that run's student with its normalisers (_warm_start)
    elif init.startswith("timm:"):
        from safetensors.torch import load_file

        student.backbone.load_state_dict(load_file(init[5:]), strict=True)
    elif init == "teacher":
        student.backbone.load_state_dict(trunk_teacher_state(config, student), strict=True)
    elif init != "random":
        raise ValueError(f"student.init must be 'random', 'bundle:NAME', 'run:FOLDER', 'timm:FILE' or 'teacher', "
                         f"got '{init}'")
    if config.student.freeze_trunk:
        if student.trunk_outputs and init != "teacher":
            raise ValueError(f"a frozen {student.config.trunk} trunk stands in for its teacher's "
                             f"{', '.join(student.trunk_outputs)}: set student.init to 'teacher'")
        student.freeze_trunk()
    return student


TRUNK_TEACHER = {"litemedsam": ("sam", "image_encoder")}  # trunk -> (teacher role, the teacher module's part)


def trunk_teacher_state(config: RunConfig, student: Student) -> dict:
    """The state dict of the teacher part a trunk is (LiteMedSAM's image encoder for trunk "litemedsam")."""
    from PRISMRTLib.features.resolve import model_folder
    from PRISMRTLib.models.bundle import load_bundle

    if student.config.trunk not in TRUNK_TEACHER:
        raise ValueError(f"student.init 'teacher' needs a trunk that is a teacher's architecture "
                         f"({sorted(TRUNK_TEACHER)}), not '{student.config.trunk}'")
    role, part = TRUNK_TEACHER[student.config.trunk]
    bundle = load_bundle(model_folder(config.teachers.models[role]))
    return getattr(bundle.modules[role], part).state_dict()


def lr_at(step: int, config: RunConfig) -> float:
    t = config.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolution_at(step: int, config: RunConfig, default: int) -> int:
    """The input size of a step (``default``, the student's own, without a schedule)."""
    rng = np.random.default_rng([config.train.seed, 11, step])
    for until, sizes in config.train.resolutions:
        if step < until:
            return int(sizes[int(rng.integers(len(sizes)))])
    return int(config.train.resolutions[-1][1][-1]) if config.train.resolutions else int(default)


def split_items(cache_len: int, config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training items, and the held-back items of the fidelity curve (the cache's last ``eval_items``)."""
    n_eval = min(config.train.eval_items, cache_len // 4)
    return np.arange(cache_len - n_eval), np.arange(cache_len - n_eval, cache_len)


def global_batch(step: int, train_items: np.ndarray, config: RunConfig) -> np.ndarray:
    """The global batch of a step: consecutive positions of epoch-wise permutations of the training items."""
    b, n = config.train.batch_size, len(train_items)
    positions = np.arange(step * b, (step + 1) * b)
    out = []
    for epoch in np.unique(positions // n):
        perm = np.random.default_rng([config.train.seed, 7, int(epoch)]).permutation(n)
        out.extend(perm[positions[positions // n == epoch] % n])
    return train_items[np.array(out)]


def _optimizer(model: DistillModel, config: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.train.lr, betas=(0.9, 0.99))


# ---- the loop ----------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, config: RunConfig, cache: "str | Path", out: "str | Path", device: str | None = None,
                 log=None):
        log = log or (lambda *a, **k: print(*a, **k, flush=True))
        self.config, self.out = config, Path(out)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if config.train.batch_size % self.world:
            raise ValueError(f"batch_size {config.train.batch_size} does not split over {self.world} processes")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        torch.set_num_threads(config.train.threads)
        self.cache = TargetCache(cache)
        self.train_items, self.eval_items = split_items(len(self.cache), config)
        self.specs, heads, clip_heads, self.bundles = load_heads(config)
        self.student = build_student(config, self.specs)
        if config.train.grad_checkpointing and hasattr(self.student.backbone, "set_grad_checkpointing"):
            self.student.backbone.set_grad_checkpointing(True)
        if self.student.trunk_outputs:
            sizes = {s for _, ss in config.train.resolutions for s in ss}
            if config.cache.image_size != self.student.config.img_size or sizes - {self.student.config.img_size}:
                raise ValueError(f"a {self.student.config.trunk} trunk takes {self.student.config.img_size} px "
                                 "only: set cache.image_size to it and leave train.resolutions empty")
        self.model = DistillModel(self.student, config, heads,
                                  clip_heads.visual_proj if clip_heads is not None else None)
        if config.student.init.startswith("run:"):
            _warm_start(self.model, config, Path(config.student.init[4:]))
        else:
            self.model.fit_normalisers(self.cache.batch(self.train_items[:config.loss.normaliser_samples]),
                                       seed=config.train.seed)
        # the fidelity curve's normalisers are always PHI-S, so runs with other normalisers compare
        self.reference = {name: PhiS(n.channels).fit(_samples(self.cache, self.train_items, name,
                                                              config.loss.normaliser_samples), config.train.seed)
                          for name, n in self.model.normalisers.items()}
        self.model.to(self.device)
        self.optimizer = _optimizer(self.model, config)
        self.step = 0
        self.wrapped = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        self._resume()

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["config"] != self.config.to_dict():
            raise SystemExit(f"{self.out} holds a run of another config: resume with the config in "
                             f"{self.out / 'config.json'}, or choose another --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.rank == 0:
            _cut_log(self.out / "metrics.jsonl", self.step)
        self.log(f"resumed at step {self.step}")

    def save(self) -> None:
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": self.config.to_dict()}
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _reduce(self, values: dict) -> dict:
        if not self.distributed:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    # ---- one step ----------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        c, step = self.config, self.step
        torch.manual_seed(c.train.seed * 1_000_003 + step)
        items = global_batch(step, self.train_items, c)
        mine = np.arange(self.rank, len(items), self.world)
        batch = self.cache.batch(items[mine])
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        size = resolution_at(step, c, self.student.config.img_size)
        images = resize_images(batch["image"], size)
        rngs = [np.random.default_rng([c.train.seed, 13, step, int(p)]) for p in mine]
        step_rng = np.random.default_rng([c.train.seed, 17, step])
        lr = lr_at(step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (c.train.bf16 and self.device.type == "cuda") \
            else _null()
        with autocast:
            loss, info = self.wrapped(batch, images, rngs, step_rng, self._reduce)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.trainable(), c.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        # what is logged is the whole (global) batch's, as one process would see it
        logged = self._reduce({"loss": float(loss.detach()), **{k: v for k, v in info.items() if k.startswith(
            ("loss:", "role:"))}})
        return {"step": self.step, "lr": lr, "size": size, "grad_norm": float(norm), **info, **logged}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Fidelity on the held-back cache items: per target cosine and normalised MSE (PHI-S space), at each
        resolution of the schedule."""
        self.model.eval()
        out = {}
        sizes = sorted({s for _, ss in self.config.train.resolutions for s in ss} or {self.student.config.img_size})
        for start in range(0, len(self.eval_items), 8):
            batch = self.cache.batch(self.eval_items[start:start + 8])
            for size in sizes:
                images = resize_images(batch["image"].to(self.device), size)
                pred, _ = self.model.predict(images, batch)
                for name, z in pred.items():
                    raw = self.model.denormalise(name, z).cpu()
                    for key, value in dense_fidelity(raw, batch[name], self.reference[name]).items():
                        out.setdefault(f"{key}:{name}@{size}", []).append(value * len(images))
        n = len(self.eval_items)
        return {k: sum(v) / n for k, v in out.items()}

    def run(self, steps: int | None = None) -> None:
        """Train to ``train.steps`` (or ``steps`` more, to stop early and resume later)."""
        c = self.config.train
        end = c.steps if steps is None else min(c.steps, self.step + steps)
        metrics = self.out / "metrics.jsonl"
        t0 = time.time()
        while self.step < end:
            record = self.train_step()
            record["time_s"] = round(time.time() - t0, 2)
            if self.step % c.eval_every == 0 or self.step == c.steps:
                if self.rank == 0:
                    record["eval"] = self.evaluate()
                if self.distributed:
                    dist.barrier()
            if self.rank == 0 and (self.step % c.log_every == 0 or "eval" in record or self.step == end):
                with metrics.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in record.items() if k.startswith("loss:"))
                self.log(f"step {self.step}/{c.steps} loss {record['loss']:.4f} ({terms}) lr {record['lr']:.2e} "
                         f"{record['time_s']:.0f} s")
            if self.step % c.checkpoint_every == 0 or self.step == end:
                self.save()
        if self.rank == 0 and self.step == c.steps:
            plot(self.out)


def _warm_start(model: DistillModel, config: RunConfig, run: Path) -> None:
    """Another run's student (before folding) and its normalisers, taken together so the translators' outputs keep
    their meaning (a re-fit is not bit-identical: a summary token's 64 samples leave most of its PCA basis to
    rounding)."""
    source = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    if source.loss.normaliser != config.loss.normaliser or source.teachers.set != config.teachers.set:
        raise ValueError(f"student.init 'run:{run}': that run used normaliser '{source.loss.normaliser}' and teacher "
                         f"set '{source.teachers.set}'; this one '{config.loss.normaliser}' and "
                         f"'{config.teachers.set}': warm-start only from a run with the same ones")
    state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    taken = {k: v for k, v in state.items() if k.startswith(("student.", "normalisers."))}
    model.load_state_dict({**model.state_dict(), **taken}, strict=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _samples(cache: TargetCache, items: np.ndarray, name: str, n: int) -> torch.Tensor:
    x = cache.batch(items[:n])[name].float()
    if x.ndim == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:65536]]
    return x


def _cut_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def plot(run: "str | Path") -> Path | None:
    """``curves.png``: the loss terms and the fidelity curve of a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run = Path(run)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({k for r in records for k in r if k.startswith("loss:")})
    for key in keys:
        axes[0].plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label=key[5:])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=7)
    evals = [r for r in records if "eval" in r]
    for key in sorted({k for r in evals for k in r["eval"] if k.startswith("cosine:")}):
        axes[1].plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=key[7:])
    axes[1].set_xlabel("step")
    axes[1].set_title("fidelity on held-back views (cosine to the teacher)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, help="stop after this many more steps (resume later with the same command)")
    p.add_argument("--device")
    args = p.parse_args(argv)
    config = RunConfig.load(args.config)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        Run(config, args.cache, args.out, args.device).run(args.steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
