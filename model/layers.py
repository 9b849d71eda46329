"""Building blocks shared by the encoders: activations, attention, MLP, post-LN and pre-LN blocks, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    # CLIP's sigmoid approximation of GELU; its weights were trained with it, so parity needs it
    return x * torch.sigmoid(1.702 * x)


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return quick_gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"activation={name!r}: unknown")


# ----------------------------------------------------------------------------------------------- masks

def padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) 1=keep -> (B, 1, 1, S) bool, True = may attend."""
    return attention_mask.bool()[:, None, None, :]


def text_attention_mask(attention_mask: Tensor | None, length: int, mode: str,
                        prefix_len=None, device=None) -> Tensor | None:
    """Boolean SDPA mask (B|1, 1, L, L), True = may attend; None when nothing is masked.

    `bidirectional`: padding only; `causal`: j <= i; `prefix`: j < prefix_len or j <= i (prefix_len an int
    or a (B,) tensor). Padding keys are masked in every mode.
    """
    if mode not in ("bidirectional", "causal", "prefix"):
        raise ValueError(f"mask_mode={mode!r}: must be one of ['bidirectional', 'causal', 'prefix']")
    if attention_mask is not None and bool(attention_mask.bool().all()):
        attention_mask = None  # lets SDPA take its unmasked fast path
    if mode == "bidirectional":
        return None if attention_mask is None else padding_mask(attention_mask)
    i = torch.arange(length, device=device)
    allowed = (i[None, :] <= i[:, None])[None, None]  # (1, 1, L, L) causal
    if mode == "prefix":
        if prefix_len is None:
            raise ValueError("mask_mode='prefix' needs prefix_len")
        p = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # (B|1, 1, 1, 1)
        allowed = allowed | (i[None, None, None, :] < p)
    if attention_mask is not None:
        allowed = allowed & padding_mask(attention_mask)
    return allowed


def no_empty_rows(mask: Tensor | None) -> Tensor | None:
    """Let fully masked query rows (e.g. left padding under a causal mask) see themselves, so SDPA gives no
    NaN.

    Only rows with no allowed key change, and those are padding outputs that no loss reads.
    """
    if mask is None or mask.shape[-1] != mask.shape[-2]:
        return mask
    empty = ~mask.any(-1, keepdim=True)  # (B, 1, L, 1)
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | (empty & eye)


# ------------------------------------------------------------------------------------------- attention

def _heads(x: Tensor, heads: int) -> Tensor:
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)  # (B, L, D) -> (B, H, L, hd)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout as a function, not a module: under ZeRO-3 every module call costs four Python hooks."""
    return F.dropout(x, p, training) if training and p > 0 else x


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (one matmul instead of three)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, L, D = x.shape
        # split + per-tensor transpose, not one permute of (B, L, 3, H, hd): the permute's backward has to
        # re-pack the three gradients with an extra copy, measured ~8% slower per attention on CPU
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).split(D, dim=-1))  # (B, H, L, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class CrossAttention(nn.Module):
    """Queries from one stream, keys/values from the other (fused kv projection)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mem: Tensor, mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        q = _heads(self.q(x), self.heads)  # (B, H, L, hd)
        k, v = (_heads(t, self.heads) for t in self.kv(mem).split(D, dim=-1))  # (B, H, S, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------- blocks

class PostLNBlock(nn.Module):
    """BERT block: x = LN(x + attn(x)); x = LN(x + mlp(x)) (post-LN, so BERT/RoBERTa weights load as is)."""

    compile_unit = True  # compiled by compile_blocks (train.compile)
    whole_unit = True  # see whole_units

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, dropout: float, activation: str):
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, activation)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.drop_p = dropout  # applied with layers.dropout (no module)

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = self.ln1(x + dropout(self.attn(x, mask, is_causal), self.drop_p, self.training))  # (B, L, D)
        return self.ln2(x + dropout(self.mlp(x), self.drop_p, self.training))


class PreLNBlock(nn.Module):
    """ViT/CLIP block: x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    compile_unit = True
    whole_unit = True  # layers.whole_units

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, dropout: float, activation: str,
                 qkv_bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, dropout, bias=qkv_bias)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, activation)
        self.drop_p = dropout  # applied with layers.dropout (no module)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + dropout(self.attn(self.ln1(x), mask), self.drop_p, self.training)  # (B, N, D)
        return x + dropout(self.mlp(self.ln2(x)), self.drop_p, self.training)


def compile_blocks(root: nn.Module, **options) -> int:
    """Compiles (torch.compile, in place) every transformer block under ``root``: the encoders' blocks and
    the fusion streams' layers (modules whose class sets ``compile_unit``); returns how many.

    Blocks, not the whole model: the model's forward branches on data (which objectives, padding or not) and
    calls the text encoder several times per step, which would break or re-trace one big graph, while a
    block's forward is the same few ops every call. In place (``nn.Module.compile``) keeps parameter names,
    the module tree and its hooks (checkpoints, ZeRO-3) as they are.
    """
    n = 0
    for module in root.modules():
        if getattr(type(module), "compile_unit", False):
            module.compile(**options)
            n += 1
    return n


def whole_units(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` that run whole (their class sets ``whole_unit``): each is called by its
    parent, never skipped over, and every module and parameter inside it is used only within its own forward.

    The transformer blocks, the embeddings, the fusion's level projections, mixers and memories, and the
    heads. A sharded trainer can gather each one's parameters at once rather than sub-module by sub-module
    (ZeRO-3's leaf modules, FSDP's wrap units). tests/model/test_whole_units.py checks the property for
    every objective.
    """
    return [m for m in root.modules() if getattr(type(m), "whole_unit", False)]


def run_block(block: nn.Module, checkpointing: bool, *args, **kwargs) -> Tensor:
    """Call a block, recomputing its activations in backward when asked (saves memory, costs one forward)."""
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
