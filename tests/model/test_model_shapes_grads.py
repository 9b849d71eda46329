"""Shapes for every cross-layer mode, and gradients reaching every parameter the objectives use."""

import math

import pytest
import torch

from model import losses
from model.flavors import get_flavor
from model.unimo import UnimoModel

MODES = ["none", "bridge", "adaptive", "gated"]


def _model(mode="adaptive", cross_level=True, **fusion):
    torch.manual_seed(0)
    cfg = get_flavor("debug")
    cfg.fusion.cross_layer = mode
    cfg.fusion.cross_level_attention = cross_level
    for k, v in fusion.items():
        setattr(cfg.fusion, k, v)
    return UnimoModel(cfg)


def _batch(B=2, L=10, size=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 1000, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3:] = 0
    ids[1, L - 3:] = 0
    return ids, mask, torch.randn(B, 3, size, size, generator=g)


def _all_objectives(m, ids, mask, px):
    """Every objective once, as the trainer would run them; returns the summed loss."""
    B, L = ids.shape
    ts = m.encode_text(ids, mask)
    vs = m.encode_image(px)
    t, v = m.fuse(ts, mask, vs)
    ti, ii = m.itc_features(ts, vs)
    labels = ids.masked_fill(mask == 0, -100)
    loss = losses.itc_loss(ti, ii, ti, ii, m.logit_scale, rank=0)
    loss = loss + losses.itm_loss(m.itm_logits(t, v), torch.tensor([1, 0]))
    loss = loss + losses.mlm_loss(m.mlm_logits_text(ts[-1]), labels)
    loss = loss + losses.mlm_loss(m.mlm_logits_fused(t), labels)
    pmask = torch.zeros(B, 2, L, dtype=torch.bool)
    pmask[:, 0, 1:3] = True
    scores = m.grounding_scores(t, v)
    loss = loss + losses.grounding_contrast(scores, scores.flip(0), pmask, torch.ones(B, dtype=torch.bool))
    patch_mask = torch.zeros(B, m.num_patches, dtype=torch.bool)
    patch_mask[:, ::3] = True
    vm = m.encode_image(px, patch_mask)
    loss = loss + losses.mim_loss(m.mim_predict(vm[-1]), px, patch_mask, m.cfg.vision.patch_size)
    tc, _ = m.fuse(m.encode_text(ids, mask, mask_mode="causal"), mask, vs, text_causal=True)
    return loss + losses.lm_loss(m.lm_logits_fused(tc), labels)


@pytest.mark.parametrize("cross_level", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_shapes_every_mode(mode, cross_level):
    m = _model(mode, cross_level)
    ids, mask, px = _batch()
    ts = m.encode_text(ids, mask)
    vs = m.encode_image(px)
    N = m.num_patches
    assert (N == 16 and [s.shape for s in ts] == [(2, 10, 64)] * 2
            and [s.shape for s in vs] == [(2, 17, 64)] * 2)
    t, v = m.fuse(ts, mask, vs)
    assert t.shape == (2, 10, 64) and v.shape == (2, 1 + N, 64)
    ti, ii = m.itc_features(ts, vs)
    assert ti.shape == ii.shape == (2, 64)
    torch.testing.assert_close(ti.norm(dim=-1), torch.ones(2))
    assert m.mlm_logits_text(ts[-1]).shape == (2, 10, 1024)
    assert m.mlm_logits_fused(t).shape == m.lm_logits_fused(t).shape == (2, 10, 1024)
    assert m.itm_logits(t, v).shape == (2, 2)
    assert m.mim_predict(vs[-1]).shape == (2, N, 8 * 8 * 3)
    assert m.grounding_scores(t, v).shape == (2, 10, N)
    assert torch.isfinite(t).all() and torch.isfinite(v).all()


@pytest.mark.parametrize("cross_level", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_reaches_every_parameter(mode, cross_level):
    m = _model(mode, cross_level)
    _all_objectives(m, *_batch()).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead, f"no gradient: {dead}"
    # the mixing weights really learn (not just receive zeros)
    mixers = [n for n, p in m.named_parameters() if "logits" in n or "gates" in n]
    assert all(m.get_parameter(n).grad.abs().sum() > 0 for n in mixers)


def test_fewer_levels_than_unimodal_layers():
    torch.manual_seed(0)
    cfg = get_flavor("debug")
    cfg.text.layers, cfg.vision.layers, cfg.fusion.levels, cfg.fusion.layers = 4, 3, 2, 3
    for mode in MODES:
        cfg.fusion.cross_layer = mode
        m = UnimoModel(cfg)
        ids, mask, px = _batch()
        t, v = m.fuse(m.encode_text(ids, mask), mask, m.encode_image(px))
        assert t.shape == (2, 10, 64) and v.shape == (2, 17, 64)


def test_fusion_accepts_single_final_state_when_one_level():
    m = _model("none", cross_level=False)
    ids, mask, px = _batch()
    ts, vs = m.encode_text(ids, mask), m.encode_image(px)
    a = m.fuse(ts, mask, vs)[0]
    b = m.fuse(ts[-1], mask, vs[-1])[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="top 2 text layers"):
        _model("adaptive").fuse(ts[-1], mask, vs)


def test_logit_scale_init():
    m = _model()
    assert abs(m.logit_scale.item() - torch.log(torch.tensor(1 / 0.07)).item()) < 1e-6
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.temperature_scale().item() == pytest.approx(100.0)


@pytest.mark.parametrize("above", [0.0, 0.5])
def test_the_capped_temperature_can_come_down_but_not_go_up(above):
    """At or above the cap the scale stays 100; a loss that wants a softer temperature still moves the
    parameter down (a plain clamp gave it no gradient there, for good), one that wants a harder one does not
    move it up."""
    from model.unimo import capped_logit_scale

    cap = 100.0
    for wants_lower, sign in ((True, 1.0), (False, -1.0)):
        x = torch.nn.Parameter(torch.tensor([math.log(cap) + above]))
        scale = capped_logit_scale(x, cap)
        assert scale.item() == pytest.approx(cap)
        (sign * scale).sum().backward()  # d(loss)/d(scale) = sign: > 0 wants the scale lower
        stepped = x.detach() - 0.1 * x.grad  # one plain gradient step
        assert (stepped < x.detach()).item() if wants_lower else (x.grad == 0).item()
    below = torch.nn.Parameter(torch.tensor([math.log(cap) - 0.5]))
    capped_logit_scale(below, cap).sum().backward()
    assert below.grad.item() == pytest.approx(math.exp(math.log(cap) - 0.5))  # d exp(x)/dx, untouched


def test_mlm_heads_tied_to_word_embeddings():
    m = _model()
    w = m.text.embeddings.word.weight
    assert m.mlm_text_head.decoder.weight is w and m.mlm_fused_head.decoder.weight is w
    assert m.lm_fused_head.decoder.weight is w
    assert m.mlm_text_head.dense is not m.mlm_fused_head.dense
