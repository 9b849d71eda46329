"""Objective heads: tied MLM/LM decoders, ITM, MIM pixel regression, phrase-patch grounding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.layers import activation_fn


class TiedLMHead(nn.Module):
    """BERT's prediction head: dense -> act -> LN -> decoder whose weight IS the word-embedding matrix.

    The decoder is an nn.Linear sharing the embedding Parameter (not a bare F.linear on it), so ZeRO-3, which
    gathers a module's parameters when that module runs, sees the weight used inside this module's forward.
    """

    whole_unit = True  # layers.whole_units

    def __init__(self, in_dim: int, embedding: nn.Embedding, eps: float, activation: str):
        super().__init__()
        vocab, dim = embedding.weight.shape
        self.dense = nn.Linear(in_dim, dim)
        self.act = activation_fn(activation)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = embedding.weight  # tied

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.ln(self.act(self.dense(h))))  # (B, L, V)


class ITMHead(nn.Module):
    """Match / no-match from the fused CLS of both streams (each pooled by dense+tanh, then concatenated)."""

    whole_unit = True  # layers.whole_units

    def __init__(self, dim: int):
        super().__init__()
        self.text_pool = nn.Linear(dim, dim)
        self.image_pool = nn.Linear(dim, dim)
        self.classifier = nn.Linear(2 * dim, 2)

    def forward(self, t_cls: Tensor, v_cls: Tensor) -> Tensor:
        pooled = [self.text_pool(t_cls).tanh(), self.image_pool(v_cls).tanh()]  # 2 x (B, Df)
        return self.classifier(torch.cat(pooled, dim=-1))  # (B, 2)


class MIMHead(nn.Module):
    """Linear regression of each patch's (normalised) pixels from the last vision layer, as SimMIM."""

    whole_unit = True  # layers.whole_units

    def __init__(self, dim: int, patch_size: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, v: Tensor) -> Tensor:
        return self.proj(v[:, 1:])  # (B, N, P*P*C), CLS dropped


class GroundingHead(nn.Module):
    """Token-to-patch alignment scores from the fused streams (scaled dot product of projections)."""

    whole_unit = True  # layers.whole_units

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.text = nn.Linear(dim, embed_dim)
        self.image = nn.Linear(dim, embed_dim)
        self.scale = 1.0 / math.sqrt(embed_dim)

    def forward(self, t: Tensor, v: Tensor) -> Tensor:
        gt = self.text(t)  # (B, L, E)
        gv = self.image(v[:, 1:])  # (B, N, E)
        return gt @ gv.transpose(1, 2) * self.scale  # (B, L, N)
