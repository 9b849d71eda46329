"""Config dataclasses of the mixed-granularity transformer; every default is the `debug` flavor's value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal

from model.validation import check, check_choices

# Enumerations are Literal types: the config loader refuses any other value, naming the choices.
Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "relu"]
CrossLayerMode = Literal["none", "bridge", "adaptive", "gated"]
PositionStyle = Literal["absolute", "roberta"]
PatchStem = Literal["linear", "conv"]


def _fail(cls: str, name: str, value, rule: str):
    check(False, f"{cls}.{name}", value, rule)


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(type(obj).__name__, n, v, "must be a positive int")


def _probability(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            _fail(type(obj).__name__, n, v, "must be a float in [0, 1)")


def _eps(obj, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
        _fail(type(obj).__name__, name, v, "must be a float in (0, 1)")


def _heads_divide(obj) -> None:
    if obj.dim % obj.heads:
        _fail(type(obj).__name__, "dim", obj.dim, f"must be divisible by heads={obj.heads}")


@dataclass
class TextConfig:
    """BERT/RoBERTa-layout text encoder (post-LN blocks)."""

    vocab_size: int = 1024  # token embedding rows: at least data.tokenizer's vocabulary (text_init sets it)
    layers: int = 2  # transformer blocks
    dim: int = 64  # hidden size
    heads: int = 2  # attention heads (dim must divide by it)
    mlp_dim: int = 256  # feed-forward inner size
    max_positions: int = 64  # size of the position table (RoBERTa's includes its pad offset: 514)
    type_vocab_size: int = 2  # token-type (segment) embeddings, as BERT has
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's 1e-12, RoBERTa's 1e-5)
    dropout: float = 0.0  # hidden and attention-probability dropout, as BERT uses one value for both
    activation: Activation = "gelu"  # feed-forward activation

    # "roberta": positions count non-pad tokens starting at pad_token_id + 1, as fairseq did
    position_style: PositionStyle = "absolute"

    # special token ids: taken from data.tokenizer's file (a value set here must agree with it)
    pad_token_id: int = 0
    bos_token_id: int = 101  # BERT's [CLS]; RoBERTa's <s> is 0
    eos_token_id: int = 102  # BERT's [SEP]; RoBERTa's </s> is 2
    mask_token_id: int = 103  # the [MASK] token masked language modelling puts in

    def __post_init__(self):
        _positive(self, "vocab_size", "layers", "dim", "heads", "mlp_dim", "max_positions", "type_vocab_size")
        _heads_divide(self)
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        check_choices(self, "TextConfig.")
        for n in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            v = getattr(self, n)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                _fail("TextConfig", n, v, f"must be an int in [0, vocab_size={self.vocab_size})")
        if self.position_style == "roberta" and self.max_positions <= self.pad_token_id + 1:
            _fail("TextConfig", "max_positions", self.max_positions,
                  f"must exceed pad_token_id + 1 = {self.pad_token_id + 1} with roberta positions")

    @property
    def max_seq_len(self) -> int:
        """Longest sequence the position table covers."""
        return self.max_positions - (self.pad_token_id + 1 if self.position_style == "roberta" else 0)


@dataclass
class VisionConfig:
    """ViT / CLIP-vision layout image encoder (pre-LN blocks); CLIP sets pre_layernorm and quick_gelu."""

    image_size: int = 32  # input side in pixels (images are resized to it); a multiple of patch_size
    patch_size: int = 8  # side of a square patch in pixels: (image_size / patch_size)^2 patches per image
    layers: int = 2  # transformer blocks
    dim: int = 64  # hidden size
    heads: int = 2  # attention heads (dim must divide by it)
    mlp_dim: int = 256  # feed-forward inner size
    channels: int = 3  # input channels (RGB)
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (ViT's 1e-6 / 1e-12, CLIP's 1e-5)
    dropout: float = 0.0  # hidden and attention-probability dropout
    activation: Activation = "gelu"  # feed-forward activation (CLIP: quick_gelu)
    pre_layernorm: bool = False  # CLIP's `pre_layrnorm` on the embeddings
    final_layernorm: bool = True  # ViT's `layernorm` / CLIP's `post_layernorm`, applied to the last layer
    patch_bias: bool = True  # CLIP's patch conv has no bias
    qkv_bias: bool = True  # biases on the query/key/value projections

    # how a patch becomes a token: "linear" (ViT/CLIP: one patch_size x patch_size stride-patch_size conv) or
    # "conv" (early convolutions after Xiao et al. 2021, here 3x3 stride-2 convs + GELU without their norm,
    # stem_channels doubling each, then a 2x2 stride-2 conv to dim; He-initialised; still one token per patch,
    # each seeing a little past its edges, so MIM blanks masked patches' pixels before it). Trained directly
    # on shapes, the debug tower learns them much faster with "conv"; in the debug recipe it did not reliably
    # improve captions (docs/LEARNING.md). Only "linear" loads from / exports to HF.
    stem: PatchStem = "linear"
    stem_channels: int = 32  # channels of the conv stem's first conv (doubled at each next one)

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "layers", "dim", "heads", "mlp_dim", "channels",
                  "stem_channels")
        _heads_divide(self)
        if self.image_size % self.patch_size:
            _fail("VisionConfig", "image_size", self.image_size,
                  f"must be divisible by patch_size={self.patch_size}")
        if self.stem == "conv" and (self.patch_size < 4 or self.patch_size & (self.patch_size - 1)):
            _fail("VisionConfig", "patch_size", self.patch_size,
                  "must be a power of two >= 4 with stem=conv (stride-2 convs down to one token per patch)")
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        check_choices(self, f"{type(self).__name__}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class FusionConfig:
    """Two-stream co-attention encoder with cross-layer interaction (docs/MODEL.md)."""

    layers: int = 2  # co-attention layers (each has a text and an image stream)
    dim: int = 64  # hidden size of both streams
    heads: int = 2  # attention heads (dim must divide by it)
    mlp_dim: int = 256  # feed-forward inner size

    # how fusion layer k mixes the unimodal layers into its input: none | bridge | adaptive | gated
    cross_layer: CrossLayerMode = "adaptive"
    # cross-attention keys/values are a learned mixture of the other stream's levels
    cross_level_attention: bool = True
    levels: int = 6  # the top `levels` unimodal layers feed the cross-layer mixtures (capped at the depth)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    dropout: float = 0.0  # hidden and attention-probability dropout
    activation: Activation = "gelu"  # feed-forward activation

    # initial logit of the current level in the cross-level mixture (others start at 0): near METER at init
    cross_level_init: float = 4.0

    def __post_init__(self):
        _positive(self, "layers", "dim", "heads", "mlp_dim", "levels")
        _heads_divide(self)
        if not isinstance(self.cross_level_attention, bool):
            _fail("FusionConfig", "cross_level_attention", self.cross_level_attention, "must be a bool")
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        check_choices(self, f"{type(self).__name__}.")


def _coerce(value, cls):
    """Accept a plain dict where a nested dataclass is expected (a YAML loader may hand one over)."""
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        # ValueError, not TypeError: every config error is a ValueError for the config loader
        raise ValueError(f"expected {cls.__name__} or dict, got {type(value).__name__}")  # noqa: TRY004
    return value


@dataclass
class ModelConfig:
    """The whole model: the three encoders plus the heads' shared sizes."""

    # a named size (debug, small, base, large, xl) whose values the fields below override
    flavor: str = "debug"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 64  # ITC and grounding projection size
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)

    # standard deviation of the normal initialisation of weights trained from scratch: 0.1 at the debug width
    # (64), where BERT's 0.02 leaves attention uniform for hundreds of steps; the larger flavors keep 0.02
    # (docs/LEARNING.md, "Why the demo did not learn")
    init_std: float = 0.1
    temperature_init: float = 0.07  # logit_scale starts at log(1 / temperature_init)
    max_logit_scale: float = 100.0  # exp(logit_scale) is capped here, as CLIP caps it (model/unimo.py)

    # a local Hugging Face folder to initialise the text encoder from ("" = from scratch): BERT / RoBERTa
    text_init: str = ""
    vision_init: str = ""  # the same for the image encoder: ViT / CLIP(-vision)

    def __post_init__(self):
        self.text = _coerce(self.text, TextConfig)
        self.vision = _coerce(self.vision, VisionConfig)
        self.fusion = _coerce(self.fusion, FusionConfig)
        _positive(self, "embed_dim")
        for n in ("flavor", "text_init", "vision_init"):
            if not isinstance(getattr(self, n), str):
                _fail("ModelConfig", n, getattr(self, n), "must be a str")
        for n in ("init_std", "temperature_init", "max_logit_scale"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or v <= 0:
                _fail("ModelConfig", n, v, "must be a positive float")


def config_to_dict(cfg) -> dict:
    """Plain nested dict of a config (for saving next to weights)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = config_to_dict(v) if is_dataclass(v) else v
    return out
