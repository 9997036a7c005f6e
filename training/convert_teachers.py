"""Convert the official teacher checkpoints into PRISM-RT's ``teachers`` bundle (safetensors + JSON config + vocab).

Offline, run once by whoever holds the official files; nothing here is imported by PRISMRTLib. This is the only place
where torch pickles are read, and only with ``torch.load(..., weights_only=True)`` (tensors and plain containers, no
code execution).

Sources:

- MedSAM: ``medsam_vit_b.pth``, the state dict of segment_anything's ``Sam`` (ViT-B). A training checkpoint
  ``{"model": state_dict, ...}`` and DDP ``module.`` prefixes are accepted too.
- DINOv3, in either layout (detected from the tensor names):
  * Meta's ``.pth`` (``cls_token``, ``storage_tokens``, ``blocks.N.attn.qkv.*``, ``blocks.N.ls1.gamma`` ...), mapped by
    timm's own ``timm.models.eva.checkpoint_filter_fn``;
  * Hugging Face's ``DINOv3ViTModel`` folder (``config.json`` + ``model.safetensors``; ``embeddings.*``,
    ``layer.N.attention.q_proj`` ...), first turned back into Meta's layout (the inverse of transformers'
    ``convert_dinov3_vit_to_hf.py``), then the same timm filter.
  The timm variant (``vit_{small,small_plus,base,large,huge_plus,7b}_patch16_dinov3[_qkvb]``) and any overrides are
  inferred from the tensor shapes and, for the HF layout, from ``config.json``.
- BiomedCLIP: the hub folder (``open_clip_pytorch_model.bin``, ``open_clip_config.json``, ``vocab.txt`` or
  ``tokenizer.json``; ``--vocab`` points at PubMedBERT's ``vocab.txt`` when it lies elsewhere).

Usage::

    python training/convert_teachers.py --medsam medsam_vit_b.pth \\
        --dinov3 dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth   (or a Hugging Face folder) \\
        --biomedclip BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/ --out teachers-bundle/
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source tree
    sys.path.insert(0, str(REPO))

from PRISMRTLib.errors import PrismRTError  # noqa: E402
from PRISMRTLib.models.biomedclip import BiomedCLIPConfig, build_biomedclip  # noqa: E402
from PRISMRTLib.models.bundle import load_bundle, save_bundle  # noqa: E402
from PRISMRTLib.models.registry import TEACHER_SETS, spec_record, teacher_set  # noqa: E402
from PRISMRTLib.models.dinov3 import DinoV3Config, build_dinov3  # noqa: E402
from PRISMRTLib.models.medsam import MedSAMConfig, build_medsam  # noqa: E402

CONVERTER = "training/convert_teachers.py"
CONVERTER_VERSION = "1.0"
CONVERTIBLE_SETS = ("official", "tiny")  # teacher sets whose architectures the official checkpoints have (tiny: tests)


class ConversionError(PrismRTError):
    """A source file is missing, of another model, or cannot be mapped onto the teacher's architecture."""


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def sha256_file(path: "str | Path", chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def source_record(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def load_torch_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a torch pickle, read with the safe loader; unwraps ``model``/``state_dict`` and ``module.``."""
    if not path.is_file():
        raise ConversionError(f"{what}: '{path}' does not exist or is not a file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ConversionError(
            f"{what}: '{path}' cannot be read as a PyTorch checkpoint with the safe loader "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    for wrapper in ("model", "teacher", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{what}: '{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{what}: '{path}' holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConversionError(f"'{path}' is not a readable safetensors file ({exc})") from None


def _shape(t) -> tuple:
    return tuple(t.shape)


def mismatch_report(expected: dict, found: dict) -> tuple[list, list, list]:
    """Missing keys, unexpected keys, and keys with other shapes (expected/found: key -> tensor or shape)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if _shape(expected[k]) != _shape(found[k]))
    return missing, unexpected, wrong


def _examples(keys: list, n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_strict(module: torch.nn.Module, state_dict: dict, what: str, source: Path, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with a message that names what is missing, extra or of another shape."""
    expected = module.state_dict()
    missing, unexpected, wrong = mismatch_report(expected, state_dict)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({_examples(unexpected)})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of another shape (e.g. {k}: {_shape(state_dict[k])} in the file, "
                f"{_shape(expected[k])} expected)"
            )
        raise ConversionError(
            f"{what}: '{source.name}' does not match the expected architecture: " + "; ".join(parts)
            + (f". {hint}" if hint else "")
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
    module.eval()


# ----------------------------------------------------------------------------------------------------------------
# MedSAM

SAM_ENCODERS = {768: "SAM ViT-B (as MedSAM)", 1024: "SAM ViT-L", 1280: "SAM ViT-H"}


def convert_medsam(path: "str | Path", config: MedSAMConfig) -> tuple[torch.nn.Module, dict]:
    """``medsam_vit_b.pth`` -> segment_anything ``Sam`` with the preset's architecture, loaded strictly."""
    path = Path(path)
    sd = load_torch_state_dict(path, "MedSAM")
    model = build_medsam(config)
    hint = ""
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and w.shape[0] != config.encoder_embed_dim:
        found = SAM_ENCODERS.get(int(w.shape[0]), f"an image encoder {w.shape[0]} wide")
        hint = (f"The file's image encoder is {found}, MedSAM's is {config.encoder_embed_dim} wide: pass MedSAM's "
                f"medsam_vit_b.pth")
    elif not any(k.startswith("image_encoder.") for k in sd):
        hint = "The file has no image_encoder.* tensors: it is not a SAM/MedSAM checkpoint"
    load_strict(model, sd, "MedSAM", path, hint)
    return model, {"layout": "segment_anything Sam state dict", **source_record(path)}


# ----------------------------------------------------------------------------------------------------------------
# DINOv3

# (embed_dim, swiglu) of the official DINOv3 ViTs -> timm's model (without the _qkvb suffix) and its head count
DINOV3_FAMILIES = {
    (384, False): ("vit_small_patch16_dinov3", 6),
    (384, True): ("vit_small_plus_patch16_dinov3", 6),
    (768, False): ("vit_base_patch16_dinov3", 12),
    (1024, False): ("vit_large_patch16_dinov3", 16),
    (1280, True): ("vit_huge_plus_patch16_dinov3", 20),
    (4096, True): ("vit_7b_patch16_dinov3", 32),
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# every tensor name of Meta's DINOv3 ViTs; timm's filter drops mask_token, rope periods, bias_mask, the 7B's
# local-crop CLS norm and EUPE's distillation projectors on purpose (pretraining-only or recomputed)
META_KNOWN = re.compile(
    r"^(cls_token|storage_tokens|mask_token|rope_embed\.periods|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|local_cls_norm\..*|projectors\..*"
    r"|blocks\.\d+\.(norm[12]\.(weight|bias)|ls[12]\.gamma|attn\.qkv\.(weight|bias|bias_mask)|attn\.proj\.(weight|bias)"
    r"|mlp\.(fc1|fc2|w1|w2|w3)\.(weight|bias)))$"
)


@dataclass
class DinoSource:
    layout: str  # "meta" or "hf"
    meta_sd: dict  # in Meta's layout
    hf_config: dict | None
    files: list[Path] = field(default_factory=list)


def _is_hf_layout(keys) -> bool:
    return any(k.startswith("embeddings.") for k in keys)


def _is_meta_layout(keys) -> bool:
    return "cls_token" in keys and any(k.startswith("blocks.") for k in keys)


def read_dinov3_source(path: "str | Path") -> DinoSource:
    """Read a DINOv3 checkpoint in Meta's or Hugging Face's layout into Meta's key layout."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"DINOv3: '{path}' does not exist")
    hf_config, config_file = None, None
    if path.is_dir():
        weights = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise ConversionError(
                f"DINOv3: the folder '{path}' has none of {', '.join(HF_WEIGHT_FILES)}: pass a Hugging Face "
                f"DINOv3ViTModel folder or Meta's .pth file"
            )
        config_file = path / "config.json"
    else:
        weights = path
        if (path.parent / "config.json").is_file():
            config_file = path.parent / "config.json"
    files = [weights]
    if weights.name.endswith(".index.json"):
        index = json.loads(weights.read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        sd = {}
        for shard in shards:
            sd.update(load_safetensors(weights.parent / shard))
            files.append(weights.parent / shard)
        files = files[1:] + [weights]
    elif weights.suffix == ".safetensors":
        sd = load_safetensors(weights)
    else:
        sd = load_torch_state_dict(weights, "DINOv3")
        # Meta training checkpoints keep the backbone under teacher/student prefixes
        for prefix in ("teacher.backbone.", "backbone."):
            if not _is_meta_layout(sd) and any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if _is_hf_layout(sd):
        if config_file is None or not config_file.is_file():
            raise ConversionError(
                f"DINOv3: '{weights.name}' is in the Hugging Face layout but no config.json lies next to it: pass the "
                f"model folder (config.json + model.safetensors)"
            )
        hf_config = json.loads(config_file.read_text())
        if hf_config.get("model_type", "dinov3_vit") != "dinov3_vit":
            raise ConversionError(
                f"DINOv3: {config_file} describes a '{hf_config.get('model_type')}' model, not 'dinov3_vit' "
                f"(DINOv3 ConvNeXt and other models are not supported)"
            )
        files.append(config_file)
        return DinoSource("hf", hf_to_meta(sd, hf_config), hf_config, files)
    if _is_meta_layout(sd):
        return DinoSource("meta", sd, None, files)
    raise ConversionError(
        f"DINOv3: '{weights.name}' is neither in Meta's layout (cls_token, storage_tokens, blocks.N.*) nor in Hugging "
        f"Face's (embeddings.*, layer.N.*); its first tensors are {_examples(sorted(sd), 4)}"
    )


def hf_to_meta(hf: dict, config: dict) -> dict:
    """Hugging Face ``DINOv3ViTModel`` tensors -> Meta's names (inverse of transformers' convert_dinov3_vit_to_hf)."""
    sd = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in hf.items()}  # transformers 5 in-memory names
    gated = bool(config.get("use_gated_mlp", False))
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    direct = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "storage_tokens",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    for src, dst in direct.items():
        if src in sd:
            out[dst] = take(src)
    if "embeddings.mask_token" in sd:
        out["mask_token"] = take("embeddings.mask_token").reshape(1, -1)  # Meta stores (1, D)
    used.update(k for k in sd if k.startswith("rope_embeddings."))  # recomputed buffers

    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))})
    for i in layers:
        a, b = f"layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                if f"{a}{n}.{p}" in sd:
                    out[f"{b}{n}.{p}"] = take(f"{a}{n}.{p}")
        for s in ("1", "2"):
            if f"{a}layer_scale{s}.lambda1" in sd:
                out[f"{b}ls{s}.gamma"] = take(f"{a}layer_scale{s}.lambda1")
        att = f"{a}attention."
        if all(f"{att}{p}_proj.weight" in sd for p in "qkv"):
            q, k, v = (take(f"{att}{p}_proj.weight") for p in "qkv")
            out[f"{b}attn.qkv.weight"] = torch.cat([q, k, v], 0)
            biases = {p: sd.get(f"{att}{p}_proj.bias") for p in "qkv"}
            used.update(f"{att}{p}_proj.bias" for p in "qkv" if biases[p] is not None)
            if biases["k"] is not None and bool(biases["k"].abs().max() > 0):
                raise ConversionError(
                    f"DINOv3: layer {i} has a non-zero key bias (config key_bias=true). DINOv3 masks the key bias to "
                    f"zero and timm's Eva has none; with RoPE a key bias changes the attention, so it cannot be dropped"
                )
            if biases["q"] is not None or biases["v"] is not None:
                zeros = torch.zeros(q.shape[0], dtype=q.dtype)
                out[f"{b}attn.qkv.bias"] = torch.cat([
                    biases["q"] if biases["q"] is not None else zeros, zeros,
                    biases["v"] if biases["v"] is not None else zeros,
                ])
        if f"{att}o_proj.weight" in sd:
            w = take(f"{att}o_proj.weight")
            out[f"{b}attn.proj.weight"] = w
            bias = sd.get(f"{att}o_proj.bias")
            used.add(f"{att}o_proj.bias")
            out[f"{b}attn.proj.bias"] = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        if gated:
            names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        else:
            names = {"up_proj": "fc1", "down_proj": "fc2"}
        for src, dst in names.items():
            key = f"{a}mlp.{src}.weight"
            if key in sd:
                w = take(key)
                out[f"{b}mlp.{dst}.weight"] = w
                bias = sd.get(f"{a}mlp.{src}.bias")
                used.add(f"{a}mlp.{src}.bias")
                out[f"{b}mlp.{dst}.bias"] = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    left = sorted(set(sd) - used)
    if left:
        raise ConversionError(
            f"DINOv3: {len(left)} tensors of the Hugging Face checkpoint have no place in the model "
            f"({_examples(left)}); is config.json (use_gated_mlp={gated}) the one of these weights?"
        )
    return out


def _meta_arch(sd: dict) -> dict:
    """Architecture read off Meta-layout tensors."""
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        if key not in sd:
            raise ConversionError(f"DINOv3: the checkpoint has no '{key}' tensor: it is not a DINOv3 ViT")
    dim = int(sd["cls_token"].shape[-1])
    pw = sd["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    swiglu = "blocks.0.mlp.w1.weight" in sd
    fc1 = sd.get("blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ConversionError("DINOv3: no MLP tensors (blocks.0.mlp.fc1 or w1) found")
    hidden = int(fc1.shape[0])
    bias_keys = [k for k in sd if k.endswith("attn.qkv.bias")]
    qv_nonzero = False
    for k in bias_keys:
        q, kb, v = sd[k].float().chunk(3)
        qv_nonzero |= bool(q.abs().max() > 0) or bool(v.abs().max() > 0)
        mask = sd.get(k.replace(".bias", ".bias_mask"))
        if mask is not None:
            mq, mk, mv = mask.float().chunk(3)
            if not (bool((mk == 0).all()) and bool((mq == 1).all()) and bool((mv == 1).all())):
                raise ConversionError(f"DINOv3: {k}_mask is not (1, 0, 1) over (q, k, v): unknown bias masking")
        elif bool(kb.abs().max() > 0):
            raise ConversionError(
                f"DINOv3: {k} has a non-zero key part and no bias_mask: DINOv3 masks the key bias, timm has none"
            )
    return dict(
        embed_dim=dim, depth=depth, patch_size=int(pw.shape[-1]), in_chans=int(pw.shape[1]),
        num_reg_tokens=int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        swiglu=swiglu, mlp_hidden=hidden, qkv_bias=qv_nonzero, layer_scale="blocks.0.ls1.gamma" in sd,
    )


def _timm_arch(model) -> dict:
    block = model.blocks[0]
    mlp = block.mlp
    hidden = mlp.fc1_g.out_features if hasattr(mlp, "fc1_g") else mlp.fc1.out_features
    return dict(
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
        patch_size=model.patch_embed.patch_size[0],
        num_reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        mlp_hidden=hidden, rope_temperature=getattr(model.rope, "temperature", None),
    )


def infer_dinov3_config(src: DinoSource, img_size: int, preset: DinoV3Config | None = None,
                        num_heads: int | None = None) -> DinoV3Config:
    """The timm ``vit_*_patch16_dinov3`` variant and overrides that hold these tensors."""
    import timm

    arch = _meta_arch(src.meta_sd)
    hf = src.hf_config or {}
    if arch["in_chans"] != 3:
        raise ConversionError(f"DINOv3: the patch embedding takes {arch['in_chans']} channels; 3 (RGB) expected")
    if src.layout == "hf":
        act = hf.get("hidden_act", "gelu")
        want = "silu" if arch["swiglu"] else "gelu"
        if act != want:
            raise ConversionError(f"DINOv3: config.json has hidden_act '{act}'; timm's DINOv3 uses '{want}' here")
        eps = float(hf.get("layer_norm_eps", 1e-5))
        if abs(eps - 1e-5) > 1e-12:
            raise ConversionError(f"DINOv3: config.json has layer_norm_eps {eps}; timm's DINOv3 uses 1e-5")
        if hf.get("num_attention_heads") and num_heads and int(hf["num_attention_heads"]) != num_heads:
            raise ConversionError(
                f"DINOv3: --dinov3-num-heads {num_heads} contradicts config.json ({hf['num_attention_heads']})")
        num_heads = num_heads or hf.get("num_attention_heads")
    family = DINOV3_FAMILIES.get((arch["embed_dim"], arch["swiglu"]))
    preset_arch = None
    if preset is not None:
        with torch.device("meta"):
            preset_arch = _timm_arch(build_dinov3(preset))
    if num_heads is None:
        if family is not None:
            num_heads = family[1]
        elif preset_arch is not None and preset_arch["embed_dim"] == arch["embed_dim"]:
            num_heads = preset_arch["num_heads"]
        else:
            raise ConversionError(
                f"DINOv3: the number of attention heads of a {arch['embed_dim']}-wide ViT cannot be read from Meta's "
                f"checkpoint: pass --dinov3-num-heads"
            )
    num_heads = int(num_heads)
    if arch["embed_dim"] % num_heads or (arch["embed_dim"] // num_heads) % 4:
        raise ConversionError(f"DINOv3: width {arch['embed_dim']} with {num_heads} heads does not suit 2D RoPE")
    if family is not None:
        base = family[0]
    elif preset is not None and ("plus" in preset.timm_name or "7b" in preset.timm_name) == arch["swiglu"]:
        base = preset.timm_name.replace("_qkvb", "")
    else:
        base = "vit_small_plus_patch16_dinov3" if arch["swiglu"] else "vit_small_patch16_dinov3"
    name = base + ("_qkvb" if arch["qkv_bias"] else "")
    if name not in timm.list_models():
        raise ConversionError(f"DINOv3: the checkpoint has q/v biases but timm has no '{name}'")
    with torch.device("meta"):
        default = _timm_arch(timm.create_model(name, pretrained=False, num_classes=0))
    overrides = {}
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "num_reg_tokens"):
        value = num_heads if key == "num_heads" else arch[key]
        if default[key] != value:
            overrides[key] = value
    if arch["mlp_hidden"] * default["embed_dim"] != default["mlp_hidden"] * arch["embed_dim"]:
        ratio = arch["mlp_hidden"] / arch["embed_dim"]
        if int(arch["embed_dim"] * ratio) != arch["mlp_hidden"]:
            raise ConversionError(f"DINOv3: timm cannot build an MLP {arch['mlp_hidden']} wide")
        overrides["mlp_ratio"] = ratio
    theta = hf.get("rope_theta")
    if theta is not None and float(theta) != float(default["rope_temperature"]):
        overrides["rope_temperature"] = float(theta)
    if not arch["layer_scale"]:
        overrides["init_values"] = None
    return DinoV3Config(timm_name=name, img_size=img_size, overrides=overrides)


def convert_dinov3(path: "str | Path", img_size: int, preset: DinoV3Config | None = None,
                   num_heads: int | None = None) -> tuple[torch.nn.Module, DinoV3Config, dict]:
    from timm.models.eva import checkpoint_filter_fn

    src = read_dinov3_source(path)
    meta_sd = src.meta_sd
    unknown = sorted(k for k in meta_sd if not META_KNOWN.match(k))
    if unknown:
        raise ConversionError(f"DINOv3: {len(unknown)} tensors of an unsupported DINOv3 variant ({_examples(unknown)})")
    config = infer_dinov3_config(src, img_size, preset, num_heads)
    model = build_dinov3(config)
    # timm's own mapping: storage_tokens -> reg_token, ls1.gamma -> gamma_1, qkv.bias -> q_bias/v_bias (the masked
    # key bias dropped; all-zero q/v biases skipped for the variants without them), w1/w2/w3 -> fc1_g/fc1_x/fc2,
    # mask_token, bias_mask and rope periods dropped
    with contextlib.redirect_stdout(io.StringIO()):  # it prints when it skips all-zero q/v biases
        filtered = checkpoint_filter_fn(dict(meta_sd), model)
    if model.reg_token is None:
        filtered.pop("reg_token", None)
    load_strict(model, filtered, "DINOv3", Path(path))
    info = {"layout": "Meta (facebookresearch/dinov3)" if src.layout == "meta" else "Hugging Face DINOv3ViTModel",
            "files": [source_record(f) for f in src.files]}
    periods = meta_sd.get("rope_embed.periods")
    if periods is not None:
        ours = model.rope.periods.float()
        if periods.numel() != ours.numel():
            raise ConversionError(f"DINOv3: rope_embed.periods has {periods.numel()} entries, {ours.numel()} expected")
        rel = float(((periods.float() - ours).abs() / ours).max())
        # the released checkpoints store periods in bfloat16 (relative error up to 2^-9); timm recomputes them in fp32
        if rel > 2 ** -8:
            raise ConversionError(
                f"DINOv3: the checkpoint's RoPE periods differ from timm's by up to {rel:.2%}: another RoPE base or "
                f"period schedule (min/max periods) than DINOv3's temperature 100")
        info["rope_periods_max_rel_diff"] = rel
    return model, config, info


# ----------------------------------------------------------------------------------------------------------------
# BiomedCLIP

BIOMEDCLIP_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
BIOMEDCLIP_BENIGN = re.compile(r"^text\.transformer\.(embeddings\.position_ids|pooler\..*)$")


def _vocab_from_tokenizer_json(path: Path, out: Path) -> Path:
    data = json.loads(path.read_text())
    vocab = (data.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict) or data["model"].get("type") not in (None, "WordPiece"):
        raise ConversionError(f"BiomedCLIP: {path} holds no WordPiece vocabulary")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ConversionError(f"BiomedCLIP: the vocabulary in {path} has gaps in its token ids")
    out.write_text("\n".join(tokens) + "\n")
    return out


def convert_biomedclip(folder: "str | Path", config: BiomedCLIPConfig, vocab: "str | Path | None" = None,
                       workdir: Path | None = None) -> tuple[torch.nn.Module, Path, dict]:
    """The BiomedCLIP hub folder -> PRISMRTLib's ``BiomedCLIP`` (open_clip layout), loaded strictly."""
    folder = Path(folder)
    if folder.is_file():
        weights, folder = folder, folder.parent
    elif folder.is_dir():
        weights = next((folder / n for n in BIOMEDCLIP_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise ConversionError(f"BiomedCLIP: '{folder}' has none of {', '.join(BIOMEDCLIP_WEIGHTS)}")
    else:
        raise ConversionError(f"BiomedCLIP: '{folder}' does not exist")
    files = [weights]
    cfg_file = folder / "open_clip_config.json"
    if cfg_file.is_file():
        files.append(cfg_file)
        _check_open_clip_config(json.loads(cfg_file.read_text()), config, cfg_file)
    # vocabulary: --vocab, else vocab.txt in the folder, else the WordPiece vocab of tokenizer.json
    if vocab is not None:
        vocab_path = Path(vocab)
        if not vocab_path.is_file():
            raise ConversionError(f"BiomedCLIP: the vocabulary '{vocab_path}' does not exist")
    elif (folder / "vocab.txt").is_file():
        vocab_path = folder / "vocab.txt"
    elif (folder / "tokenizer.json").is_file():
        workdir = workdir or Path(tempfile.mkdtemp(prefix="prismrt-vocab-"))
        files.append(folder / "tokenizer.json")
        vocab_path = _vocab_from_tokenizer_json(folder / "tokenizer.json", workdir / "vocab.txt")
    else:
        raise ConversionError(
            f"BiomedCLIP: no vocab.txt or tokenizer.json in '{folder}': pass --vocab with PubMedBERT's vocab.txt "
            f"(microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract)"
        )
    if vocab_path not in files:
        files.append(vocab_path)
    sd = load_safetensors(weights) if weights.suffix == ".safetensors" else load_torch_state_dict(weights, "BiomedCLIP")
    dropped = sorted(k for k in sd if BIOMEDCLIP_BENIGN.match(k))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    model = build_biomedclip(config)
    hint = ""
    emb = sd.get("text.transformer.embeddings.word_embeddings.weight")
    if emb is not None and emb.shape[1] != config.text_bert["hidden_size"]:
        hint = f"The file's text tower is {emb.shape[1]} wide, PubMedBERT-base is {config.text_bert['hidden_size']}"
    elif not any(k.startswith("visual.trunk.") for k in sd):
        hint = "The file has no visual.trunk.* tensors: it is not open_clip's BiomedCLIP (timm vision tower)"
    load_strict(model, sd, "BiomedCLIP", weights, hint)
    n_vocab = len(vocab_path.read_text(encoding="utf-8").splitlines())
    rows = config.text_bert["vocab_size"]
    if n_vocab > rows:
        raise ConversionError(
            f"BiomedCLIP: the vocabulary '{vocab_path.name}' has {n_vocab} tokens but the text tower only {rows} "
            f"embeddings: it is not the vocabulary of these weights"
        )
    info = {"layout": "open_clip CustomTextCLIP state dict", "files": [source_record(f) for f in files],
            "dropped_benign": dropped, "vocab_tokens": n_vocab}
    return model, vocab_path, info


def _check_open_clip_config(cfg: dict, config: BiomedCLIPConfig, path: Path) -> None:
    model_cfg = cfg.get("model_cfg", cfg)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    checks = [
        ("embed_dim", model_cfg.get("embed_dim"), config.embed_dim),
        ("vision_cfg.timm_model_name", vision.get("timm_model_name"), config.vision_timm_name),
        ("vision_cfg.image_size", vision.get("image_size"), config.image_size),
        ("vision_cfg.timm_proj", vision.get("timm_proj"), "linear"),
        ("text_cfg.hf_proj_type", text.get("hf_proj_type"), config.text_proj),
        ("text_cfg.hf_pooler_type", text.get("hf_pooler_type"), config.text_pooler),
        ("text_cfg.context_length", text.get("context_length"), config.context_length),
    ]
    bad = [f"{name} is {found!r}, {want!r} expected" for name, found, want in checks
           if found is not None and found != want]
    if vision.get("timm_pool") not in (None, "", "token"):
        bad.append(f"vision_cfg.timm_pool is {vision.get('timm_pool')!r}, CLS pooling expected")
    if bad:
        raise ConversionError(f"BiomedCLIP: {path.name} describes another model: " + "; ".join(bad))


# ----------------------------------------------------------------------------------------------------------------
# the bundle


def convert_teachers(
    medsam: "str | Path",
    dinov3: "str | Path",
    biomedclip: "str | Path",
    out: "str | Path",
    teachers: str = "official",
    *,
    name: str | None = None,
    version: str | None = None,
    vocab: "str | Path | None" = None,
    dinov3_num_heads: int | None = None,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Convert the three official teacher checkpoints and write a ``teachers`` bundle to ``out``."""
    if teachers not in CONVERTIBLE_SETS or teachers not in TEACHER_SETS:
        raise ConversionError(f"unknown teacher set '{teachers}': expected one of {CONVERTIBLE_SETS}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"'{out}' already exists: choose another folder or pass --overwrite")
    specs = teacher_set(teachers)
    medsam_cfg = specs["sam"].config
    dino_preset = specs["dino"].config
    clip_cfg = specs["clip"].config

    log(f"MedSAM: {medsam}")
    medsam_model, medsam_info = convert_medsam(medsam, medsam_cfg)
    log(f"DINOv3: {dinov3}")
    dino_model, dino_cfg, dino_info = convert_dinov3(dinov3, dino_preset.img_size, dino_preset, dinov3_num_heads)
    log(f"  -> timm {dino_cfg.timm_name} {dino_cfg.overrides or ''} ({dino_info['layout']})")
    if (dino_cfg.timm_name.replace("_qkvb", ""), dino_cfg.overrides) != (dino_preset.timm_name, dino_preset.overrides):
        dino_info["differs_from_preset"] = {"preset": dino_preset.to_dict(), "converted": dino_cfg.to_dict()}
        log(f"  note: the teacher set '{teachers}' names {dino_preset.timm_name} {dino_preset.overrides or ''}; the "
            f"bundle records the converted architecture")
    log(f"BiomedCLIP: {biomedclip}")
    with tempfile.TemporaryDirectory(prefix="prismrt-convert-") as tmp:
        clip_model, vocab_path, clip_info = convert_biomedclip(biomedclip, clip_cfg, vocab, Path(tmp))
        configs = {"teachers": {"sam": spec_record(specs["sam"]),
                                "dino": spec_record(specs["dino"].with_config(dino_cfg)),
                                "clip": spec_record(specs["clip"])}}
        meta = {
            "converter": CONVERTER, "converter_version": CONVERTER_VERSION, "teacher_set": teachers,
            "torch": torch.__version__,
            "sources": {"medsam": medsam_info, "dinov3": dino_info, "biomedclip": clip_info},
        }
        folder = save_bundle(
            out, "teachers", configs, {"sam": medsam_model, "dino": dino_model, "clip": clip_model},
            vocab_path, name=name or f"prismrt-teachers-{teachers}", version=version or CONVERTER_VERSION,
            meta=meta, overwrite=overwrite,
        )
    load_bundle(folder)  # the bundle must load back as PRISMRTLib reads it
    log(f"wrote {folder}")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_teachers.py",
        description="Convert official MedSAM, DINOv3 and BiomedCLIP checkpoints into a PRISM-RT teachers bundle.",
    )
    p.add_argument("--medsam", required=True, help="medsam_vit_b.pth")
    p.add_argument("--dinov3", required=True, help="Meta's DINOv3 .pth, or a Hugging Face DINOv3ViTModel folder")
    p.add_argument("--biomedclip", required=True, help="the BiomedCLIP hub folder (open_clip_pytorch_model.bin ...)")
    p.add_argument("--vocab", help="PubMedBERT's vocab.txt, when the BiomedCLIP folder has no vocab.txt/tokenizer.json")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--teachers", default="official", choices=CONVERTIBLE_SETS,
                   help="teacher architecture set (default: official; tiny is for tests)")
    p.add_argument("--dinov3-num-heads", type=int, help="attention heads, for a Meta DINOv3 file of unusual width")
    p.add_argument("--name", help="bundle name (default: prismrt-teachers-<set>)")
    p.add_argument("--version", help=f"bundle version (default: {CONVERTER_VERSION})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        convert_teachers(
            args.medsam, args.dinov3, args.biomedclip, args.out, args.teachers, name=args.name,
            version=args.version, vocab=args.vocab, dinov3_num_heads=args.dinov3_num_heads, overwrite=args.overwrite,
        )
    except PrismRTError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
