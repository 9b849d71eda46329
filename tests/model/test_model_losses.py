"""Loss maths: ITC targets across ranks, CMCL, MLM/LM ignore and shift, MIM on masked patches, grounding."""

import math

import torch
import torch.nn.functional as F

from model import losses


def _feats(n, e=8, seed=0):
    return F.normalize(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_itc_sharded_equals_global():
    txt, img = _feats(6, seed=1), _feats(6, seed=2)
    scale = torch.tensor(math.log(10.0))
    full = losses.itc_loss(txt, img, txt, img, scale, rank=0)
    # two ranks of 3: the mean of their local losses equals the single-process loss
    shards = [losses.itc_loss(txt[r * 3:(r + 1) * 3], img[r * 3:(r + 1) * 3], txt, img, scale, rank=r)
              for r in range(2)]
    torch.testing.assert_close(sum(shards) / 2, full)
    # perfectly aligned features with a large scale give ~zero loss
    assert losses.itc_loss(txt, txt, txt, txt, torch.tensor(math.log(100.0)), 0) < 0.1


def test_itc_clamps_logit_scale():
    txt, img = _feats(4, seed=1), _feats(4, seed=2)
    a = losses.itc_loss(txt, img, txt, img, torch.tensor(math.log(100.0)), 0)
    b = losses.itc_loss(txt, img, txt, img, torch.tensor(10.0), 0)  # exp(10) clamps at 100
    torch.testing.assert_close(a, b)


def test_itc_is_clips_symmetric_cross_entropy():
    """itc_loss is cmcl_loss's plain case (one caption per image, no rewrites): CLIP's loss, written out."""
    txt, img = _feats(4, seed=1), _feats(4, seed=2)
    s = torch.tensor(math.log(10.0))
    logits = 10.0 * txt @ img.t()
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4)))
    torch.testing.assert_close(losses.itc_loss(txt, img, txt, img, s, 0), clip)


def test_mlm_and_lm_loss():
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    zero = losses.mlm_loss(logits.requires_grad_(), labels)
    assert zero.item() == 0.0 and zero.requires_grad  # still in the graph for ZeRO-3
    labels[0, 2] = 3
    torch.testing.assert_close(losses.mlm_loss(logits, labels),
                               F.cross_entropy(logits[0, 2:3], labels[0, 2:3]))
    ids = torch.tensor([[1, 2, 3, -100]])
    lg = torch.randn(1, 4, 11)
    torch.testing.assert_close(losses.lm_loss(lg, ids), F.cross_entropy(lg[0, :2], ids[0, 1:3]))


def test_patchify_and_mim_loss():
    px = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    p = losses.patchify(px, 2)
    assert p.shape == (2, 4, 12)
    assert p[0, 1, :3].tolist() == [px[0, 0, 0, 2].item(), px[0, 1, 0, 2].item(), px[0, 2, 0, 2].item()]
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]])
    t = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    pred = t.clone()
    pred[0, 1] += 100.0  # an unmasked patch: ignored
    assert losses.mim_loss(pred, px, mask, 2) < 1e-8
    pred[0, 0] += 1.0
    torch.testing.assert_close(losses.mim_loss(pred, px, mask, 2), torch.tensor(0.5))
    assert losses.mim_loss(pred, px, torch.zeros_like(mask), 2).item() == 0.0


def test_itm_loss():
    logits = torch.tensor([[0.0, 10.0], [10.0, 0.0], [10.0, 0.0]])
    assert losses.itm_loss(logits, torch.tensor([1, 0, 0])) < 1e-3
    # a dropped row (no usable negative) does not count, however wrong
    assert losses.itm_loss(logits, torch.tensor([1, 0, 1]), keep=torch.tensor([1.0, 1.0, 0.0])) < 1e-3
    assert losses.itm_loss(logits, torch.tensor([1, 0, 1])) > 1.0


def test_grounding_contrast_prefers_the_paired_image():
    """A phrase's score for an image is a soft max over its patches; the loss picks the paired image over the
    look-alike, and a row without a usable negative or a phrase scores nothing."""
    scores = torch.zeros(2, 4, 3)
    scores[:, 1, 2] = 8.0  # token 1 lights up patch 2 of the paired image
    phrases = torch.zeros(2, 2, 4, dtype=torch.bool)
    phrases[:, 0, 1] = True  # one one-token phrase per sample; the second phrase slot is empty
    ok = torch.tensor([True, True])
    good = losses.grounding_contrast(scores, torch.zeros_like(scores), phrases, ok)
    bad = losses.grounding_contrast(torch.zeros_like(scores), scores, phrases, ok)
    assert good < 0.01 < bad
    assert losses.grounding_contrast(scores, scores, torch.zeros_like(phrases), ok).item() == 0.0
    assert losses.grounding_contrast(torch.zeros_like(scores), scores, phrases, ~ok).item() == 0.0
