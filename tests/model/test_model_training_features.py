"""bf16, activation checkpointing, position interpolation and MIM patch masking."""

import pytest
import torch

from model import losses
from model.flavors import get_flavor
from model.unimo import UnimoModel
from model.vision_encoder import interpolate_positions


def _loss(m, ids, mask, px):
    ts, vs = m.encode_text(ids, mask), m.encode_image(px)
    t, v = m.fuse(ts, mask, vs)
    ti, ii = m.itc_features(ts, vs)
    labels = ids.masked_fill(mask == 0, -100)
    return (losses.itc_loss(ti, ii, ti, ii, m.logit_scale, 0) + losses.mlm_loss(m.mlm_logits_fused(t), labels)
            + losses.itm_loss(m.itm_logits(t, v), torch.tensor([1, 0])))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 1000, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, torch.randn(2, 3, 32, 32, generator=g)


@pytest.mark.parametrize("mode", ["adaptive", "gated"])
def test_activation_checkpointing_same_grads(mode):
    cfg = get_flavor("debug")
    cfg.fusion.cross_layer = mode
    torch.manual_seed(0)
    ref = UnimoModel(cfg)
    cfg.activation_checkpointing = True
    torch.manual_seed(0)
    ckpt = UnimoModel(cfg)
    assert ckpt.text.checkpointing and ckpt.vision.checkpointing and ckpt.fusion.checkpointing
    batch = _batch()
    _loss(ref, *batch).backward()
    _loss(ckpt, *batch).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_forward_backward_with_checkpointing():
    cfg = get_flavor("debug")
    cfg.activation_checkpointing = True
    torch.manual_seed(0)
    m = UnimoModel(cfg).to(torch.bfloat16)
    ids, mask, px = _batch()
    loss = _loss(m, ids, mask, px.to(torch.bfloat16))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        if name.split(".")[0] in ("text", "vision", "fusion") and "mask_token" not in name:  # no MIM here
            assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
    with torch.no_grad():
        vs = m.encode_image(torch.randn(2, 3, 48, 48, dtype=torch.bfloat16))  # interpolation in bf16
    assert vs[-1].dtype == torch.bfloat16 and vs[-1].shape == (2, 37, 64)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    m = UnimoModel(get_flavor("debug")).eval()
    ids, mask, px = _batch()
    with torch.no_grad():
        ref = m.fuse(m.encode_text(ids, mask), mask, m.encode_image(px))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.fuse(m.encode_text(ids, mask), mask, m.encode_image(px))[0]
    assert (got.float() - ref).abs().max() < 0.1


def test_position_interpolation_other_image_size():
    torch.manual_seed(0)
    m = UnimoModel(get_flavor("debug")).eval()
    pos = m.vision.embeddings.pos
    assert interpolate_positions(pos, 4, 4) is pos  # native size: untouched
    grid = interpolate_positions(pos, 6, 6)
    assert grid.shape == (1, 37, 64) and torch.equal(grid[:, 0], pos[:, 0])
    # a constant grid stays constant under bicubic resampling
    const = torch.ones(1, 17, 3)
    torch.testing.assert_close(interpolate_positions(const, 8, 6), torch.ones(1, 49, 3))
    with torch.no_grad():
        vs = m.encode_image(torch.randn(2, 3, 48, 40))  # non-square works too
        _, v = m.fuse(m.encode_text(*_batch()[:2]), _batch()[1], vs)
    assert vs[-1].shape == (2, 1 + 6 * 5, 64) and v.shape == (2, 31, 64)
    assert m.mim_predict(vs[-1]).shape == (2, 30, 192)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m.encode_image(torch.randn(1, 3, 36, 36))


def test_patch_mask_replaces_patches_with_mask_token():
    torch.manual_seed(0)
    m = UnimoModel(get_flavor("debug")).eval()
    px = torch.randn(2, 3, 32, 32)
    pm = torch.zeros(2, 16, dtype=torch.bool)
    pm[:, 3] = True
    px2 = px.clone()
    px2[:, :, 0:8, 24:32] = 5.0  # patch 3 (row 0, col 3) changes
    with torch.no_grad():
        e1 = m.vision.embeddings(px, pm)
        e2 = m.vision.embeddings(px2, pm)
        e3 = m.vision.embeddings(px2)
    torch.testing.assert_close(e1, e2)  # masked content is invisible
    assert (e3 - e1).abs()[:, 4].max() > 1e-3
    with pytest.raises(ValueError, match="patch_mask shape"):
        m.encode_image(px, torch.zeros(2, 15, dtype=torch.bool))


def test_dropout_only_in_training():
    cfg = get_flavor("debug")
    cfg.text.dropout = cfg.vision.dropout = cfg.fusion.dropout = 0.3
    torch.manual_seed(0)
    m = UnimoModel(cfg)
    ids, mask, _ = _batch()
    m.eval()
    with torch.no_grad():
        a = m.encode_text(ids, mask)[-1]
        b = m.encode_text(ids, mask)[-1]
    torch.testing.assert_close(a, b)
    m.train()
    with torch.no_grad():
        c = m.encode_text(ids, mask)[-1]
    assert (a - c).abs().max() > 1e-3
