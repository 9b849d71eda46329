"""Load local Hugging Face BERT/RoBERTa text and ViT/CLIP-vision weights into UnimoModel's encoders.

A folder holds config.json and model.safetensors (or sharded *.safetensors with an index, or
pytorch_model.bin, read with torch.load(weights_only=True)). No hub access and no `transformers` import: the
key layouts are mapped here. Every checkpoint key is accounted for: loaded, known-unused (poolers, NSP heads,
CLIP's text tower) or unexpected; every encoder parameter is loaded or reported missing.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.config import TextConfig, VisionConfig
from model.vision_encoder import interpolate_positions

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
_TEXT_TYPES = {"bert": "absolute", "roberta": "roberta", "xlm-roberta": "roberta"}
_VISION_TYPES = ("vit", "clip_vision_model", "clip")


@dataclass
class LoadReport:
    """What a load did, by checkpoint/parameter name."""

    loaded: list[str] = field(default_factory=list)  # our parameter names that were filled
    missing: list[str] = field(default_factory=list)  # our parameters the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys we do not understand
    ignored: list[str] = field(default_factory=list)  # checkpoint keys known to be unused (poolers, ...)

    def check(self, strict: bool, what: str) -> None:
        if not (self.missing or self.unexpected):
            return
        msg = f"{what}: missing weights {self.missing}; unexpected weights {self.unexpected}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)


# ------------------------------------------------------------------------------------------ reading files

def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(cfg_file) as f:
        return json.load(f)


def _load_file(file: str) -> dict[str, Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """All tensors of a local checkpoint folder (single file or index-sharded, safetensors preferred)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(path, single)):
            return _load_file(os.path.join(path, single))
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for s in shards:
                sd.update(_load_file(os.path.join(path, s)))
            return sd
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their index) in {path}")


def _normalise_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # original TF-converted BERT checkpoints name LayerNorm parameters gamma/beta
    out = {}
    for k, v in sd.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)] = v
    return out


def _strip_prefix(sd: dict[str, Tensor], prefixes: tuple[str, ...], anchor: str) -> dict[str, Tensor]:
    """Drop a head model's base prefix (`bert.`, `vit.`, `vision_model.`) when `anchor` sits under it."""
    for p in prefixes:
        if p + anchor in sd:
            return {(k.removeprefix(p)): v for k, v in sd.items()}
    return dict(sd)


# -------------------------------------------------------------------------------------- config from folder

def _activation(hf: dict) -> str:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _special(hf: dict, key: str, default: int, vocab: int) -> int:
    v = hf.get(key)
    if v is None or not 0 <= v < vocab:
        v = default if default < vocab else min(3, vocab - 1)  # tiny test vocabularies
    return int(v)


def text_config_from_hf(path: str, **overrides) -> TextConfig:
    """TextConfig matching a local BERT/RoBERTa folder's config.json."""
    hf = read_config(path)
    mt = hf.get("model_type")
    if mt not in _TEXT_TYPES:
        raise ValueError(f"model_type={mt!r} in {path}: text loading supports {sorted(_TEXT_TYPES)}")
    vocab, roberta = hf["vocab_size"], _TEXT_TYPES[mt] == "roberta"
    pad = _special(hf, "pad_token_id", 1 if roberta else 0, vocab)
    kw = {
        "vocab_size": vocab, "layers": hf["num_hidden_layers"], "dim": hf["hidden_size"],
        "heads": hf["num_attention_heads"], "mlp_dim": hf["intermediate_size"],
        "max_positions": hf["max_position_embeddings"], "type_vocab_size": hf.get("type_vocab_size", 2),
        "layer_norm_eps": hf.get("layer_norm_eps", 1e-12), "activation": _activation(hf),
        "position_style": _TEXT_TYPES[mt], "pad_token_id": pad,
        "bos_token_id": _special(hf, "bos_token_id", 0 if roberta else 101, vocab),
        "eos_token_id": _special(hf, "eos_token_id", 2 if roberta else 102, vocab),
        "mask_token_id": _special(hf, "mask_token_id", vocab - 1 if roberta else 103, vocab),
    }
    kw.update(overrides)
    return TextConfig(**kw)


