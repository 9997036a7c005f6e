"""One run of the distillation, described by one JSON file (``training/distill/configs/*.json``).

Every field has a default, so a config names only what it changes; unknown keys are refused (a typo would otherwise
be a silent default). The resolved config is written into the run folder and a resumed run must match it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TeacherConfig:
    set: str = "lite"  # a registry teacher set (PRISMRTLib.models.registry.TEACHER_SETS)
    # where each role's weights come from: a manifest name or a bundle folder (the registry names the architecture)
    models: dict = field(default_factory=lambda: {"sam": "litemedsam", "dino": "teachers-standin-openkbp",
                                                  "clip": "teachers-standin-openkbp"})
    # the SAM heads used in the prompt-in-the-loop loss and shipped with the student (the ones delineation runs)
    sam_heads: str = "litemedsam-clicks"


@dataclass
class CacheConfig:
    items: int = 1024
    image_size: int = 256  # views are stored at this size; each teacher sees them resized to its own input size
    sam_dtype: str = "int8"  # "int8" (per item and channel, symmetric) or "float16"
    seed: int = 0
    sources: dict = field(default_factory=lambda: {"openkbp": 0.5, "lung1": 0.25, "ts_abdomen": 0.15,
                                                   "ts_aorta": 0.1})
    orientations: dict = field(default_factory=lambda: {"axial": 0.6, "coronal": 0.2, "sagittal": 0.2})
    crop_share: float = 0.5  # share of views cropped to a smaller field of view (scale augmentation)
    crop_range: tuple = (0.3, 0.9)  # the crop's side as a fraction of the slice's


@dataclass
class StudentSection:
    preset: str = "vit_small_256"
    overrides: dict = field(default_factory=dict)  # StudentConfig fields (e.g. token_gates)
    # "random"; "bundle:FOLDER_OR_NAME" (a prismrt bundle's student); "run:FOLDER" (warm start: a run's student and its
    # normalisers; same normaliser kind and teacher set); "timm:FILE" (a backbone state dict); "teacher" (a
    # trunk that is a teacher's architecture, e.g. trunk "litemedsam", takes that teacher's weights)
    init: str = "random"
    # train the translators only; a frozen LiteMedSAM trunk taken from its teacher is then not run at all in
    # training (its output is the cache's sam_embedding)
    freeze_trunk: bool = False


@dataclass
class LossConfig:
    normaliser: str = "phi-s"  # "phi-s" or "identity" (raw features)
    normaliser_samples: int = 64  # cache items the normalisers are fitted on
    dense: str = "mse"  # "mse" (in normalised space) or "cosine" (per pixel 1 - cos)
    summary_mse: float = 0.1  # for summary tokens: 1 - cos plus this times their MSE in normalised space
    prompt: float = 1.0  # weight of the prompt-in-the-loop term (0: off)
    prompt_per_image: int = 1  # prompts per prompted image; each step draws the kind (click, box, propagation)
    prompt_share: float = 1.0  # share of each (per-rank) batch's images that are prompted (the decoder is costly)
    prompt_iou: float = 1.0  # IoU-head MSE inside the prompt term
    weights: dict = field(default_factory=dict)  # per target (SliceFeatures field), default 1
    return_decoder: float = 0.0  # MultiMedDistill's return decoder: reconstruct the tokens from each translation


@dataclass
class BalanceConfig:
    # "fixed" (the loss weights), "drop" (UNIC teacher dropping), "gating" (MultiMedDistill: learned softmax
    # teacher weights with an entropy floor; token gates via student overrides), "attention" (VFSS: weights from
    # a softmax over the teachers' current normalised losses)
    mode: str = "fixed"
    drop_p: float = 0.3  # per teacher and step, in "drop"; at least one teacher always stays
    temperature: float = 1.0  # "attention"
    entropy: float = 0.1  # "gating": weight of (log T - H(w))


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global (split over DDP ranks)
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    # resolution schedule: [[until_step, [sizes]], ...]; each step draws one size of its phase (same on all ranks);
    # empty: the student's own input size throughout
    resolutions: list = field(default_factory=list)
    grad_checkpointing: bool = False
    bf16: bool = True  # autocast on CUDA (ignored on the CPU)
    checkpoint_every: int = 100
    log_every: int = 10
    eval_items: int = 32  # held-out cache items for the fidelity curve
    eval_every: int = 100
    threads: int = 2


SECTIONS = {"teachers": TeacherConfig, "cache": CacheConfig, "student": StudentSection, "loss": LossConfig,
            "balance": BalanceConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    name: str = "distill"
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentSection = field(default_factory=StudentSection)
    loss: LossConfig = field(default_factory=LossConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: str = ""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as in a file

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}: the known ones are {sorted(known)}")
        kw = {}
        for key, value in d.items():
            if key in SECTIONS:
                section = SECTIONS[key]
                names = {f.name for f in fields(section)}
                bad = set(value) - names
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in '{key}': the known ones are {sorted(names)}")
                kw[key] = section(**value)
            else:
                kw[key] = value
        return cls(**kw)

    @classmethod
    def load(cls, path: "str | Path") -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
