"""Greedy and beam-search decoding: captions for images (fused causal text stream) and text continuations.

No KV cache: each step re-runs the encoders on the whole (short) sequence, because the fusion layers mix every
unimodal level and a cache would have to hold all of them. Captions are ~20 tokens, so this stays cheap.
Decoding is deterministic: eval mode, argmax/top-k without sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.unimo import UnimoModel


def _right_pad(input_ids: Tensor, attention_mask: Tensor | None, pad: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the left (prompts may come left-padded) -> ids (B, P), lengths (B,)."""
    if attention_mask is None:
        return input_ids, torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    out = torch.full_like(input_ids, pad)
    for b in range(input_ids.shape[0]):
        out[b, : int(lengths[b])] = input_ids[b][keep[b]]
    return out[:, : max(int(lengths.max()), 1)], lengths


class _Stepper:
    """Next-token log-probabilities at each sequence's last real token."""

    def __init__(self, model: UnimoModel, image_states: list[Tensor] | None, prompt_len: Tensor):
        self.model, self.image_states, self.prompt_len = model, image_states, prompt_len

    def __call__(self, ids: Tensor, lengths: Tensor) -> Tensor:
        T = int(lengths.max())
        ids = ids[:, :T]
        mask = (torch.arange(T, device=ids.device)[None] < lengths[:, None]).long()  # (B, T)
        m = self.model
        if self.image_states is not None:
            # captioning: causal unimodal text and causal fused text stream, reading the image
            ts = m.encode_text(ids, mask, mask_mode="causal")
            t, _ = m.fuse(ts, mask, self.image_states, text_causal=True)
            logits = m.lm_logits_fused(t)
        else:
            # continuation: the prompt is bidirectional, generated tokens causal (prefix LM, UNIMO's seq2seq)
            ts = m.encode_text(ids, mask, mask_mode="prefix", prefix_len=self.prompt_len)
            logits = m.mlm_logits_text(ts[-1])
        last = logits[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # (B, V)
        return last.float().log_softmax(-1)


@torch.no_grad()
def generate(model: UnimoModel, pixels: Tensor | None = None, input_ids: Tensor | None = None,
             attention_mask: Tensor | None = None, max_new_tokens: int = 20, num_beams: int = 1,
             eos_token_id: int | None = None, bos_token_id: int | None = None,
             pad_token_id: int | None = None, length_penalty: float = 1.0) -> Tensor:
    """Generate up to max_new_tokens per row -> (B, T) new tokens (EOS included), padded with pad_token_id.

    pixels given: captions (the prompt defaults to [BOS]); else continuations of input_ids (required).
    num_beams=1 is greedy. Beam scores are summed log-probs divided by length**length_penalty at the end.
    """
    tc = model.cfg.text
    eos = tc.eos_token_id if eos_token_id is None else eos_token_id
    bos = tc.bos_token_id if bos_token_id is None else bos_token_id
    pad = tc.pad_token_id if pad_token_id is None else pad_token_id
    if pixels is None and input_ids is None:
        raise ValueError("generate needs pixels (captioning) or input_ids (text continuation)")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        if input_ids is None:
            input_ids = torch.full((pixels.shape[0], 1), bos, dtype=torch.long, device=pixels.device)
        ids, lengths = _right_pad(input_ids, attention_mask, pad)
        max_new_tokens = min(max_new_tokens, tc.max_seq_len - int(lengths.max()))
        if max_new_tokens < 1:
            raise ValueError(f"prompt of {int(lengths.max())} tokens leaves no room in "
                             f"{tc.max_seq_len} positions")
        image_states = None if pixels is None else model.encode_image(pixels)
        return _beam_search(model, ids, lengths, image_states, max_new_tokens, num_beams, eos, pad,
                            length_penalty)
    finally:
        model.train(was_training)


def _beam_search(model, ids, lengths, image_states, max_new, K, eos, pad, length_penalty) -> Tensor:
    B, device = ids.shape[0], ids.device
    # K copies of every row; only copy 0 is live at the start so the first top-k does not pick duplicates
    rep = lambda x: x.repeat_interleave(K, dim=0)
    buf = torch.full((B * K, ids.shape[1] + max_new), pad, dtype=torch.long, device=device)
    buf[:, : ids.shape[1]] = rep(ids)
    lengths = rep(lengths)
    states = None if image_states is None else [rep(s) for s in image_states]
    step = _Stepper(model, states, lengths.clone())
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    n_new = torch.zeros(B * K, dtype=torch.long, device=device)
    rows = torch.arange(B * K, device=device)
    for _ in range(max_new):
        logp = step(buf, lengths)  # (B*K, V)
        V = logp.shape[-1]
        logp[:, pad] = float("-inf")  # pad is filler, never a generated token
        # a finished beam can only continue with pad, at no cost, so it keeps its score
        finished_row = torch.full_like(logp, float("-inf"))
        finished_row[:, pad] = 0.0
        logp = torch.where(done[:, None], finished_row, logp)
        cand = (scores[..., None] + logp.view(B, K, V)).view(B, K * V)
        scores, idx = cand.topk(K, dim=-1)  # (B, K)
        src = (idx // V + torch.arange(B, device=device)[:, None] * K).view(-1)  # (B*K,) parent rows
        tok = (idx % V).view(-1)
        buf, lengths, done, n_new = buf[src], lengths[src], done[src], n_new[src]
        live = ~done
        buf[rows[live], lengths[live]] = tok[live]
        lengths = lengths + live.long()
        n_new = n_new + live.long()
        done = done | (live & (tok == eos))
        if bool(done.all()):
            break
    norm = scores / n_new.view(B, K).clamp(min=1).float().pow(length_penalty)
    best = norm.argmax(-1) + torch.arange(B, device=device) * K  # (B,)
    start = step.prompt_len[best]
    out = torch.full((B, int(n_new[best].max())), pad, dtype=torch.long, device=device)
    for b in range(B):
        r = int(best[b])
        out[b, : int(n_new[r])] = buf[r, int(start[b]): int(start[b]) + int(n_new[r])]
    return out