def _vision_hf(hf: dict) -> dict:
    return hf["vision_config"] if hf.get("model_type") == "clip" else hf


def vision_config_from_hf(path: str, **overrides) -> VisionConfig:
    """VisionConfig matching a local ViT or CLIP(-vision) folder's config.json."""
    hf = read_config(path)
    mt = hf.get("model_type")
    if mt not in _VISION_TYPES:
        raise ValueError(f"model_type={mt!r} in {path}: vision loading supports {list(_VISION_TYPES)}")
    clip = mt != "vit"
    v = _vision_hf(hf)
    kw = {
        "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 16),
        "layers": v.get("num_hidden_layers", 12), "dim": v.get("hidden_size", 768),
        "heads": v.get("num_attention_heads", 12), "mlp_dim": v.get("intermediate_size", 3072),
        "channels": v.get("num_channels", 3),
        "layer_norm_eps": v.get("layer_norm_eps", 1e-5 if clip else 1e-12),
        "activation": _activation({"hidden_act": v.get("hidden_act", "quick_gelu" if clip else "gelu")}),
        "pre_layernorm": clip, "final_layernorm": True, "patch_bias": not clip,
        "qkv_bias": True if clip else v.get("qkv_bias", True),
    }
    kw.update(overrides)
    return VisionConfig(**kw)


def _check_config(ours, theirs, fields: tuple[str, ...], what: str) -> None:
    diff = [f"{f}: model {getattr(ours, f)!r} vs checkpoint {getattr(theirs, f)!r}"
            for f in fields if getattr(ours, f) != getattr(theirs, f)]
    if diff:
        raise ValueError(f"{what}: config does not match the checkpoint ({'; '.join(diff)})")


# ------------------------------------------------------------------------------------------ key mappings

def _cat(*keys: str):
    return (list(keys), lambda ts: torch.cat(ts, dim=0))


def _one(key: str, fn=None):
    return ([key], (lambda ts: ts[0]) if fn is None else (lambda ts: fn(ts[0])))


def _linear(ours: str, theirs: str) -> dict:
    return {f"{ours}.weight": _one(f"{theirs}.weight"), f"{ours}.bias": _one(f"{theirs}.bias")}


def _qkv(ours: str, q: str, k: str, v: str, bias: bool = True) -> dict:
    m = {f"{ours}.weight": _cat(f"{q}.weight", f"{k}.weight", f"{v}.weight")}
    if bias:
        m[f"{ours}.bias"] = _cat(f"{q}.bias", f"{k}.bias", f"{v}.bias")
    return m


def _bert_map(layers: int) -> dict:
    m = {"text.embeddings.word.weight": _one("embeddings.word_embeddings.weight"),
         "text.embeddings.position.weight": _one("embeddings.position_embeddings.weight"),
         "text.embeddings.token_type.weight": _one("embeddings.token_type_embeddings.weight"),
         **_linear("text.embeddings.ln", "embeddings.LayerNorm")}
    for i in range(layers):
        o, t = f"text.blocks.{i}", f"encoder.layer.{i}"
        m.update(_qkv(f"{o}.attn.qkv", *(f"{t}.attention.self.{n}" for n in ("query", "key", "value"))))
        m.update(_linear(f"{o}.attn.out", f"{t}.attention.output.dense"))
        m.update(_linear(f"{o}.ln1", f"{t}.attention.output.LayerNorm"))
        m.update(_linear(f"{o}.mlp.fc1", f"{t}.intermediate.dense"))
        m.update(_linear(f"{o}.mlp.fc2", f"{t}.output.dense"))
        m.update(_linear(f"{o}.ln2", f"{t}.output.LayerNorm"))
    return m


def _mlm_head_map(sd: dict) -> dict:
    """Optional: a *ForMaskedLM / *ForPreTraining checkpoint's MLM transform into our text MLM head."""
    if "cls.predictions.transform.dense.weight" in sd:
        return {**_linear("mlm_text_head.dense", "cls.predictions.transform.dense"),
                **_linear("mlm_text_head.ln", "cls.predictions.transform.LayerNorm"),
                "mlm_text_head.decoder.bias": _one("cls.predictions.bias")}
    if "lm_head.dense.weight" in sd:
        return {**_linear("mlm_text_head.dense", "lm_head.dense"),
                **_linear("mlm_text_head.ln", "lm_head.layer_norm"),
                "mlm_text_head.decoder.bias": _one("lm_head.bias")}
    return {}


