"""training/convert_teachers.py: official teacher files -> teachers bundle, checked on the same inputs against the
reference models the files were made from: segment_anything's Sam for MedSAM, transformers' DINOv3ViTModel (an
implementation independent of timm's), open_clip's CustomTextCLIP for BiomedCLIP."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from PRISMRTLib.models import load_bundle
from PRISMRTLib.models.biomedclip import BIOMEDCLIP_PRESETS, biomedclip_input
from PRISMRTLib.models.dinov3 import DINOV3_PRESETS, dinov3_features
from PRISMRTLib.models.medsam import MEDSAM_PRESETS, build_medsam, medsam_input

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / "training" / "convert_teachers.py"

# words for the tiny PubMedBERT-style vocabulary (the tiny text tower has 64 embeddings)
WORDS = ("the left right parotid gland spinal cord tumour target is near in an axial ct slice of this image "
         "brainstem larynx mandible").split()
TINY_VIT = "prismrt_test_vit_tiny_patch16_64"  # open_clip builds its timm tower by name, without img_size


def load_converter():
    spec = importlib.util.spec_from_file_location("prismrt_convert_teachers", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ct():
    return load_converter()


def perturb(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases, rel-pos tables, layer scales and norms all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


# ------------------------------------------------------------------------------------------------ MedSAM


@pytest.fixture(scope="module")
def medsam_official(tmp_path_factory):
    """A tiny SAM state dict saved as MedSAM ships it (torch.save of Sam.state_dict()) and the model it came from."""
    from PRISMRTLib.models.medsam import MEDSAM_PRESETS, build_medsam

    torch.manual_seed(1)
    sam = perturb(build_medsam(MEDSAM_PRESETS["tiny"]), 0.05, seed=1)
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


# ------------------------------------------------------------------------------------------------ DINOv3


def tiny_hf_dinov3_config(**kw):
    """transformers' DINOv3 config matching the tiny timm preset (48 wide, 2 layers, 2 heads, 4 registers)."""
    from transformers import DINOv3ViTConfig

    args = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                num_register_tokens=4, patch_size=16, image_size=128, hidden_act="gelu", layer_norm_eps=1e-5,
                rope_theta=100.0, query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
                use_gated_mlp=False, layerscale_value=1.0)
    args.update(kw)
    return DINOv3ViTConfig(**args)


def make_hf_dinov3(folder: Path, config, scale=0.2, seed=2):
    from transformers import DINOv3ViTModel

    torch.manual_seed(seed)
    model = DINOv3ViTModel(config).eval()
    if scale:
        perturb(model, scale, seed)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def dinov3_hf(tmp_path_factory):
    """A Hugging Face DINOv3ViTModel folder (config.json + model.safetensors) with random non-zero weights."""
    folder = tmp_path_factory.mktemp("dinov3") / "dinov3-tiny-hf"
    model = make_hf_dinov3(folder, tiny_hf_dinov3_config())
    return folder, model


