"""train.compile: every encoder block and fusion stream layer is compiled in place (model/layers.py:
compile_blocks), and a compiled block computes what the eager one does, forward and backward (inductor on
CPU)."""

from __future__ import annotations

import pytest
import torch

from model.flavors import get_flavor
from model.layers import PostLNBlock, compile_blocks
from model.unimo import UnimoModel


def test_compile_blocks_compiles_every_block_in_place():
    cfg = get_flavor("debug")
    model = UnimoModel(cfg)
    names = [n for n, _ in model.named_parameters()]
    n = compile_blocks(model)
    assert n == cfg.text.layers + cfg.vision.layers + 2 * cfg.fusion.layers
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == n
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys


@pytest.mark.integration  # inductor runs a C++ compiler
def test_compiled_block_matches_eager(padded: bool = True):  # one case: inductor takes a minute here
    torch.manual_seed(0)
    block = PostLNBlock(32, 4, 64, 1e-12, 0.0, "gelu")
    x = torch.randn(2, 8, 32, requires_grad=True)
    mask = None
    if padded:
        keep = torch.ones(2, 8, dtype=torch.bool)
        keep[1, 5:] = False
        mask = keep[:, None, None, :]
    ref = block(x, mask)
    ref.sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compile_blocks(block)
    out = block(x, mask)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