def _vit_map(layers: int) -> dict:
    m = {"vision.embeddings.cls": _one("embeddings.cls_token"),
         "vision.embeddings.pos": _one("embeddings.position_embeddings"),
         **_linear("vision.embeddings.proj", "embeddings.patch_embeddings.projection"),
         **_linear("vision.final_ln", "layernorm")}
    for i in range(layers):
        o, t = f"vision.blocks.{i}", f"encoder.layer.{i}"
        m.update(_qkv(f"{o}.attn.qkv", *(f"{t}.attention.attention.{n}" for n in ("query", "key", "value"))))
        m.update(_linear(f"{o}.attn.out", f"{t}.attention.output.dense"))
        m.update(_linear(f"{o}.ln1", f"{t}.layernorm_before"))
        m.update(_linear(f"{o}.ln2", f"{t}.layernorm_after"))
        m.update(_linear(f"{o}.mlp.fc1", f"{t}.intermediate.dense"))
        m.update(_linear(f"{o}.mlp.fc2", f"{t}.output.dense"))
    return m


def _clip_map(layers: int) -> dict:
    m = {"vision.embeddings.cls": _one("embeddings.class_embedding", lambda t: t.reshape(1, 1, -1)),
         "vision.embeddings.pos": _one("embeddings.position_embedding.weight", lambda t: t[None]),
         "vision.embeddings.proj.weight": _one("embeddings.patch_embedding.weight"),
         **_linear("vision.embeddings.pre_ln", "pre_layrnorm"),
         **_linear("vision.final_ln", "post_layernorm")}
    for i in range(layers):
        o, t = f"vision.blocks.{i}", f"encoder.layers.{i}"
        m.update(_qkv(f"{o}.attn.qkv", *(f"{t}.self_attn.{n}_proj" for n in "qkv")))
        m.update(_linear(f"{o}.attn.out", f"{t}.self_attn.out_proj"))
        m.update(_linear(f"{o}.ln1", f"{t}.layer_norm1"))
        m.update(_linear(f"{o}.ln2", f"{t}.layer_norm2"))
        m.update(_linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1"))
        m.update(_linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2"))
    return m


_TEXT_IGNORED = re.compile(r"^(pooler\.|cls\.seq_relationship\.|cls\.predictions\.decoder\."
                           r"|lm_head\.decoder\.|embeddings\.position_ids$)")
_VISION_IGNORED = re.compile(r"^(pooler\.|classifier\.|embeddings\.position_ids$)")
# a full CLIPModel folder also holds the text tower and projections, which the vision encoder does not use
_CLIP_IGNORED = re.compile(r"^(embeddings\.position_ids$|text_model\.|text_projection\.|visual_projection\."
                           r"|logit_scale$)")


# ------------------------------------------------------------------------------------------------ loading

def _apply(model: torch.nn.Module, sd: dict[str, Tensor], mapping: dict, required: set[str],
           ignored: re.Pattern, fixups: dict | None = None) -> LoadReport:
    params = dict(model.named_parameters())
    report, used = LoadReport(), set()
    for ours, (keys, combine) in mapping.items():
        if not all(k in sd for k in keys):
            used.update(k for k in keys if k in sd)  # known keys of an incomplete group are not "unexpected"
            if ours in required:
                report.missing.append(f"{ours} (checkpoint keys {[k for k in keys if k not in sd]})")
            continue
        value = combine([sd[k] for k in keys])
        if fixups and ours in fixups:
            value = fixups[ours](value)
        p = params[ours]
        if value.shape != p.shape:
            raise ValueError(f"{ours}: checkpoint {keys} has shape {tuple(value.shape)}, model "
                             f"{tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
        report.loaded.append(ours)
        used.update(keys)
    for k in sorted(set(sd) - used):
        (report.ignored if ignored.match(k) else report.unexpected).append(k)
    return report


def load_text_encoder(model, path: str, strict: bool = True) -> LoadReport:
    """Fill model.text (and, if present, the text MLM head) from a local BERT/RoBERTa folder."""
    theirs = text_config_from_hf(path)
    _check_config(model.cfg.text, theirs, ("vocab_size", "layers", "dim", "heads", "mlp_dim", "max_positions",
                                           "type_vocab_size", "layer_norm_eps", "activation",
                                           "position_style", "pad_token_id"), f"text weights from {path}")
    sd = _normalise_keys(read_state_dict(path))
    sd = _strip_prefix(sd, ("bert.", "roberta."), "embeddings.word_embeddings.weight")
    enc = _bert_map(theirs.layers)
    report = _apply(model, sd, {**enc, **_mlm_head_map(sd)}, set(enc), _TEXT_IGNORED)
    report.check(strict, f"text weights from {path}")
    return report


def load_vision_encoder(model, path: str, strict: bool = True) -> LoadReport:
    """Fill model.vision from a local ViT or CLIP(-vision) folder; positions are resized to our image size."""
    hf = read_config(path)
    theirs = vision_config_from_hf(path)
    ours = model.cfg.vision
    _check_config(ours, theirs, ("patch_size", "layers", "dim", "heads", "mlp_dim", "channels",
                                 "layer_norm_eps", "activation", "pre_layernorm", "patch_bias", "qkv_bias",
                                 "stem"),
                  f"vision weights from {path}")
    sd = _normalise_keys(read_state_dict(path))
    clip = hf.get("model_type") != "vit"
    sd = _strip_prefix(sd, ("vision_model.", "vit."),
                       "embeddings.class_embedding" if clip else "embeddings.cls_token")
    mapping = _clip_map(theirs.layers) if clip else _vit_map(theirs.layers)
    required = set(mapping)
    if not clip and "embeddings.mask_token" in sd:  # ViT trained with masking (e.g. SimMIM) carries one
        mapping["vision.embeddings.mask_token"] = _one("embeddings.mask_token")
    grid = ours.image_size // ours.patch_size
    fix = {"vision.embeddings.pos": lambda pos: interpolate_positions(pos, grid, grid)}
    ignored = _CLIP_IGNORED if hf.get("model_type") == "clip" else _VISION_IGNORED
    report = _apply(model, sd, mapping, required, ignored, fix)
    report.check(strict, f"vision weights from {path}")
    _warn_on_other_pixel_statistics(path)
    return report


# How unimo's loader normalises every image (data_pipeline/batch.py pixels_tensor): (x / 255 - 0.5) / 0.5.
PIPELINE_PIXEL_MEAN, PIPELINE_PIXEL_STD = 0.5, 0.5


def _warn_on_other_pixel_statistics(path: str) -> None:
    """Weights trained on pixels normalised otherwise (CLIP's mean (0.481, 0.458, 0.408), std (0.269,
    0.261, 0.276), in the folder's preprocessor_config.json) get shifted, rescaled inputs from unimo's
    loader: the tower starts off its training distribution and has to adapt. Said at load, since nothing
    else would."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return
    with open(file, encoding="utf-8") as f:
        conf = json.load(f)
    mean, std = conf.get("image_mean"), conf.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list)):
        return
    if any(abs(m - PIPELINE_PIXEL_MEAN) > 1e-3 for m in mean) or any(abs(s - PIPELINE_PIXEL_STD) > 1e-3
                                                                      for s in std):
        warnings.warn(f"vision weights from {path} were trained on pixels normalised with mean {mean} and "
                      f"std {std} ({file}); unimo's loader normalises every image with mean "
                      f"{PIPELINE_PIXEL_MEAN} and std {PIPELINE_PIXEL_STD}, so the tower starts on shifted "
                      "inputs and must adapt in training", stacklevel=2)


# ------------------------------------------------------------------------------------------------ saving
# The inverse of the loading maps: our towers written as Hugging Face folders (config.json +
# model.safetensors) that `transformers` loads as BertModel / RobertaModel, ViTModel or CLIPVisionModel.

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
                   "relu": "relu"}
_NOT_EXPORTED = re.compile(r"^vision\.embeddings\.mask_token$")  # MIM's [MASK] patch: no field in ViT/CLIP


def text_hf_config(cfg: TextConfig) -> dict:
    """config.json of the text tower: BERT for absolute positions, RoBERTa for fairseq-style ones."""
    roberta = cfg.position_style == "roberta"
    return {
        "model_type": "roberta" if roberta else "bert",
        "architectures": ["RobertaModel" if roberta else "BertModel"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
        "hidden_act": _HF_ACTIVATIONS[cfg.activation], "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "position_embedding_type": "absolute", "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "mask_token_id": cfg.mask_token_id,
    }


def _vision_kind(cfg: VisionConfig) -> str:
    if cfg.stem != "linear":
        raise ValueError(f"model.vision.stem={cfg.stem!r} has no transformers equivalent (ViT and CLIP embed "
                         "patches with one linear projection): the vision tower cannot be exported as a "
                         "Hugging Face folder")
    if not cfg.final_layernorm:
        raise ValueError("model.vision.final_layernorm=false has no transformers equivalent (ViT and CLIP "
                         "both end with a LayerNorm): the vision tower cannot be exported as a "
                         "Hugging Face folder")
    if not cfg.pre_layernorm and cfg.patch_bias:
        return "vit"
    if cfg.pre_layernorm and not cfg.patch_bias and cfg.qkv_bias:
        return "clip"
    raise ValueError(f"model.vision (pre_layernorm={cfg.pre_layernorm}, patch_bias={cfg.patch_bias}, "
                     f"qkv_bias={cfg.qkv_bias}) is neither ViT's layout (no pre-LN, patch bias) nor CLIP's "
                     f"(pre-LN, no patch bias, qkv bias): no transformers class loads it")


def vision_hf_config(cfg: VisionConfig) -> dict:
    """config.json of the vision tower: ViT, or CLIP-vision for CLIP's layout."""
    common = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels,
              "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.mlp_dim, "hidden_act": _HF_ACTIVATIONS[cfg.activation],
              "layer_norm_eps": cfg.layer_norm_eps}
    if _vision_kind(cfg) == "clip":
        return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], **common,
                "attention_dropout": cfg.dropout}
    return {"model_type": "vit", "architectures": ["ViTModel"], **common, "qkv_bias": cfg.qkv_bias,
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}