def hf_saved_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def meta_from_hf_reference(hf: dict, config, seed=3) -> dict:
    """Meta's DINOv3 layout for a HF checkpoint, written out key by key for the test (not the converter's code).

    Adds what Meta's files carry and HF drops: a masked (non-zero) key bias with its ``bias_mask``, ``mask_token``
    as (1, D), and the RoPE ``periods`` buffer in bfloat16 as in the released checkpoints.
    """
    g = torch.Generator().manual_seed(seed)
    d = config.hidden_size
    head = d // config.num_attention_heads
    meta = {
        "cls_token": hf["embeddings.cls_token"],
        "storage_tokens": hf["embeddings.register_tokens"],
        "mask_token": hf["embeddings.mask_token"].reshape(1, d),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
        "norm.weight": hf["norm.weight"],
        "norm.bias": hf["norm.bias"],
        "rope_embed.periods": (100.0 ** (2 * torch.arange(head // 4) / (head // 2))).to(torch.bfloat16),
    }
    for i in range(config.num_hidden_layers):
        a, b = f"layer.{i}.", f"blocks.{i}."
        meta[b + "attn.qkv.weight"] = torch.cat([hf[f"{a}attention.{p}_proj.weight"] for p in "qkv"])
        meta[b + "attn.qkv.bias"] = torch.cat([hf[f"{a}attention.q_proj.bias"], torch.randn(d, generator=g),
                                               hf[f"{a}attention.v_proj.bias"]])
        meta[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        meta[b + "attn.proj.weight"] = hf[f"{a}attention.o_proj.weight"]
        meta[b + "attn.proj.bias"] = hf[f"{a}attention.o_proj.bias"]
        for n in ("norm1", "norm2"):
            meta[f"{b}{n}.weight"], meta[f"{b}{n}.bias"] = hf[f"{a}{n}.weight"], hf[f"{a}{n}.bias"]
        meta[b + "ls1.gamma"] = hf[f"{a}layer_scale1.lambda1"]
        meta[b + "ls2.gamma"] = hf[f"{a}layer_scale2.lambda1"]
        mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if config.use_gated_mlp \
            else {"up_proj": "fc1", "down_proj": "fc2"}
        for src, dst in mlp.items():
            for p in ("weight", "bias"):
                meta[f"{b}mlp.{dst}.{p}"] = hf[f"{a}mlp.{src}.{p}"]
    return meta


# Meta -> HF renaming as transformers' convert_dinov3_vit_to_hf.py does it (regexes applied in order), used only
# to prove that the fixture above is Meta's layout.
META_TO_HF = [
    (r"cls_token", "embeddings.cls_token"), (r"mask_token", "embeddings.mask_token"),
    (r"storage_tokens", "embeddings.register_tokens"), (r"patch_embed.proj", "embeddings.patch_embeddings"),
    (r"periods", "inv_freq"), (r"rope_embed", "rope_embeddings"),
    (r"blocks.(\d+).attn.proj", r"layer.\1.attention.o_proj"), (r"blocks.(\d+).attn.", r"layer.\1.attention."),
    (r"blocks.(\d+).ls(\d+).gamma", r"layer.\1.layer_scale\2.lambda1"),
    (r"blocks.(\d+).mlp.fc1", r"layer.\1.mlp.up_proj"), (r"blocks.(\d+).mlp.fc2", r"layer.\1.mlp.down_proj"),
    (r"blocks.(\d+).mlp", r"layer.\1.mlp"), (r"blocks.(\d+).norm", r"layer.\1.norm"),
    (r"w1", "gate_proj"), (r"w2", "up_proj"), (r"w3", "down_proj"),
]


def meta_to_hf_official(meta: dict) -> dict:
    sd = {}
    for key, value in meta.items():
        if "qkv" in key:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                sd[key.replace("qkv", part)] = chunk
        else:
            sd[key] = value
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in META_TO_HF:
            new = re.sub(pattern, repl, new)
        if "bias_mask" in key or "attn.k_proj.bias" in key or "inv_freq" in new:
            continue
        if new == "embeddings.mask_token":
            value = value.unsqueeze(1)
        out[new] = value
    return out


@pytest.fixture(scope="module")
def dinov3_meta(tmp_path_factory, dinov3_hf):
    folder, model = dinov3_hf
    meta = meta_from_hf_reference(hf_saved_tensors(folder), model.config)
    path = tmp_path_factory.mktemp("dinov3-meta") / "dinov3_vit_tiny_pretrain.pth"
    torch.save(meta, path)
    return path, meta


# ------------------------------------------------------------------------------------------------ BiomedCLIP


def register_tiny_vit():
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_VIT in timm.list_models(TINY_VIT):
        return

    def prismrt_test_vit_tiny_patch16_64(pretrained=False, **kwargs):
        args = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2)
        return _create_vision_transformer("vit_base_patch16_224", pretrained=False, **dict(args, **kwargs))

    register_model(prismrt_test_vit_tiny_patch16_64)


def open_clip_biomedclip(bert_dir: Path, preset, vision_name: str, image_size: int):
    """open_clip's own CustomTextCLIP with BiomedCLIP's model config (text tower from a local BERT config.json)."""
    from open_clip.model import CustomTextCLIP
    from transformers import BertConfig

    BertConfig(**preset.text_bert).save_pretrained(bert_dir)
    vision = {"timm_model_name": vision_name, "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
              "image_size": image_size}
    text = {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir), "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": preset.context_length,
            "hf_model_pretrained": False}
    return CustomTextCLIP(embed_dim=preset.embed_dim, vision_cfg=vision, text_cfg=text), vision, text


@pytest.fixture(scope="module")
def biomedclip_official(tmp_path_factory):
    """A tiny BiomedCLIP hub folder: open_clip_pytorch_model.bin (+ benign extras that older transformers saved),
    open_clip_config.json and vocab.txt."""
    from PRISMRTLib.models.biomedclip import BIOMEDCLIP_PRESETS, write_vocab

    register_tiny_vit()
    preset = BIOMEDCLIP_PRESETS["tiny"]
    root = tmp_path_factory.mktemp("biomedclip")
    folder = root / "BiomedCLIP-tiny"
    folder.mkdir()
    torch.manual_seed(4)
    model, vision, text = open_clip_biomedclip(root / "bert", preset, TINY_VIT, preset.image_size)
    perturb(model, 0.05, seed=4)
    sd = dict(model.state_dict())
    hidden = preset.text_bert["hidden_size"]
    sd["text.transformer.embeddings.position_ids"] = torch.arange(preset.text_bert["max_position_embeddings"])[None]
    sd["text.transformer.pooler.dense.weight"] = torch.randn(hidden, hidden)
    sd["text.transformer.pooler.dense.bias"] = torch.randn(hidden)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    # the hub's config names the real timm model; the tiny tower is vit_base_patch16_224 with overrides
    vision = dict(vision, timm_model_name=preset.vision_timm_name)
    text = dict(text, hf_model_name="microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
                hf_tokenizer_name="microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": preset.embed_dim, "vision_cfg": vision, "text_cfg": text},
         "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}},
        indent=2))
    write_vocab(WORDS, folder / "vocab.txt")
    return folder, model


