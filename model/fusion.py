"""Cross-modal encoder: two co-attention streams with cross-layer (multi-level) inputs and cross-level
attention.

Fusion layer k of a stream reads x_k = LN(x_{k-1} + sum_l alpha_{k,l} P_l(U_l)) (docs/MODEL.md): U_l are the
top `levels` unimodal layers of its own modality and P_l = Linear(LN(U_l)). The modes differ only in alpha:
`none` (only the last unimodal layer, into layer 1), `bridge` (one fixed layer each), `adaptive` (softmax of
learned logits) and `gated` (token-wise softmax over levels of a learned score of [x_{k-1}; P_l U_l]).
With cross-level attention on, the keys/values a stream's cross-attention reads are a learned mixture of the
other stream's levels (its projected unimodal layers and its fusion inputs up to layer k), not only layer k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import FusionConfig
from model.layers import (
    MLP,
    CrossAttention,
    SelfAttention,
    dropout,
    no_empty_rows,
    padding_mask,
    run_block,
    text_attention_mask,
)


def bridge_level(k: int, fusion_layers: int, levels: int) -> int:
    """Which unimodal level (0 = lowest of the window) feeds fusion layer k in `bridge` mode.

    BridgeTower's pairing: the last fusion layer takes the last unimodal layer, earlier ones go down one each.
    """
    return max(0, levels - fusion_layers + k)


def used_levels(cfg: FusionConfig, levels: int) -> list[int]:
    """The unimodal levels a stream needs projections for (unused projections would get no gradient)."""
    if cfg.cross_level_attention or cfg.cross_layer in ("adaptive", "gated"):
        return list(range(levels))
    if cfg.cross_layer == "bridge":
        return sorted({bridge_level(k, cfg.layers, levels) for k in range(cfg.layers)})
    return [levels - 1]


class LevelProjections(nn.Module):
    """P_l: LN + Linear from a unimodal layer into the fusion width, plus a modality embedding."""

    whole_unit = True  # layers.whole_units

    def __init__(self, in_dim: int, cfg: FusionConfig, levels: list[int]):
        super().__init__()
        self.levels = list(levels)
        # LN first: pre-LN vision layers are unnormalised and their scale grows with depth
        self.proj = nn.ModuleDict({
            str(l): nn.Sequential(nn.LayerNorm(in_dim, eps=cfg.layer_norm_eps), nn.Linear(in_dim, cfg.dim))
            for l in levels
        })
        # tells the streams apart, as METER's type embedding
        self.modality = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, window: list[Tensor]) -> list[Tensor | None]:
        """window: the top unimodal layers, each (B, S, Du) -> per level (B, S, Df), None where unused.

        A list, not a dict keyed by int: DeepSpeed ZeRO-3's forward hooks only understand str-keyed mappings.
        """
        out: list[Tensor | None] = [None] * len(window)
        for l, p in self.proj.items():
            out[int(l)] = p(window[int(l)]) + self.modality
        return out


class LevelMixer(nn.Module):
    """Computes one stream's fusion-layer input x_k from x_{k-1} and its projected unimodal levels."""

    whole_unit = True  # layers.whole_units

    def __init__(self, cfg: FusionConfig, levels: int):
        super().__init__()
        self.mode, self.levels, self.fusion_layers = cfg.cross_layer, levels, cfg.layers
        n_norms = 1 if self.mode == "none" else cfg.layers
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) for _ in range(n_norms))
        if self.mode == "adaptive":
            self.logits = nn.Parameter(torch.zeros(cfg.layers, levels))  # uniform at init
        if self.mode == "gated":
            # [x; u; x*u]: with [x; u] alone the x-term is the same for every level and cancels in the
            # softmax; no bias for the same reason (a shared shift of all levels' scores)
            self.gates = nn.ModuleList(nn.Linear(3 * cfg.dim, 1, bias=False) for _ in range(cfg.layers))

    def forward(self, k: int, x_prev: Tensor | None, proj: dict[int, Tensor]) -> Tensor:
        if self.mode == "none":
            return self.norms[0](proj[self.levels - 1]) if k == 0 else x_prev
        if self.mode == "bridge":
            mix = proj[bridge_level(k, self.fusion_layers, self.levels)]
        elif self.mode == "adaptive":
            alpha = self.logits[k].softmax(-1)  # (levels,)
            mix = sum(alpha[l] * proj[l] for l in range(self.levels))
        else:
            mix = self._gated(k, x_prev, proj)
        return self.norms[k](mix if x_prev is None else x_prev + mix)  # (B, S, Df)

    def _gated(self, k: int, x_prev: Tensor | None, proj: dict[int, Tensor]) -> Tensor:
        u = [proj[l] for l in range(self.levels)]
        x = torch.zeros_like(u[0]) if x_prev is None else x_prev
        scores = torch.cat([self.gates[k](torch.cat([x, ul, x * ul], -1)) for ul in u], -1)  # (B, S, levels)
        alpha = scores.softmax(-1)
        return sum(alpha[..., l:l + 1] * u[l] for l in range(self.levels))


