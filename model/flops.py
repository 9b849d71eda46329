"""Analytic FLOPs per sample by data source and objective, parameter counts by part, and `model_info`.

Convention: a matmul of (m, k) @ (k, n) costs 2*m*k*n FLOPs; only matmuls, convolutions and attention products
are counted (LayerNorm, softmax, activations and embedding lookups are a few percent at most), which is what
torch.utils.flop_counter.FlopCounterMode counts too. Training cost = 3 x forward: the backward pass computes
the gradients of both the inputs and the weights of every matmul, each as large as the forward matmul.
Attention is counted over the full L x L score matrix even under a causal mask (SDPA computes it so on CPU and
this is what the counter reports); the ITC similarity matrix (2*B_global*E per sample) is left out.
"""

from __future__ import annotations

import torch

from model.config import FusionConfig, ModelConfig
from model.fusion import used_levels
from model.objective_registry import SOURCES, heads_of

# The heads each source's objectives run (model/objective_registry.py declares which objective runs which).
OBJECTIVES = {source: heads_of(source) for source in SOURCES}
DEFAULT_OBJECTIVES = {"text": ("mlm",), "image": ("mim",), "pair": ("itc", "itm", "mlm")}


# ------------------------------------------------------------------------------------- component costs

def _attention(S: int, M: int, D: int) -> int:
    return 4 * S * M * D  # scores (S, M) = Q K^T and the weighted sum of V, each 2*S*M*D


def _self_attn_block(S: int, D: int, F: int) -> int:
    """Self-attention (qkv + out projections + products) and the MLP, for S tokens."""
    return 2 * S * 4 * D * D + _attention(S, S, D) + 2 * 2 * S * D * F


def text_encoder_flops(cfg: ModelConfig, L: int) -> int:
    t = cfg.text
    return t.layers * _self_attn_block(L, t.dim, t.mlp_dim)


def patch_embed_flops(cfg: ModelConfig, num_patches: int) -> int:
    """The patch projection, or the conv stem's convolutions (model/vision_encoder.py::conv_stem)."""
    v = cfg.vision
    if v.stem != "conv":
        return 2 * num_patches * v.channels * v.patch_size ** 2 * v.dim
    cost, c_in, c_out, side = 0, v.channels, v.stem_channels, v.patch_size
    while side > 2:
        side //= 2  # each conv halves the side: (side/2)^2 outputs per patch, 3x3 taps each
        cost += 2 * num_patches * side ** 2 * 9 * c_in * c_out
        c_in, c_out = c_out, 2 * c_out
    return cost + 2 * num_patches * 4 * c_in * v.dim


def vision_encoder_flops(cfg: ModelConfig, num_patches: int) -> int:
    v = cfg.vision
    return (patch_embed_flops(cfg, num_patches)
            + v.layers * _self_attn_block(1 + num_patches, v.dim, v.mlp_dim))


def _stream_layer(S: int, M: int, f: FusionConfig, cross: bool) -> int:
    D = f.dim
    cost = _self_attn_block(S, D, f.mlp_dim)
    if cross:  # q and out projections on S tokens, fused kv on the M memory tokens, the products
        cost += 2 * 2 * S * D * D + 2 * M * D * 2 * D + _attention(S, M, D)
    return cost


def fusion_flops(cfg: ModelConfig, L: int, num_patches: int, text_causal: bool = False) -> int:
    f, T = cfg.fusion, 1 + num_patches
    t_levels, v_levels = min(f.levels, cfg.text.layers), min(f.levels, cfg.vision.layers)
    cost = 2 * L * cfg.text.dim * f.dim * len(used_levels(f, t_levels))  # level projections P_l
    cost += 2 * T * cfg.vision.dim * f.dim * len(used_levels(f, v_levels))
    if f.cross_layer == "gated":  # one (3D -> 1) score per token, level and layer
        cost += f.layers * 2 * 3 * f.dim * (L * t_levels + T * v_levels)
    # the image stream skips its cross-attention while the text stream is causal (see fusion.py)
    per_layer = _stream_layer(L, T, f, True) + _stream_layer(T, L, f, not text_causal)
    return cost + f.layers * per_layer


def _lm_head(in_dim: int, dim: int, vocab: int, positions: int) -> int:
    return 2 * positions * (in_dim * dim + dim * vocab)


def head_flops(cfg: ModelConfig, head: str, L: int, num_patches: int, positions: int | None = None) -> int:
    t, v, Df, E = cfg.text, cfg.vision, cfg.fusion.dim, cfg.embed_dim
    P = L if positions is None else positions
    if head == "text_mlm":
        return _lm_head(t.dim, t.dim, t.vocab_size, P)
    if head == "fused_mlm":
        return _lm_head(Df, t.dim, t.vocab_size, P)
    if head == "itc":
        return 2 * (t.dim + v.dim) * E
    if head == "itm":
        return 2 * 2 * Df * Df + 2 * 2 * Df * 2
    if head == "mim":
        return 2 * num_patches * v.dim * v.patch_size ** 2 * v.channels
    if head == "grounding":
        return 2 * (L + num_patches) * Df * E + 2 * L * num_patches * E
    raise ValueError(f"unknown head {head!r}")


# ------------------------------------------------------------------------------------------ per objective

