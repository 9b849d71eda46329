"""BERT/RoBERTa-compatible text encoder with bidirectional, causal and prefix-LM attention masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import TextConfig
from model.layers import PostLNBlock, dropout, no_empty_rows, run_block, text_attention_mask


class TextEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm (BERT's embedding layer)."""

    whole_unit = True  # layers.whole_units

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.ln = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.drop_p = cfg.dropout  # applied with layers.dropout (no module)

    def position_ids(self, input_ids: Tensor) -> Tensor:
        if self.cfg.position_style == "roberta":
            # fairseq's rule (RoBERTa weights expect it): pads sit at pad_id, real tokens count up from
            # pad_id+1
            keep = input_ids.ne(self.cfg.pad_token_id).long()
            return torch.cumsum(keep, dim=1) * keep + self.cfg.pad_token_id  # (B, L)
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, L)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        L = input_ids.shape[1]
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the position table ({self.cfg.max_seq_len})")
        x = self.word(input_ids) + self.position(self.position_ids(input_ids))  # (B, L, D)
        if token_type_ids is None:  # type 0 via the module, not its weight: ZeRO-3 gathers it for the call
            x = x + self.token_type(input_ids.new_zeros(1, 1))
        else:
            x = x + self.token_type(token_type_ids)
        return dropout(self.ln(x), self.drop_p, self.training)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.embeddings = TextEmbeddings(cfg)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.layer_norm_eps, cfg.dropout, cfg.activation)
            for _ in range(cfg.layers)
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                mask_mode: str = "bidirectional",
                prefix_len=None, token_type_ids: Tensor | None = None) -> list[Tensor]:
        """input_ids (B, L), attention_mask (B, L) 1=token -> one (B, L, D) per layer."""
        L = input_ids.shape[1]
        is_causal = False
        if mask_mode == "causal" and (attention_mask is None or bool(attention_mask.bool().all())):
            # an unpadded causal batch takes SDPA's is_causal path rather than materialising the (L, L) mask
            mask, is_causal = None, True
        else:
            mask = no_empty_rows(text_attention_mask(attention_mask, L, mask_mode,
                                                     prefix_len, input_ids.device))
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, D)
        states = []
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x, mask, is_causal)
            states.append(x)
        return states