class CrossLevelMemory(nn.Module):
    """Keys/values for cross-attention at layer k: softmax-weighted mixture of the other stream's levels.

    Candidates: the other stream's projected unimodal levels, then its fusion inputs x_0..x_k; at init the
    current level x_k dominates (logit cross_level_init vs 0), so the encoder starts close to METER.
    """

    whole_unit = True  # layers.whole_units

    def __init__(self, cfg: FusionConfig, levels: int):
        super().__init__()
        self.levels = levels
        init = torch.zeros(cfg.layers, levels + cfg.layers)
        for k in range(cfg.layers):
            init[k, levels + k] = cfg.cross_level_init
        self.logits = nn.Parameter(init)

    def forward(self, k: int, proj: dict[int, Tensor], inputs: list[Tensor]) -> Tensor:
        cands = [proj[l] for l in range(self.levels)] + inputs[: k + 1]
        w = self.logits[k, : len(cands)].softmax(-1)  # later layers' slots do not exist yet at layer k
        return sum(w[i] * c for i, c in enumerate(cands))  # (B, S, Df)


class CoAttentionLayer(nn.Module):
    """One stream of a fusion layer: self-attn, cross-attn to the other stream, MLP; post-LN as METER/BERT."""

    compile_unit = True  # compiled by layers.compile_blocks (train.compile)
    whole_unit = True  # layers.whole_units

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.layer_norm_eps
        self.self_attn = SelfAttention(d, cfg.heads, cfg.dropout)
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.cross_attn = CrossAttention(d, d, cfg.heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, cfg.mlp_dim, cfg.activation)
        self.ln3 = nn.LayerNorm(d, eps=eps)
        self.drop_p = cfg.dropout  # applied with layers.dropout (no module)

    def forward(self, x: Tensor, mem: Tensor | None, self_mask: Tensor | None = None,
                mem_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        # (B, S, D)
        x = self.ln1(x + dropout(self.self_attn(x, self_mask, is_causal), self.drop_p, self.training))
        if mem is not None:  # None: this stream must not see the other (image stream while captioning)
            x = self.ln2(x + dropout(self.cross_attn(x, mem, mem_mask), self.drop_p, self.training))
        return self.ln3(x + dropout(self.mlp(x), self.drop_p, self.training))


class FusionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.text = CoAttentionLayer(cfg)
        self.image = CoAttentionLayer(cfg)


class CrossModalEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, text_dim: int, text_layers: int, image_dim: int, image_layers: int,
                 checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.t_levels, self.v_levels = min(cfg.levels, text_layers), min(cfg.levels, image_layers)
        self.text_proj = LevelProjections(text_dim, cfg, used_levels(cfg, self.t_levels))
        self.image_proj = LevelProjections(image_dim, cfg, used_levels(cfg, self.v_levels))
        self.text_mixer = LevelMixer(cfg, self.t_levels)
        self.image_mixer = LevelMixer(cfg, self.v_levels)
        if cfg.cross_level_attention:
            self.text_memory = CrossLevelMemory(cfg, self.t_levels)  # what the image stream reads
            self.image_memory = CrossLevelMemory(cfg, self.v_levels)  # what the text stream reads
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.layers))

    @staticmethod
    def _window(states, levels: int, needed: list[int], name: str) -> list[Tensor | None]:
        """The top `levels` unimodal layers (lowest first); lower ones that no mode reads may be absent."""
        states = [states] if isinstance(states, Tensor) else list(states)
        window = [None] * max(0, levels - len(states)) + states[-levels:]
        if any(window[l] is None for l in needed):
            raise ValueError(f"fusion needs the top {levels - min(needed)} {name} layers, got "
                             f"{len(states)} states")
        return window

    def forward(self, text_states, text_mask: Tensor | None, image_states,
                text_causal: bool = False) -> tuple[Tensor, Tensor]:
        """text_states: per-layer (B, L, Dt); image_states: per-layer (B, 1+N, Dv)
        -> (B, L, Df), (B, 1+N, Df).

        text_causal: causal text self-attention for captioning; the image stream then skips its
        cross-attention to text, because through it later tokens would reach earlier ones at the next layer.
        """
        pt = self.text_proj(self._window(text_states, self.t_levels, self.text_proj.levels, "text"))
        pv = self.image_proj(self._window(image_states, self.v_levels, self.image_proj.levels, "image"))
        L = next(t for t in pt if t is not None).shape[1]
        t_self, t_causal, t_key = self._text_masks(text_mask, L, text_causal)
        t_in, v_in, t, v = [], [], None, None
        for k, layer in enumerate(self.layers):
            t_in.append(self.text_mixer(k, t, pt))  # (B, L, Df)
            v_in.append(self.image_mixer(k, v, pv))  # (B, 1+N, Df)
            v_mem = self.image_memory(k, pv, v_in) if self.cfg.cross_level_attention else v_in[k]
            t_mem = None
            if not text_causal:
                t_mem = self.text_memory(k, pt, t_in) if self.cfg.cross_level_attention else t_in[k]
            t = run_block(layer.text, self.checkpointing, t_in[k], v_mem, t_self, None, t_causal)
            v = run_block(layer.image, self.checkpointing, v_in[k], t_mem, None, t_key)
        return t, v

    @staticmethod
    def _text_masks(text_mask: Tensor | None, L: int, causal: bool):
        """-> (text self-attention mask, is_causal flag, key-padding mask for the image stream's
        cross-attn)."""
        if text_mask is not None and bool(text_mask.bool().all()):
            text_mask = None
        if causal and text_mask is None:
            return None, True, None
        mode = "causal" if causal else "bidirectional"
        self_mask = no_empty_rows(text_attention_mask(text_mask, L, mode, device=text_mask.device
                                                      if text_mask is not None else None))
        return self_mask, False, None if text_mask is None else padding_mask(text_mask)
