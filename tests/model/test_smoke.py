"""Smoke test: the debug flavor builds and runs every head."""

import torch

from model.flavors import get_flavor
from model.unimo import UnimoModel


def test_debug_forward_shapes():
    torch.manual_seed(0)
    m = UnimoModel(get_flavor("debug"))
    ids = torch.randint(200, 1000, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    ts = m.encode_text(ids, am)
    vs = m.encode_image(torch.randn(2, 3, 32, 32))
    t, v = m.fuse(ts, am, vs)
    assert len(ts) == 2 and ts[-1].shape == (2, 10, 64)
    assert len(vs) == 2 and vs[-1].shape == (2, 1 + m.num_patches, 64)
    assert t.shape == (2, 10, 64) and v.shape == (2, 17, 64)
    assert m.itm_logits(t, v).shape == (2, 2)
    assert m.mlm_logits_fused(t).shape == (2, 10, 1024)
