"""Attention masks: causal and prefix leave earlier outputs unchanged when later tokens change; padding is
inert."""

import pytest
import torch

from model.flavors import get_flavor
from model.layers import text_attention_mask
from model.unimo import UnimoModel

L, CUT = 10, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnimoModel(get_flavor("debug")).eval()


def _ids():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(200, 1000, (2, L), generator=g)
    b = a.clone()
    b[:, CUT:] = torch.randint(200, 1000, (2, L - CUT), generator=g)  # change every token from CUT on
    return a, b


def _diff(x, y, sl):
    return (x[:, sl] - y[:, sl]).abs().max().item()


@pytest.mark.parametrize("padded", [False, True])
def test_causal_text_encoder(model, padded):
    a, b = _ids()
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, L - 2:] = 0
    with torch.no_grad():
        xa, xb = model.encode_text(a, mask, "causal"), model.encode_text(b, mask, "causal")
    for sa, sb in zip(xa, xb):
        assert _diff(sa, sb, slice(0, CUT)) < 1e-6
        assert _diff(sa, sb, slice(CUT, L)) > 1e-3


@pytest.mark.parametrize("prefix_len", [4, torch.tensor([4, 3])])
def test_prefix_text_encoder(model, prefix_len):
    a, b = _ids()
    mask = torch.ones(2, L, dtype=torch.long)
    with torch.no_grad():
        xa = model.encode_text(a, mask, "prefix", prefix_len=prefix_len)[-1]
        xb = model.encode_text(b, mask, "prefix", prefix_len=prefix_len)[-1]
        # inside the prefix attention is bidirectional: changing token 2 changes token 0's output
        c = a.clone()
        c[:, 2] = 7
        xc = model.encode_text(c, mask, "prefix", prefix_len=prefix_len)[-1]
        xd = model.encode_text(c, mask, "causal")[-1]
        xe = model.encode_text(a, mask, "causal")[-1]
    assert _diff(xa, xb, slice(0, CUT)) < 1e-6
    assert _diff(xa, xc, slice(0, 1)) > 1e-3
    assert _diff(xd, xe, slice(0, 1)) < 1e-6  # while causal keeps token 0 unchanged


def test_prefix_mask_pattern():
    m = text_attention_mask(torch.tensor([[1, 1, 1, 1, 0]]), 5, "prefix", prefix_len=2)[0, 0]
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(m, expected)
    with pytest.raises(ValueError, match="mask_mode"):
        text_attention_mask(None, 3, "sideways")


def test_causal_fusion_text_stream(model):
    a, b = _ids()
    mask = torch.ones(2, L, dtype=torch.long)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vs = model.encode_image(px)
        ta, va = model.fuse(model.encode_text(a, mask, "causal"), mask, vs, text_causal=True)
        tb, vb = model.fuse(model.encode_text(b, mask, "causal"), mask, vs, text_causal=True)
        tn, _ = model.fuse(model.encode_text(a, mask, "causal"), mask, vs, text_causal=False)
    assert _diff(ta, tb, slice(0, CUT)) < 1e-6
    assert _diff(ta, tb, slice(CUT, L)) > 1e-3
    assert _diff(va, vb, slice(None)) < 1e-6  # the image stream does not read the text while captioning
    assert _diff(ta, tn, slice(0, CUT)) > 1e-4  # without text_causal, later tokens leak through the image


def test_padding_is_inert(model):
    a, _ = _ids()
    mask = torch.ones(2, L, dtype=torch.long)
    mask[:, CUT:] = 0
    b = a.clone()
    b[:, CUT:] = 0
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vs = model.encode_image(px)
        for mode in ("bidirectional", "causal"):
            xa, xb = model.encode_text(a, mask, mode), model.encode_text(b, mask, mode)
            assert _diff(xa[-1], xb[-1], slice(0, CUT)) < 1e-6
            fa, fb = model.fuse(xa, mask, vs), model.fuse(xb, mask, vs)
            assert _diff(fa[0], fb[0], slice(0, CUT)) < 1e-6
            assert _diff(fa[1], fb[1], slice(None)) < 1e-6


def test_left_padding_causal_has_no_nan(model):
    ids = torch.randint(200, 1000, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the first rows have no key under a causal mask
    with torch.no_grad():
        out = model.encode_text(ids, mask, "causal")[-1]
    assert torch.isfinite(out).all()
