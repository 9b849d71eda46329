"""Loss maths of every objective; nothing distributed here: rank and gathered tensors are passed in.

Each loss computes in fp32 (bf16 logsumexp loses too much) and, when a batch has nothing to score (no masked
token, no masked patch), returns a zero that still depends on its input, so that every rank runs the same
backward graph (ZeRO-3 needs identical module traffic on all ranks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _zero(x: Tensor) -> Tensor:
    return x.float().sum() * 0.0


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, each flattened as (p_row, p_col,
    channel)."""
    B, C, H, W = pixels.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={P}")
    h, w = H // P, W // P
    x = pixels.reshape(B, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, h * w, P * P * C)


def multi_positive_nce(logits: Tensor, pos: Tensor) -> Tensor:
    """UNIMO's CMCL term per row: -log(sum over positives / sum over all columns), averaged over rows.

    logits (R, C) with -inf for excluded columns; pos (R, C) bool with at least one positive per row.
    """
    lse_all = torch.logsumexp(logits, dim=-1)  # (R,)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=-1)
    return (lse_all - lse_pos).mean()


def cmcl_loss(txt_local: Tensor, txt_owner: Tensor, img_local: Tensor, img_ids: Tensor,
              txt_all: Tensor, txt_owner_all: Tensor, img_all: Tensor, img_ids_all: Tensor,
              neg_txt: Tensor, neg_valid: Tensor, scale: Tensor) -> Tensor:
    """Symmetric multi-positive InfoNCE of this rank's rows against the global batch's columns.

    txt_local (T, E), txt_owner (T,): this rank's texts (captions and extra positive captions) and the image
    id each describes; img_local (B, E), img_ids (B,). *_all: the same gathered over ranks (columns).
    neg_txt (B, K, E): rewritten hard negatives, extra columns of their own image's row only (a rewrite of
    caption i may well describe image j, e.g. a sentence-level rewrite IS another image's caption);
    neg_valid (B, K) False where no rewrite applied (then the "negative" is the caption itself).
    All features L2-normalised; scale = exp(logit_scale), already clamped.
    """
    t2i = scale * txt_local.float() @ img_all.float().t()  # (T, W*B)
    t2i_pos = txt_owner[:, None] == img_ids_all[None, :]
    i2t = scale * img_local.float() @ txt_all.float().t()  # (B, W*T)
    i2t_pos = img_ids[:, None] == txt_owner_all[None, :]
    neg = scale * torch.einsum("be,bke->bk", img_local.float(), neg_txt.float())  # (B, K)
    neg = neg.masked_fill(~neg_valid, float("-inf"))
    i2t = torch.cat([i2t, neg], dim=1)  # (B, W*T + K)
    i2t_pos = torch.cat([i2t_pos, torch.zeros_like(neg_valid)], dim=1)
    return 0.5 * (multi_positive_nce(t2i, t2i_pos) + multi_positive_nce(i2t, i2t_pos))

def itc_loss(txt_local: Tensor, img_local: Tensor, txt_all: Tensor, img_all: Tensor, logit_scale: Tensor,
             rank: int, max_scale: float = 100.0) -> Tensor:
    """CLIP's symmetric InfoNCE, the plain case of ``cmcl_loss``: one caption per image, no rewrites; row i's
    positive is column rank*B + i of the gathered (W*B, E) features. ``logit_scale`` is the log-scale
    parameter, clamped at ``max_scale`` after exp as in CLIP. For model tests and one-process uses."""
    B = txt_local.shape[0]
    ids_all = torch.arange(img_all.shape[0], device=txt_local.device)
    ids = ids_all[rank * B:(rank + 1) * B]
    no_rewrite = txt_local.new_zeros(B, 1, txt_local.shape[-1])
    scale = logit_scale.float().exp().clamp(max=max_scale)
    return cmcl_loss(txt_local, ids, img_local, ids, txt_all, ids_all, img_all, ids_all, no_rewrite,
                     torch.zeros(B, 1, dtype=torch.bool, device=txt_local.device), scale)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, L, V) logits, (B, L) labels with IGNORE_INDEX for unmasked tokens."""
    if not bool((labels != IGNORE_INDEX).any()):
        return _zero(logits)
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token loss: position i predicts labels[i+1]; pad labels are IGNORE_INDEX."""
    return mlm_loss(logits[:, :-1], labels[:, 1:])


def masked_mean(per_row: Tensor, keep: Tensor, anchor: Tensor) -> Tensor:
    """Mean of per_row over keep; a zero still tied to ``anchor``'s graph when nothing is kept."""
    keep = keep.float()
    return (per_row * keep).sum() / keep.sum().clamp(min=1.0) + anchor.float().sum() * 0.0


def itm_loss(logits: Tensor, labels: Tensor, keep: Tensor | None = None) -> Tensor:
    """(R, 2) logits, (R,) labels (1 = matching pair); ``keep`` (R,) drops rows without a usable negative."""
    per_row = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return masked_mean(per_row, torch.ones_like(per_row) if keep is None else keep, logits)


def mim_loss(pred: Tensor, pixels: Tensor, patch_mask: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """MSE on masked patches against each patch's pixels normalised by its own mean/var (MAE's norm_pix)."""
    target = patchify(pixels.float(), patch_size)  # (B, N, P*P*C)
    if pred.shape != target.shape:
        raise ValueError(f"mim prediction {tuple(pred.shape)} != patchified pixels {tuple(target.shape)}")
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=False)
    target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, N)
    m = patch_mask.float()
    if not bool(m.any()):
        return _zero(pred)
    return (per_patch * m).sum() / m.sum()


def phrase_patch_scores(scores: Tensor, phrase_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Average token-to-patch scores over each phrase's tokens: (B, L, N), (B, P, L) -> (B, P, N), valid (B,
    P)."""
    m = phrase_mask.to(scores.dtype)
    count = m.sum(-1)  # (B, P)
    return (m @ scores) / count.clamp(min=1)[..., None], count > 0


def grounding_contrast(scores_pos: Tensor, scores_neg: Tensor, phrase_mask: Tensor,
                       neg_valid: Tensor) -> Tensor:
    """Phrase<->patch alignment without boxes, contrastive over images.

    scores_* (B, L, N): token-to-patch scores of text b fused with its own image (pos) and with a
    hard-negative image (neg). A phrase's score for an image is a soft max over that image's patches of the
    phrase-pooled scores (multiple-instance: some patch must show it); cross-entropy picks the paired image
    over the negative.
    """
    ps_pos, valid = phrase_patch_scores(scores_pos.float(), phrase_mask)  # (B, P, N), (B, P)
    ps_neg, _ = phrase_patch_scores(scores_neg.float(), phrase_mask)
    log_n = math.log(scores_pos.shape[-1])
    s_pos = torch.logsumexp(ps_pos, dim=-1) - log_n  # (B, P)
    s_neg = torch.logsumexp(ps_neg, dim=-1) - log_n
    per_phrase = -torch.stack([s_pos, s_neg], dim=-1).log_softmax(-1)[..., 0]  # (B, P)
    keep = valid & neg_valid[:, None]
    return masked_mean(per_phrase, keep, per_phrase)
