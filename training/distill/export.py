"""A trained run -> a ``prismrt`` bundle: the student with the PHI-S inverse folded into each translator's last layer,
the SAM heads delineation runs (``teachers.sam_heads``) and the CLIP teacher's text tower, projection and vocabulary.

    python -m training.distill.export --run training/runs/distill_cpu_vits256 --out PRISMRTLib/weights/shipped/prismrt-student/1

The bundle's translators then give each teacher's own features (checked here: the exported student's outputs must
equal the training model's denormalised predictions on the run's held-back views), so SAM's decoder and the chat's
text tower read them unchanged.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from PRISMRTLib.models.bundle import TextHeads, components_of, save_bundle
from PRISMRTLib.models.registry import spec_record

from .config import RunConfig
from .model import DistillModel, last_layers
from .phis import fold_into
from .targets import HELD_OUT
from .train import CHECKPOINT, build_student, load_heads


def folded_student(model: DistillModel):
    """A copy of the run's student whose translators output the teachers' features (normalisation folded in)."""
    student = copy.deepcopy(model.student).float().eval()
    for name, layer in last_layers(student).items():
        fold_into(layer, model.normalisers[name])
    return student


def load_run(run: Path) -> tuple[RunConfig, DistillModel, dict, dict]:
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    specs, heads, clip_heads, bundles = load_heads(config)
    student = build_student(config, specs)
    model = DistillModel(student, config, heads, clip_heads.visual_proj if clip_heads is not None else None)
    state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return config, model.eval(), {"specs": specs, "heads": heads, "clip_heads": clip_heads, "bundles": bundles}, state


def _heads_model(config: RunConfig, bundles: dict) -> str:
    """"NAME VERSION" of the bundle whose SAM prompt encoder and mask decoder the student ships (and delineation's
    propagation rule follows: ``registry.propagation_rule``)."""
    from PRISMRTLib.features.resolve import model_folder

    name = config.teachers.sam_heads or config.teachers.models["sam"]
    bundle = bundles[str(Path(model_folder(name)).resolve())]
    return f"{bundle.name} {bundle.version}"


def export(run: "str | Path", out: "str | Path", name: str = "prismrt-student", version: str = "1",
           overwrite: bool = False, check_images: torch.Tensor | None = None) -> Path:
    run = Path(run)
    config, model, parts, state = load_run(run)
    student = folded_student(model)
    if check_images is not None:
        with torch.no_grad():
            pred, _ = model.predict(check_images)
            direct = student(check_images)
        for key, z in pred.items():
            want = model.denormalise(key, z)
            err = float((direct[key] - want).abs().max() / want.abs().max().clamp(min=1e-12))
            if err > 1e-4:
                raise RuntimeError(f"folding the normaliser changed '{key}' (relative error {err:.2e})")
    specs = parts["specs"]
    configs = {"teachers": {role: spec_record(spec) for role, spec in specs.items()},
               "student": student.config.to_dict()}
    modules = {"student": student}
    if "sam" in specs:
        modules.update(prompt_encoder=parts["heads"]["prompt_encoder"], mask_decoder=parts["heads"]["mask_decoder"])
    vocab = None
    if "clip" in specs:
        modules["clip_heads"] = parts["clip_heads"]
        clip_bundle = next(b for b in parts["bundles"].values() if "clip" in b.teachers)
        vocab = clip_bundle.path / "vocab.txt"
    missing = set(components_of("prismrt", configs)) - set(modules)
    if missing:
        raise RuntimeError(f"cannot export: missing components {sorted(missing)}")
    meta = {"run": run.name, "steps": int(state["step"]), "config": config.to_dict(),
            "teacher_models": {role: config.teachers.models[role] for role in specs},
            "sam_heads": _heads_model(config, parts["bundles"]) if "sam" in specs else "",
            "held_out": HELD_OUT}
    return save_bundle(out, "prismrt", configs, modules, vocab, name=name, version=version, meta=meta,
                       overwrite=overwrite, float_dtype=torch.float16, base=_trunk_base(config, student))


def _trunk_base(config: RunConfig, student) -> dict | None:
    """A frozen trunk taken from a teacher is not stored: the bundle names that teacher's model as its base (as the
    click heads do for LiteMedSAM's encoder), so its weights stay the released ones, in float32, verified by digest."""
    from PRISMRTLib.features.resolve import model_folder
    from PRISMRTLib.models.bundle import load_bundle
    from PRISMRTLib.models.registry import tensor_digest

    from .train import TRUNK_TEACHER, trunk_teacher_state

    if not (student.trunk_frozen and config.student.init == "teacher"):
        return None
    role, part = TRUNK_TEACHER[student.config.trunk]
    teacher = trunk_teacher_state(config, student)
    mine = student.backbone.state_dict()
    if tensor_digest(teacher) != tensor_digest(mine):
        raise RuntimeError("the frozen trunk's weights differ from its teacher's: export it without a base")
    model = config.teachers.models[role]  # a manifest name (shipped students) or a folder (local runs, tests)
    source = load_bundle(model_folder(model))
    return {"model": model, "version": source.version, "components": {"student.backbone": f"{role}.{part}"}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="prismrt-student")
    p.add_argument("--version", default="1")
    p.add_argument("--cache", type=Path, help="check the folded student against the run on these views")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    images = None
    if args.cache:
        from .targets import TargetCache

        cache = TargetCache(args.cache)
        images = cache.batch(range(len(cache) - 4, len(cache)))["image"]
    print(export(args.run, args.out, args.name, args.version, args.overwrite, images))


if __name__ == "__main__":
    main()