def objective_flops(cfg: ModelConfig, source: str, objective: str, L: int, num_patches: int,
                    itm_negatives: int = 2, head_positions: int | None = None) -> int:
    """Forward FLOPs of one objective for one sample, as the objectives are meant to be run:

    text mlm / lm: a text-encoder pass (bidirectional / prefix) + the tied text head;
    image mim: a vision-encoder pass on the masked image + the MIM head;
    pair itc: text and vision passes + projections; itm: 1 + itm_negatives fusion passes on the ITC states;
    pair mlm: a pass of the masked text + fusion + fused MLM head; lm: a causal text pass + causal fusion +
    LM head; grounding: the grounding head on the ITM positive pass's fused states.
    head_positions: positions scored by the vocabulary heads (default all L; fewer if masked ones are
    gathered).
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {list(SOURCES)}")
    if objective not in OBJECTIVES[source]:
        raise ValueError(f"objective={objective!r} for source {source!r}: one of {list(OBJECTIVES[source])}")
    hp = head_positions
    if source == "text":
        return text_encoder_flops(cfg, L) + head_flops(cfg, "text_mlm", L, 0, hp)
    if source == "image":
        return vision_encoder_flops(cfg, num_patches) + head_flops(cfg, "mim", L, num_patches)
    if objective == "itc":
        return (text_encoder_flops(cfg, L) + vision_encoder_flops(cfg, num_patches)
                + head_flops(cfg, "itc", L, num_patches))
    if objective == "itm":
        return (1 + itm_negatives) * (fusion_flops(cfg, L, num_patches)
                                      + head_flops(cfg, "itm", L, num_patches))
    if objective == "mlm":
        return (text_encoder_flops(cfg, L) + fusion_flops(cfg, L, num_patches)
                + head_flops(cfg, "fused_mlm", L, num_patches, hp))
    if objective == "lm":
        return (text_encoder_flops(cfg, L) + fusion_flops(cfg, L, num_patches, text_causal=True)
                + head_flops(cfg, "fused_mlm", L, num_patches, hp))
    return head_flops(cfg, "grounding", L, num_patches)


def _num_patches(cfg: ModelConfig, image_size: int | None) -> int:
    size = cfg.vision.image_size if image_size is None else image_size
    return (size // cfg.vision.patch_size) ** 2


def flops_per_sample(cfg: ModelConfig, source: str, seq_len: int | None = None, image_size: int | None = None,
                     objectives=None, itm_negatives: int = 2, head_positions: int | None = None,
                     backward: bool = True) -> int:
    """FLOPs for one sample of `source` ('text', 'image', 'pair'): forward, x3 when backward (training).

    seq_len defaults to the text position table's length; objectives to DEFAULT_OBJECTIVES[source].
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {list(SOURCES)}")
    L = cfg.text.max_seq_len if seq_len is None else seq_len
    N = _num_patches(cfg, image_size)
    objs = DEFAULT_OBJECTIVES[source] if objectives is None else tuple(objectives)
    fwd = sum(objective_flops(cfg, source, o, L, N, itm_negatives, head_positions) for o in objs)
    return 3 * fwd if backward else fwd


# ---------------------------------------------------------------------------------------------- params

PARTS = ("text_encoder", "vision_encoder", "fusion", "heads")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (text_encoder, vision_encoder, fusion, heads) and total; tied weights counted
    once."""
    out = dict.fromkeys(PARTS, 0)
    part_of = {"text": "text_encoder", "vision": "vision_encoder", "fusion": "fusion"}
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        out[part_of.get(name.split(".")[0], "heads")] += p.numel()
    out["total"] = sum(out[k] for k in PARTS)
    return out


# ------------------------------------------------------------------------------------------------ report

def _human(n: float, billions: str = "G") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, billions), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def model_info(flavor: str, seq_len: int | None = None, text_seq_len: int | None = None) -> str:
    """Human-readable parameters per part and training FLOPs per sample per source of a flavor.

    The model is built on the meta device, so even `xl` costs no memory. seq_len is the caption length of
    pairs (default 40), text_seq_len the length of unpaired text (default the position table, at most 512).
    """
    from model.flavors import get_flavor
    from model.unimo import UnimoModel

    cfg = get_flavor(flavor)
    with torch.device("meta"):
        params = count_parameters(UnimoModel(cfg))
    t, v, f = cfg.text, cfg.vision, cfg.fusion
    pair_len = min(40, t.max_seq_len) if seq_len is None else seq_len
    text_len = min(512, t.max_seq_len) if text_seq_len is None else text_seq_len
    lines = [
        f"model flavor {flavor!r}",
        f"  text     {t.layers} layers x {t.dim} ({t.heads} heads, mlp {t.mlp_dim}), vocab {t.vocab_size}",
        (f"  vision   {v.layers} layers x {v.dim} ({v.heads} heads, mlp {v.mlp_dim}), "
         f"{v.image_size}px / patch {v.patch_size} = {v.num_patches} patches"),
        (f"  fusion   {f.layers} layers x {f.dim} ({f.heads} heads, mlp {f.mlp_dim}), "
         f"cross_layer={f.cross_layer}, cross_level_attention={'on' if f.cross_level_attention else 'off'}"),
        "parameters",
        *(f"  {k:<16}{params[k]:>16,}  ({_human(params[k], 'B')})" for k in (*PARTS, "total")),
        "training FLOPs per sample (forward + backward = 3 x forward; matmuls only)",
        f"  {'source':<8}{'objectives':<16}{'tokens':>8}{'image':>8}{'FLOPs':>14}",
    ]
    for source, L in (("text", text_len), ("image", 0), ("pair", pair_len)):
        objs = DEFAULT_OBJECTIVES[source]
        fl = flops_per_sample(cfg, source, seq_len=max(L, 1))
        img = "-" if source == "text" else str(v.image_size)
        lines.append(f"  {source:<8}{'+'.join(objs):<16}{(L if L else '-')!s:>8}{img:>8}{_human(fl):>14}")
    return "\n".join(lines)