# ------------------------------------------------------------------------------------------------ the bundle


@pytest.fixture(scope="module")
def teachers_bundle(tmp_path_factory, ct, medsam_official, dinov3_hf, biomedclip_official):
    from PRISMRTLib.models import load_bundle

    out = tmp_path_factory.mktemp("bundle") / "teachers-tiny"
    ct.convert_teachers(medsam_official[0], dinov3_hf[0], biomedclip_official[0], out, "tiny", log=lambda *a: None)
    return load_bundle(out)


# ------------------------------------------------------------------------------------------------ tests

# float32 on CPU; the reference and converted models differ in kernels (e.g. SDPA vs eager attention) only
ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def slices(n=1, size=128, seed=0):
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ MedSAM


def sam_outputs(sam, x01, point_xy, label):
    """Image embedding and the mask decoder's low-res mask + IoU for one point prompt (MedSAM's inference path)."""
    with torch.no_grad():
        emb = sam.image_encoder(medsam_input(x01))
        coords = torch.tensor([[point_xy]], dtype=torch.float32)
        sparse, dense = sam.prompt_encoder(points=(coords, torch.tensor([[label]])), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
    return emb, masks, iou


def test_medsam_image_embedding_and_point_prompt_match(teachers_bundle, medsam_official):
    _, reference = medsam_official
    converted = teachers_bundle.modules["sam"]
    x = slices()
    ref = sam_outputs(reference, x, (40.0, 70.0), 1)
    out = sam_outputs(converted, x, (40.0, 70.0), 1)
    assert ref[0].shape == (1, 32, 8, 8) and ref[1].shape == (1, 1, 32, 32)
    for r, o in zip(ref, out):
        assert max_diff(r, o) < ATOL
    # the decoder output depends on the prompt, so the comparison above is not trivially satisfied
    other = sam_outputs(converted, x, (100.0, 20.0), 0)
    assert max_diff(other[1], out[1]) > 1e-2


def test_medsam_preset_has_the_layout_of_segment_anything_vit_b():
    """medsam_vit_b.pth is segment_anything's vit_b state dict: the official preset must hold exactly those tensors."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = build_medsam(MEDSAM_PRESETS["vit_b"]).state_dict()
        official = sam_model_registry["vit_b"]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_medsam_vit_h_sized_file_is_refused_with_a_clear_message(ct, tmp_path, medsam_official):
    sd = dict(torch.load(medsam_official[0], weights_only=True))
    sd["image_encoder.patch_embed.proj.weight"] = torch.zeros(1280, 3, 16, 16)  # SAM ViT-H's patch embedding
    sd["image_encoder.blocks.31.attn.qkv.weight"] = torch.zeros(3840, 1280)
    path = tmp_path / "sam_vit_h_4b8939.pth"
    torch.save(sd, path)
    with pytest.raises(ct.ConversionError) as err:
        ct.convert_medsam(path, MEDSAM_PRESETS["tiny"])
    msg = str(err.value)
    assert "sam_vit_h_4b8939.pth" in msg and "SAM ViT-H" in msg
    assert "image_encoder.patch_embed.proj.weight: (1280, 3, 16, 16) in the file, (48, 3, 16, 16) expected" in msg
    assert "unexpected" in msg and "image_encoder.blocks.31.attn.qkv.weight" in msg


def test_medsam_missing_tensor_is_named(ct, tmp_path, medsam_official):
    sd = dict(torch.load(medsam_official[0], weights_only=True))
    del sd["mask_decoder.iou_token.weight"]
    torch.save({"model": sd, "epoch": 3}, tmp_path / "medsam_train_ckpt.pth")  # a training checkpoint is unwrapped
    with pytest.raises(ct.ConversionError, match=r"1 tensors missing \(mask_decoder\.iou_token\.weight\)"):
        ct.convert_medsam(tmp_path / "medsam_train_ckpt.pth", MEDSAM_PRESETS["tiny"])


class CallsOnLoad:
    """A pickle that would run code (here: print) when unpickled by an unsafe loader."""

    def __reduce__(self):
        return print, ("UNSAFE CODE RAN",)


def test_unsafe_or_corrupt_pickles_are_refused(ct, tmp_path, capsys):
    torch.save({"model": CallsOnLoad()}, tmp_path / "code.pth")
    with pytest.raises(ct.ConversionError, match="safe loader"):
        ct.convert_medsam(tmp_path / "code.pth", MEDSAM_PRESETS["tiny"])
    assert "UNSAFE CODE RAN" not in capsys.readouterr().out
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ct.ConversionError, match="cannot be read"):
        ct.convert_medsam(tmp_path / "junk.pth", MEDSAM_PRESETS["tiny"])


# ------------------------------------------------------------------------------------------------ DINOv3


def hf_tokens(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def compare_dino(converted, reference, x, n_prefix=5):
    """Max |diff| of CLS and of patch tokens: PRISMRTLib's dinov3_features vs HF's final normalised hidden state."""
    ref = hf_tokens(reference, x)
    with torch.no_grad():
        cls, patches = dinov3_features(converted, x)
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    assert patches.shape == (x.shape[0], ref.shape[-1], h, w)
    ref_patches = ref[:, n_prefix:].transpose(1, 2).reshape(patches.shape)
    return max_diff(ref[:, 0], cls), max_diff(ref_patches, patches), float(ref.abs().max())


@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])  # non-square: RoPE's y/x order and per-axis normalisation
def test_dinov3_hf_layout_matches_transformers(teachers_bundle, dinov3_hf, hw):
    _, reference = dinov3_hf
    assert teachers_bundle.configs["teachers"]["dino"]["config"]["timm_name"] == "vit_small_patch16_dinov3_qkvb"  # biases are non-zero
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(5))
    d_cls, d_patch, scale = compare_dino(teachers_bundle.modules["dino"], reference, x)
    assert scale > 1.0
    assert d_cls < ATOL and d_patch < ATOL


def test_dinov3_sharded_hf_folder(ct, tmp_path, dinov3_hf):
    _, reference = dinov3_hf
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _, info = ct.convert_dinov3(tmp_path / "sharded", 128, DINOV3_PRESETS["tiny"])
    assert len(info["files"]) > 3  # shards + index + config.json, each hashed
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(9))
    d_cls, d_patch, _ = compare_dino(model, reference, x)
    assert d_cls < ATOL and d_patch < ATOL


def test_dinov3_meta_fixture_is_metas_layout(dinov3_hf, dinov3_meta):
    """The test's Meta file maps onto the HF checkpoint exactly by transformers' own Meta->HF renaming."""
    folder, _ = dinov3_hf
    hf = hf_saved_tensors(folder)
    mapped = meta_to_hf_official(dinov3_meta[1])
    assert mapped.keys() == hf.keys()
    assert all(torch.equal(mapped[k], hf[k]) for k in hf)


def test_dinov3_meta_layout_matches_transformers(ct, dinov3_hf, dinov3_meta):
    _, reference = dinov3_hf
    model, config, info = ct.convert_dinov3(dinov3_meta[0], 128, DINOV3_PRESETS["tiny"])
    assert config.timm_name == "vit_small_patch16_dinov3_qkvb"
    assert config.overrides == {"embed_dim": 48, "depth": 2, "num_heads": 2}  # heads from the preset of equal width
    assert info["layout"].startswith("Meta")
    assert 0 < info["rope_periods_max_rel_diff"] < 2 ** -8  # bfloat16 periods in the file, float32 in timm
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(6))
    d_cls, d_patch, _ = compare_dino(model, reference, x)
    assert d_cls < ATOL and d_patch < ATOL


def test_dinov3_official_widths_map_to_the_timm_variants(ct, tmp_path):
    """ViT-S/16 (zero q/v biases, as the released distilled models) and ViT-S+/16 (SwiGLU, non-zero biases) with the
    widths of transformers' conversion script (2 of their 12 layers, for speed): timm's plain and _qkvb variants with
    only the depth overridden, and equal outputs (for S+ this checks gate/up -> w1/w2 -> fc1_g/fc1_x)."""
    common = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6, image_size=224)
    cases = {
        "vit_small_patch16_dinov3": {},
        "vit_small_plus_patch16_dinov3_qkvb": dict(use_gated_mlp=True, hidden_act="silu"),
    }
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(7))
    for name, kw in cases.items():
        folder = tmp_path / name
        gated = bool(kw)
        reference = make_hf_dinov3(folder, tiny_hf_dinov3_config(**common, **kw), scale=0.05 if gated else 0.0)
        if not gated:  # HF initialises biases to zero; keep the q/v biases zero, make everything else non-trivial
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    if not ("attention" in n and n.endswith("_proj.bias") and "o_proj" not in n):
                        p.add_(torch.randn_like(p) * 0.05)
            reference.save_pretrained(folder)
        model, config, _ = ct.convert_dinov3(folder, 224, DINOV3_PRESETS["vit_small"])
        assert (config.timm_name, config.overrides) == (name, {"depth": 2})
        d_cls, d_patch, _ = compare_dino(model, reference, x)
        assert d_cls < ATOL and d_patch < ATOL, name


def test_dinov3_key_bias_cannot_be_dropped(ct, tmp_path):
    """With RoPE a key bias changes attention, so a HF model with key_bias=true and a non-zero bias is refused."""
    make_hf_dinov3(tmp_path / "kb", tiny_hf_dinov3_config(key_bias=True))
    with pytest.raises(ct.ConversionError, match="non-zero key bias"):
        ct.convert_dinov3(tmp_path / "kb", 128, DINOV3_PRESETS["tiny"])


def test_dinov3_bad_files_are_refused_with_names(ct, tmp_path, dinov3_meta):
    meta = dict(dinov3_meta[1])
    meta["cls_norm.weight"] = torch.ones(48)  # the 7B's untied CLS norm: not supported
    torch.save(meta, tmp_path / "extra.pth")
    with pytest.raises(ct.ConversionError, match=r"unsupported DINOv3 variant \(cls_norm\.weight\)"):
        ct.convert_dinov3(tmp_path / "extra.pth", 128, DINOV3_PRESETS["tiny"])

    meta = dict(dinov3_meta[1])
    del meta["blocks.1.ls2.gamma"]
    torch.save(meta, tmp_path / "missing.pth")
    with pytest.raises(ct.ConversionError, match=r"1 tensors missing \(blocks\.1\.gamma_2\)"):
        ct.convert_dinov3(tmp_path / "missing.pth", 128, DINOV3_PRESETS["tiny"])

    meta = {k: v for k, v in dinov3_meta[1].items() if not k.endswith("bias_mask")}
    torch.save(meta, tmp_path / "nomask.pth")
    with pytest.raises(ct.ConversionError, match="non-zero key part and no bias_mask"):
        ct.convert_dinov3(tmp_path / "nomask.pth", 128, DINOV3_PRESETS["tiny"])

    # an unusual width in Meta's layout: the head count is not in the file
    meta = {k: v for k, v in dinov3_meta[1].items()}
    with pytest.raises(ct.ConversionError, match="--dinov3-num-heads"):
        src = ct.DinoSource("meta", meta, None)
        ct.infer_dinov3_config(src, 128, DINOV3_PRESETS["vit_base"])
    assert ct.infer_dinov3_config(src, 128, DINOV3_PRESETS["vit_base"], num_heads=2).overrides["num_heads"] == 2

    # the RoPE schedule of another model
    meta = dict(dinov3_meta[1], **{"rope_embed.periods": dinov3_meta[1]["rope_embed.periods"].float() * 1.5})
    torch.save(meta, tmp_path / "rope.pth")
    with pytest.raises(ct.ConversionError, match="RoPE periods differ"):
        ct.convert_dinov3(tmp_path / "rope.pth", 128, DINOV3_PRESETS["tiny"])

    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, tmp_path / "vit.pth")
    with pytest.raises(ct.ConversionError, match="neither in Meta's layout"):
        ct.convert_dinov3(tmp_path / "vit.pth", 128, DINOV3_PRESETS["tiny"])


# ------------------------------------------------------------------------------------------------ BiomedCLIP


def test_biomedclip_image_and_text_embeddings_match_open_clip(teachers_bundle, biomedclip_official):
    _, reference = biomedclip_official
    converted = teachers_bundle.modules["clip"]
    x = biomedclip_input(slices(2, 64, seed=8))
    ids = teachers_bundle.tokenizer(["the left parotid gland", "is the tumour near the spinal cord"])
    assert ids.shape == (2, 32) and int((ids == 1).sum()) == 0  # every word is in the vocabulary ([UNK] is 1)
    with torch.no_grad():
        ref_img, out_img = reference.encode_image(x), converted.encode_image(x)
        ref_txt, out_txt = reference.encode_text(ids), converted.encode_text(ids)
    assert ref_img.shape == (2, 32) and ref_txt.shape == (2, 32)
    assert max_diff(ref_img, out_img) < ATOL and max_diff(ref_txt, out_txt) < ATOL
    assert float(converted.logit_scale.detach()) == float(reference.logit_scale.detach())
    assert max_diff(ref_txt[0], ref_txt[1]) > 1e-2  # different texts, different embeddings


def test_biomedclip_official_preset_holds_the_official_tensors(tmp_path):
    """open_clip's BiomedCLIP (vit_base_patch16_224 + PubMedBERT-base, no pooler) and the vit_base preset agree."""
    from PRISMRTLib.models.biomedclip import build_biomedclip

    preset = BIOMEDCLIP_PRESETS["vit_base"]
    with torch.device("meta"):
        official, _, _ = open_clip_biomedclip(tmp_path / "bert", preset, "vit_base_patch16_224", 224)
        ours = build_biomedclip(preset)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(official)


def test_biomedclip_problems_are_named(ct, tmp_path, biomedclip_official):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(biomedclip_official[0], folder)
    tiny = BIOMEDCLIP_PRESETS["tiny"]

    (folder / "vocab.txt").rename(tmp_path / "vocab.txt")
    with pytest.raises(ct.ConversionError, match="pass --vocab"):
        ct.convert_biomedclip(folder, tiny)
    _, vocab, info = ct.convert_biomedclip(folder, tiny, vocab=tmp_path / "vocab.txt")
    assert vocab == tmp_path / "vocab.txt"
    assert info["dropped_benign"] == ["text.transformer.embeddings.position_ids", "text.transformer.pooler.dense.bias",
                                      "text.transformer.pooler.dense.weight"]

    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["image_size"] = 224
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ct.ConversionError, match="vision_cfg.image_size is 224, 64 expected"):
        ct.convert_biomedclip(folder, tiny, vocab=tmp_path / "vocab.txt")
    (folder / "open_clip_config.json").unlink()

    sd = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    sd["text.transformer.encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    del sd["visual.head.proj.weight"]
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ct.ConversionError) as err:
        ct.convert_biomedclip(folder, tiny, vocab=tmp_path / "vocab.txt")
    msg = str(err.value)
    assert "1 tensors missing (visual.head.proj.weight)" in msg
    assert "1 unexpected tensors (text.transformer.encoder.layer.2.output.dense.weight)" in msg


