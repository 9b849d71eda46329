"""Analytic FLOPs agree with torch's FlopCounterMode (within 5%) on the debug flavor; parameter counts;
model_info."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.flavors import FLAVORS, get_flavor
from model.flops import count_parameters, flops_per_sample, model_info
from model.unimo import UnimoModel

B, L = 2, 12


def _counted(fn) -> int:
    # the math SDPA backend decomposes into matmuls the counter sees (CPU flash attention is not registered)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // B


def _inputs(m):
    ids = torch.randint(200, 1000, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    return ids, mask, torch.randn(B, 3, 32, 32)


def _close(analytic, counted):
    assert abs(analytic - counted) <= 0.05 * counted, f"analytic {analytic} vs counted {counted}"


def _run(m, source, objective, ids, mask, px, vs=None):
    """One objective's forward; pair mlm/lm reuse the ITC pass's image states `vs` (not counted)."""
    if source == "text":
        m.mlm_logits_text(m.encode_text(ids, mask, "prefix" if objective == "lm" else "bidirectional",
                                        prefix_len=4)[-1])
    elif source == "image":
        m.mim_predict(m.encode_image(px, torch.rand(B, m.num_patches) < 0.5)[-1])
    elif objective == "itc":
        m.itc_features(m.encode_text(ids, mask), m.encode_image(px))
    elif objective == "mlm":
        m.mlm_logits_fused(m.fuse(m.encode_text(ids, mask), mask, vs)[0])
    elif objective == "lm":
        m.lm_logits_fused(m.fuse(m.encode_text(ids, mask, "causal"), mask, vs, text_causal=True)[0])


CASES = [("text", "mlm", "adaptive", True), ("text", "lm", "adaptive", True),
         ("image", "mim", "adaptive", True),
         ("pair", "itc", "adaptive", True), ("pair", "lm", "adaptive", True), ("pair", "lm", "gated", False),
         *[("pair", "mlm", mode, cl) for mode in ("none", "bridge", "adaptive", "gated")
           for cl in (True, False)]]


@pytest.mark.parametrize("source,objective,mode,cross_level", CASES)
def test_forward_flops_match_counter(source, objective, mode, cross_level):
    torch.manual_seed(0)
    cfg = get_flavor("debug")
    cfg.fusion.cross_layer, cfg.fusion.cross_level_attention = mode, cross_level
    m = UnimoModel(cfg).eval()
    ids, mask, px = _inputs(m)
    with torch.no_grad():
        vs = m.encode_image(px)
    counted = _counted(lambda: _run(m, source, objective, ids, mask, px, vs))
    _close(flops_per_sample(cfg, source, seq_len=L, objectives=[objective], backward=False), counted)


def test_itm_and_grounding_flops_match_counter():
    torch.manual_seed(0)
    cfg = get_flavor("debug")
    m = UnimoModel(cfg).eval()
    ids, mask, px = _inputs(m)
    with torch.no_grad():
        ts, vs = m.encode_text(ids, mask), m.encode_image(px)

    def itm(passes):
        for _ in range(passes):
            t, v = m.fuse(ts, mask, vs)
            m.itm_logits(t, v)
        return t, v

    for neg in (0, 2):
        _close(flops_per_sample(cfg, "pair", seq_len=L, objectives=["itm"],
                                itm_negatives=neg, backward=False),
               _counted(lambda n=neg: itm(1 + n)))
    with torch.no_grad():
        t, v = itm(1)
    _close(flops_per_sample(cfg, "pair", seq_len=L, objectives=["grounding"], backward=False),
           _counted(lambda: m.grounding_scores(t, v)))


def test_training_flops_are_three_forwards():
    cfg = get_flavor("debug")
    for source in ("text", "image", "pair"):
        fwd = flops_per_sample(cfg, source, seq_len=L, backward=False)
        assert flops_per_sample(cfg, source, seq_len=L) == 3 * fwd > 0
    # the counted backward is ~2x forward (a little less: no gradient for token ids / pixels)
    m = UnimoModel(cfg)
    ids, mask, _ = _inputs(m)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        m.mlm_logits_text(m.encode_text(ids, mask)[-1]).sum().backward()
    fwd = flops_per_sample(cfg, "text", seq_len=L, backward=False) * B
    assert 2.5 * fwd <= c.get_total_flops() <= 3.05 * fwd


def test_flops_validation():
    with pytest.raises(ValueError, match="source"):
        flops_per_sample(get_flavor("debug"), "audio", seq_len=8)
    with pytest.raises(ValueError, match="objective"):
        flops_per_sample(get_flavor("debug"), "image", objectives=["mlm"])


def test_count_parameters_by_part():
    m = UnimoModel(get_flavor("debug"))
    counts = count_parameters(m)
    assert set(counts) == {"text_encoder", "vision_encoder", "fusion", "heads", "total"}
    assert counts["total"] == sum(p.numel() for p in m.parameters())  # tied embedding counted once
    assert counts["text_encoder"] == sum(p.numel() for p in m.text.parameters())
    assert counts["fusion"] == sum(p.numel() for p in m.fusion.parameters())


def test_model_info_every_flavor():
    for name in FLAVORS:
        text = model_info(name)
        assert f"'{name}'" in text and "text_encoder" in text and "pair" in text and "FLOPs" in text
    assert "B)" in model_info("xl")  # billions of parameters
    with pytest.raises(ValueError, match="valid flavors"):
        model_info("huge")
