"""Random micro-batches shaped exactly like data_pipeline's, for tests and benchmarks that must not wait on
data."""

from __future__ import annotations

import torch


def _text(b: int, L: int, vocab: int, mask_id: int, g: torch.Generator, device) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (b, L), generator=g)
    pick = torch.rand(b, L, generator=g) < 0.15
    pick[:, 1] = True  # at least one masked token per row, so every MLM loss is defined
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(b, L, dtype=torch.long, device=device),
            "mlm_input_ids": ids.masked_fill(pick, mask_id).to(device),
            "mlm_labels": torch.where(pick, ids, torch.full_like(ids, -100)).to(device)}


def random_batch(cfg, b: int = 4, seq_len: int = 16, device="cpu", seed: int = 0) -> dict:
    """One mixed micro-batch (text, image, pair) for the RunConfig ``cfg``; vocabulary ids kept small."""
    g = torch.Generator().manual_seed(seed)
    t, v = cfg.model.text, cfg.model.vision
    vocab = min(t.vocab_size, 500)
    n = (v.image_size // v.patch_size) ** 2
    pixels = torch.randn(b, 3, v.image_size, v.image_size, generator=g).to(device)
    pair = _text(b, seq_len, vocab, t.mask_token_id, g, device)
    pos = _text(b, seq_len, vocab, t.mask_token_id, g, device)
    neg = _text(b, seq_len, vocab, t.mask_token_id, g, device)
    phrase_ids = torch.zeros(b, seq_len, dtype=torch.long)
    phrase_ids[:, 1:3], phrase_ids[:, 4:6] = 1, 2  # two concept phrases per caption
    pair.update({
        "pixels": pixels,
        "image_ids": torch.arange(b, device=device),
        "pos_input_ids": pos["input_ids"], "pos_attention_mask": pos["attention_mask"],
        "neg_input_ids": neg["input_ids"], "neg_attention_mask": neg["attention_mask"],
        "neg_kind": torch.zeros(b, dtype=torch.long, device=device),
        "phrase_ids": phrase_ids.to(device),
    })
    return {"text": _text(b, seq_len, vocab, t.mask_token_id, g, device),
            "image": {"pixels": torch.randn(b, 3, v.image_size, v.image_size, generator=g).to(device),
                      "patch_mask": (torch.rand(b, n, generator=g) < 0.5).to(device)},
            "pair": pair,
            "keys": {"text": [str(i) for i in range(b)], "image": [str(i) for i in range(b)],
                     "pair": [str(i) for i in range(b)]}}