def test_biomedclip_vocab_from_tokenizer_json(ct, tmp_path, biomedclip_official):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(biomedclip_official[0], folder)
    tokens = (folder / "vocab.txt").read_text().splitlines()
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(tokens)}}}))
    _, vocab, _ = ct.convert_biomedclip(folder, BIOMEDCLIP_PRESETS["tiny"], workdir=tmp_path)
    assert vocab.read_text().splitlines() == tokens


# ------------------------------------------------------------------------------------------------ bundle and CLI


def test_bundle_records_sources_and_converter(teachers_bundle, medsam_official, dinov3_hf, biomedclip_official, ct):
    meta = teachers_bundle.meta
    assert meta["converter_version"] == ct.CONVERTER_VERSION and meta["teacher_set"] == "tiny"
    src = meta["sources"]
    assert src["medsam"]["sha256"] == hashlib.sha256(medsam_official[0].read_bytes()).hexdigest()
    dino_files = {f["file"]: f["sha256"] for f in src["dinov3"]["files"]}
    weights = (dinov3_hf[0] / "model.safetensors").read_bytes()
    assert dino_files["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert "config.json" in dino_files
    clip_files = {f["file"] for f in src["biomedclip"]["files"]}
    assert clip_files == {"open_clip_pytorch_model.bin", "open_clip_config.json", "vocab.txt"}
    assert teachers_bundle.tokenizer.tokenizer.convert_ids_to_tokens(5) == WORDS[0]


def run_cli(*args):
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)], capture_output=True, text=True,
                          cwd=str(REPO), timeout=120)