def _invert(params: dict[str, Tensor], mapping: dict,
            reshape: dict[str, tuple] | None = None) -> dict[str, Tensor]:
    """Our parameters -> checkpoint keys: a concatenated group (q, k, v) is split back in equal parts."""
    out = {}
    for ours, (keys, _) in mapping.items():
        if ours not in params:
            continue
        value = params[ours].detach().to("cpu", torch.float32)
        parts = value.chunk(len(keys), dim=0) if len(keys) > 1 else (value,)
        for key, part in zip(keys, parts):
            out[key] = part.reshape(reshape[key]) if reshape and key in reshape else part
    return {k: v.contiguous().clone() for k, v in out.items()}  # own storage each (tied/viewed weights)


def text_state_dict_to_hf(model) -> dict[str, Tensor]:
    """model.text as BertModel/RobertaModel keys (the encoder; the MLM head stays ours)."""
    params = dict(model.named_parameters())
    mapping = _bert_map(model.cfg.text.layers)
    left = sorted(n for n in params if n.startswith("text.") and n not in mapping)
    if left:
        raise ValueError(f"text parameters with no Hugging Face key: {left}")
    return _invert(params, mapping)


def vision_state_dict_to_hf(model) -> dict[str, Tensor]:
    """model.vision as ViTModel or CLIPVisionModel keys."""
    cfg = model.cfg.vision
    params = dict(model.named_parameters())
    unmapped = [n for n in params if n.startswith("vision.") and not _NOT_EXPORTED.match(n)]
    if _vision_kind(cfg) == "vit":
        mapping, prefix, reshape = _vit_map(cfg.layers), "", None
    else:
        n = cfg.num_patches + 1
        mapping, prefix = _clip_map(cfg.layers), "vision_model."
        reshape = {"embeddings.class_embedding": (cfg.dim,),
                   "embeddings.position_embedding.weight": (n, cfg.dim)}
    out = _invert(params, mapping, reshape)
    left = sorted(set(unmapped) - set(mapping))
    if left:
        raise ValueError(f"vision parameters with no Hugging Face key: {left}")
    return {prefix + k: v for k, v in out.items()}


