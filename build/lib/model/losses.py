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
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, each flattened as (p_row, p_col, channel)."""
    B, C, H, W = pixels.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={P}")
    h, w = H // P, W // P
    x = pixels.reshape(B, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, h * w, P * P * C)


def _symmetric_ce(t2i: Tensor, i2t: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * (F.cross_entropy(t2i, targets) + F.cross_entropy(i2t, targets))


def itc_loss(txt_local: Tensor, img_local: Tensor, txt_all: Tensor, img_all: Tensor, logit_scale: Tensor,
             rank: int, max_scale: float = 100.0) -> Tensor:
    """Symmetric InfoNCE: this rank's B rows against all world*B columns of the other modality.

    txt_local/img_local (B, E) and txt_all/img_all (W*B, E) are L2-normalised; row i's positive is column
    rank*B + i. logit_scale is the log-scale parameter; exp is clamped at max_scale as in CLIP. For gradients to
    reach other ranks' features, the caller gathers with autograd (or puts its local rows into the gather).
    """
    scale = logit_scale.float().exp().clamp(max=max_scale)
    B = txt_local.shape[0]
    targets = torch.arange(B, device=txt_local.device) + rank * B
    t2i = scale * txt_local.float() @ img_all.float().t()  # (B, W*B)
    i2t = scale * img_local.float() @ txt_all.float().t()
    return _symmetric_ce(t2i, i2t, targets)


def _multi_positive_nce(logits: Tensor, pos: Tensor) -> Tensor:
    """-log(sum over positives / sum over all), averaged over rows; pos (B, C) bool with >= 1 per row."""
    lse_all = torch.logsumexp(logits, dim=-1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=-1)
    return (lse_all - lse_pos).mean()


def cmcl_loss(txt_local: Tensor, img_local: Tensor, txt_all: Tensor, img_all: Tensor, logit_scale: Tensor,
              rank: int, hard_neg_txt: Tensor | None = None, pos_mask: Tensor | None = None,
              max_scale: float = 100.0) -> Tensor:
    """UNIMO's CMCL: ITC plus rewritten hard-negative texts and extra positives.

    hard_neg_txt (B, K, E): rewrites of each image's caption, extra columns for that image only (i2t side).
    pos_mask (B, W*B) bool: extra positives (e.g. other captions of the same image); the diagonal
    rank*B + i is always positive. Without both, this equals itc_loss.
    """
    scale = logit_scale.float().exp().clamp(max=max_scale)
    B, device = txt_local.shape[0], txt_local.device
    pos = torch.zeros(B, img_all.shape[0], dtype=torch.bool, device=device)
    pos[torch.arange(B, device=device), torch.arange(B, device=device) + rank * B] = True
    if pos_mask is not None:
        pos = pos | pos_mask.bool()
    t2i = scale * txt_local.float() @ img_all.float().t()  # (B, W*B)
    i2t = scale * img_local.float() @ txt_all.float().t()
    i2t_pos = pos
    if hard_neg_txt is not None:
        neg = scale * torch.einsum("be,bke->bk", img_local.float(), hard_neg_txt.float())  # (B, K)
        i2t = torch.cat([i2t, neg], dim=1)
        i2t_pos = torch.cat([pos, torch.zeros_like(neg, dtype=torch.bool)], dim=1)
    return 0.5 * (_multi_positive_nce(t2i, pos) + _multi_positive_nce(i2t, i2t_pos))


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, L, V) logits, (B, L) labels with IGNORE_INDEX for unmasked tokens."""
    if not bool((labels != IGNORE_INDEX).any()):
        return _zero(logits)
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token loss: position i predicts labels[i+1]; pad labels are IGNORE_INDEX."""
    return mlm_loss(logits[:, :-1], labels[:, 1:])


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, 2) logits, (B,) labels: 1 = matching pair."""
    return F.cross_entropy(logits.float(), labels.long())


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
    """Average token-to-patch scores over each phrase's tokens: (B, L, N), (B, P, L) -> (B, P, N), valid (B, P)."""
    m = phrase_mask.to(scores.dtype)
    count = m.sum(-1)  # (B, P)
    return (m @ scores) / count.clamp(min=1)[..., None], count > 0


def grounding_loss(scores: Tensor, phrase_mask: Tensor, labels: Tensor | None = None,
                   patch_targets: Tensor | None = None) -> Tensor:
    """Phrase-patch alignment (MVP's fine-grained level), without boxes unless patch targets are given.

    scores (B, L, N) token-to-patch; phrase_mask (B, P, L) marks each phrase's tokens.
    - patch_targets (B, P, N) >= 0 (e.g. from tag boxes): cross-entropy of each phrase over the patches.
    - else weak supervision (multiple-instance): a phrase's image score is the soft max over patches
      (logsumexp - log N), trained with BCE against labels (B,): 1 for matched pairs, 0 for ITM negatives.
    """
    ps, valid = phrase_patch_scores(scores.float(), phrase_mask)
    if not bool(valid.any()):
        return _zero(scores)
    if patch_targets is not None:
        t = patch_targets.float()
        t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
        per_phrase = -(t * ps.log_softmax(-1)).sum(-1)  # (B, P)
        keep = valid & (patch_targets.sum(-1) > 0)
        return _zero(scores) if not bool(keep.any()) else per_phrase[keep].mean()
    if labels is None:
        raise ValueError("grounding_loss without patch_targets needs labels (1 = matched pair, 0 = negative)")
    image_score = torch.logsumexp(ps, dim=-1) - math.log(ps.shape[-1])  # (B, P)
    y = labels.float()[:, None].expand_as(image_score)
    return F.binary_cross_entropy_with_logits(image_score[valid], y[valid])