def test_cli_end_to_end(tmp_path, medsam_official, dinov3_meta, biomedclip_official):
    out = tmp_path / "bundle"
    done = subprocess.run(
        [sys.executable, str(CONVERTER), "--medsam", medsam_official[0], "--dinov3", dinov3_meta[0],
         "--biomedclip", biomedclip_official[0], "--out", out, "--teachers", "tiny", "--name", "teachers-test",
         "--version", "9.9"],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out)
    assert (bundle.kind, bundle.name, bundle.version) == ("teachers", "teachers-test", "9.9")
    assert bundle.configs["teachers"]["dino"]["config"]["timm_name"] == "vit_small_patch16_dinov3_qkvb"
    assert bundle.meta["sources"]["dinov3"]["layout"].startswith("Meta")


def test_cli_errors_are_one_line_with_exit_code_2(ct, tmp_path, capsys, medsam_official, dinov3_meta,
                                                  biomedclip_official):
    out = tmp_path / "bundle"
    out.mkdir()
    args = ["--medsam", medsam_official[0], "--dinov3", dinov3_meta[0], "--biomedclip", biomedclip_official[0],
            "--teachers", "tiny"]
    assert ct.main([*map(str, args), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # nothing written over

    args[1] = dinov3_meta[0]  # a DINOv3 file given as MedSAM
    assert ct.main([*map(str, args), "--out", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MedSAM") and "no image_encoder" in err and "\n" not in err
    assert not (tmp_path / "b2").exists()