def _save_folder(path: str, config: dict, state: dict[str, Tensor]) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def save_text_encoder(model, path: str) -> str:
    """Writes the text tower as a BERT/RoBERTa folder (config.json, model.safetensors); returns ``path``."""
    return _save_folder(path, text_hf_config(model.cfg.text), text_state_dict_to_hf(model))


def save_vision_encoder(model, path: str) -> str:
    """Writes the vision tower as a ViT or CLIP-vision folder (config.json, model.safetensors, and the
    preprocessor_config.json of the pipeline's resize and (x/255 - 0.5)/0.5 normalisation); returns
    ``path``."""
    cfg = model.cfg.vision
    _save_folder(path, vision_hf_config(cfg), vision_state_dict_to_hf(model))
    clip = _vision_kind(cfg) == "clip"
    size = {"shortest_edge": cfg.image_size} if clip else {"height": cfg.image_size, "width": cfg.image_size}
    pre = {"image_processor_type": "CLIPImageProcessor" if clip else "ViTImageProcessor", "do_resize": True,
           "size": size, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5] * cfg.channels, "image_std": [0.5] * cfg.channels}
    if clip:
        pre.update(do_center_crop=True, crop_size={"height": cfg.image_size, "width": cfg.image_size})
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)
    return path


# ------------------------------------------------------------------------------ shaping towers from folders
# model.text_init / model.vision_init name the folders; the towers take their shapes from the folders'
# config.json, so a config states only the folder. A value the config states explicitly must agree.

