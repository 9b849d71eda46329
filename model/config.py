"""Config dataclasses of the mixed-granularity transformer; every default is the `debug` flavor's value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu")
CROSS_LAYER_MODES = ("none", "bridge", "adaptive", "gated")
POSITION_STYLES = ("absolute", "roberta")


def _fail(cls: str, name: str, value, rule: str):
    raise ValueError(f"{cls}.{name}={value!r}: {rule}")


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


def _one_of(obj, name: str, choices) -> None:
    v = getattr(obj, name)
    if v not in choices:
        _fail(type(obj).__name__, name, v, f"must be one of {list(choices)}")


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

    vocab_size: int = 1024
    layers: int = 2
    dim: int = 64
    heads: int = 2
    mlp_dim: int = 256
    max_positions: int = 64  # size of the position table (RoBERTa's includes its pad offset: 514)
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # hidden and attention-probability dropout, as BERT uses one value for both
    activation: str = "gelu"
    # "roberta": positions count non-pad tokens starting at pad_token_id + 1, as fairseq did
    position_style: str = "absolute"
    pad_token_id: int = 0
    bos_token_id: int = 101  # BERT's [CLS]; RoBERTa's <s> is 0
    eos_token_id: int = 102  # BERT's [SEP]; RoBERTa's </s> is 2
    mask_token_id: int = 103

    def __post_init__(self):
        _positive(self, "vocab_size", "layers", "dim", "heads", "mlp_dim", "max_positions", "type_vocab_size")
        _heads_divide(self)
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        _one_of(self, "activation", ACTIVATIONS)
        _one_of(self, "position_style", POSITION_STYLES)
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

    image_size: int = 32
    patch_size: int = 8
    layers: int = 2
    dim: int = 64
    heads: int = 2
    mlp_dim: int = 256
    channels: int = 3
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    activation: str = "gelu"
    pre_layernorm: bool = False  # CLIP's `pre_layrnorm` on the embeddings
    final_layernorm: bool = True  # ViT's `layernorm` / CLIP's `post_layernorm`, applied to the last layer
    patch_bias: bool = True  # CLIP's patch conv has no bias
    qkv_bias: bool = True

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "layers", "dim", "heads", "mlp_dim", "channels")
        _heads_divide(self)
        if self.image_size % self.patch_size:
            _fail("VisionConfig", "image_size", self.image_size,
                  f"must be divisible by patch_size={self.patch_size}")
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        _one_of(self, "activation", ACTIVATIONS)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class FusionConfig:
    """Two-stream co-attention encoder with cross-layer interaction (docs/MODEL.md)."""

    layers: int = 2
    dim: int = 64
    heads: int = 2
    mlp_dim: int = 256
    # how fusion layer k mixes the unimodal layers into its input: none | bridge | adaptive | gated
    cross_layer: str = "adaptive"
    # cross-attention keys/values are a learned mixture of the other stream's levels
    cross_level_attention: bool = True
    levels: int = 6  # the top `levels` unimodal layers feed the cross-layer mixtures (capped at the depth)
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    activation: str = "gelu"
    # initial logit of the current level in the cross-level mixture (others start at 0): near METER at init
    cross_level_init: float = 4.0

    def __post_init__(self):
        _positive(self, "layers", "dim", "heads", "mlp_dim", "levels")
        _heads_divide(self)
        _one_of(self, "cross_layer", CROSS_LAYER_MODES)
        if not isinstance(self.cross_level_attention, bool):
            _fail("FusionConfig", "cross_level_attention", self.cross_level_attention, "must be a bool")
        _eps(self, "layer_norm_eps")
        _probability(self, "dropout")
        _one_of(self, "activation", ACTIVATIONS)


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

    flavor: str = "debug"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 64  # ITC and grounding projection size
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)
    init_std: float = 0.02
    temperature_init: float = 0.07  # logit_scale starts at log(1 / temperature_init)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped here at use, as CLIP does
    # local Hugging Face folders to initialise the encoders from ("" = from scratch); text/vision must match
    text_init: str = ""  # BERT / RoBERTa
    vision_init: str = ""  # ViT / CLIP(-vision)

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
