"""CUDA checks (skipped without a GPU): bf16 training step with checkpointing, GPU/CPU agreement,
generation."""

import pytest
import torch

from model import losses
from model.flavors import get_flavor
from model.generate import generate
from model.unimo import UnimoModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _batch(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 1000, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    px = torch.randn(4, 3, 32, 32, generator=g)
    return ids.to(device), mask.to(device), px.to(device)


def _step_loss(m, ids, mask, px):
    ts, vs = m.encode_text(ids, mask), m.encode_image(px)
    t, _ = m.fuse(ts, mask, vs)
    ti, ii = m.itc_features(ts, vs)
    tc, _ = m.fuse(m.encode_text(ids, mask, "causal"), mask, vs, text_causal=True)
    labels = ids.masked_fill(mask == 0, -100)
    pm = torch.zeros(ids.shape[0], m.num_patches, dtype=torch.bool, device=ids.device)
    pm[:, ::2] = True
    vm = m.encode_image(px, pm)
    return (losses.itc_loss(ti, ii, ti, ii, m.logit_scale, 0) + losses.mlm_loss(m.mlm_logits_fused(t), labels)
            + losses.lm_loss(m.lm_logits_fused(tc), labels)
            + losses.mim_loss(m.mim_predict(vm[-1]), px, pm, m.cfg.vision.patch_size)
            + losses.mlm_loss(m.mlm_logits_text(m.encode_text(ids, mask, "prefix", prefix_len=4)[-1]),
                              labels))


@pytest.mark.parametrize("mode", ["adaptive", "gated"])
def test_cuda_matches_cpu_fp32(mode):
    cfg = get_flavor("debug")
    cfg.fusion.cross_layer = mode
    torch.manual_seed(0)
    cpu = UnimoModel(cfg)
    gpu = UnimoModel(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would dominate the comparison
    torch.backends.cudnn.allow_tf32 = False
    a = _step_loss(cpu, *_batch("cpu"))
    b = _step_loss(gpu, *_batch("cuda"))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    a.backward()
    b.backward()
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is None:  # heads this loss does not use (ITM, grounding)
            continue
        # relative to the gradient's norm: elementwise, near-zero entries differ by summation order
        rel = ((q.grad.cpu() - p.grad).norm() / p.grad.norm().clamp(min=1e-12)).item()
        assert rel < 1e-3, f"{n}: relative gradient difference {rel:.2e}"


def test_cuda_bf16_autocast_with_checkpointing():
    cfg = get_flavor("debug")
    cfg.activation_checkpointing = True
    torch.manual_seed(0)
    m = UnimoModel(cfg).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _step_loss(m, *_batch("cuda"))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m2 = UnimoModel(cfg).cuda().to(torch.bfloat16)
    ids, mask, px = _batch("cuda")
    loss = _step_loss(m2, ids, mask, px.bfloat16())
    loss.backward()
    assert torch.isfinite(loss)


def test_cuda_generate_matches_cpu():
    torch.manual_seed(0)
    cpu = UnimoModel(get_flavor("debug"))
    gpu = UnimoModel(get_flavor("debug")).cuda()
    gpu.load_state_dict(cpu.state_dict())
    px = _batch("cpu")[2]
    a = generate(cpu, pixels=px, max_new_tokens=6, num_beams=3)
    b = generate(gpu, pixels=px.cuda(), max_new_tokens=6, num_beams=3)
    assert torch.equal(a, b.cpu())
    ids, mask, _ = _batch("cpu")
    a = generate(cpu, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    b = generate(gpu, input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=4)
    assert torch.equal(a, b.cpu())