TEXT_SHAPE_FIELDS = ("vocab_size", "layers", "dim", "heads", "mlp_dim", "max_positions", "type_vocab_size",
                     "layer_norm_eps", "activation", "position_style", "pad_token_id")
VISION_SHAPE_FIELDS = ("patch_size", "layers", "dim", "heads", "mlp_dim", "channels", "layer_norm_eps",
                       "activation", "pre_layernorm", "final_layernorm", "patch_bias", "qkv_bias", "stem")


def _conflicts(section: str, explicit: dict, folder_cfg, fields: tuple[str, ...], path: str) -> None:
    bad = [f"{section}.{k}={explicit[k]!r} (the folder has {getattr(folder_cfg, k)!r})"
           for k in fields if k in explicit and explicit[k] != getattr(folder_cfg, k)]
    if bad:
        init = "text_init" if section.endswith("text") else "vision_init"
        raise ValueError(f"{', '.join(bad)} conflict with model.{init}={path}: the tower's shape comes from "
                         f"the folder's config.json; drop these settings or use another folder")


def shaped_text_config(path: str, explicit: dict) -> TextConfig:
    """The text tower of a BERT/RoBERTa folder; ``explicit``: the model.text keys the config states."""
    hf = read_config(path)
    if hf.get("model_type") == "clip":
        raise ValueError(f"model.text_init={path} is a CLIP folder: CLIP's text tower (causal, pre-LN) has "
                         "no equivalent in the BERT-layout text encoder; use it as model.vision_init and "
                         f"give text_init a BERT/RoBERTa folder")
    cfg = text_config_from_hf(path)
    _conflicts("model.text", explicit, cfg, TEXT_SHAPE_FIELDS, path)
    return cfg


def shaped_vision_config(path: str, explicit: dict) -> VisionConfig:
    """The vision tower of a ViT/CLIP folder; an explicit image_size is kept (positions are interpolated)."""
    cfg = vision_config_from_hf(path, **{k: explicit[k] for k in ("image_size", "dropout") if k in explicit})
    _conflicts("model.vision", explicit, cfg, VISION_SHAPE_FIELDS, path)
    return cfg


def folder_tokenizer(path: str) -> str:
    """The tokenizer.json of a Hugging Face folder, or "" when it has none."""
    f = os.path.join(path, "tokenizer.json")
    return f if os.path.isfile(f) else ""
