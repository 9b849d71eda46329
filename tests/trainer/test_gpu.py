"""GPU-only checks (marker `gpu`, skipped without CUDA): bf16 objectives on CUDA, one ZeRO-3 bf16 engine step."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def _batch(cfg, device, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, v, L = cfg.model.text, cfg.model.vision, 16
    n = (v.image_size // v.patch_size) ** 2

    def text():
        ids = torch.randint(5, 200, (b, L), generator=g)
        labels = torch.full((b, L), -100)
        labels[:, 3] = ids[:, 3]
        masked = ids.clone()
        masked[:, 3] = t.mask_token_id
        return {"input_ids": ids, "attention_mask": torch.ones(b, L, dtype=torch.long), "mlm_input_ids": masked,
                "mlm_labels": labels}

    px = torch.randn(b, 3, v.image_size, v.image_size, generator=g)
    batch = {"text": text(), "image": {"pixels": px, "patch_mask": torch.rand(b, n, generator=g) < 0.5},
             "pair": {**text(), "pixels": px}}
    return {k: {kk: vv.to(device) for kk, vv in d.items()} for k, d in batch.items()}


def test_objectives_forward_backward_bf16_on_cuda():
    from model.unimo import UnimoModel
    from trainer.config import load_config
    from trainer.objectives import PretrainObjectives

    cfg = load_config(None, [])
    module = PretrainObjectives(UnimoModel(cfg.model)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, parts = module(_batch(cfg, "cuda"), {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "mlm_pair": 1.0})
    total.backward()
    assert torch.isfinite(total) and set(parts) == {"mlm_text", "mim", "itc", "mlm_pair"}
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_zero3_bf16_engine_steps_on_one_gpu():
    import deepspeed

    from model.unimo import UnimoModel
    from trainer.config import load_config
    from trainer.ds_config import build_ds_config
    from trainer.loop import param_groups
    from trainer.objectives import PretrainObjectives
    from trainer.zero_compat import register_external_parameters

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cfg = load_config(None, ["scaling.num_workers=1", "train.global_micro_batches=1", "scaling.use_gpu=true"])
    ds_config = build_ds_config(cfg, 1, on_gpu=True)
    assert ds_config["bf16"] == {"enabled": True}
    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model))
    register_external_parameters(module)
    groups = [{k: v for k, v in g.items() if k != "module"} for g in param_groups(module.model, 0.01)]
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
    batch = _batch(cfg, engine.device)
    weights = {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "mlm_pair": 1.0}
    losses = []
    for _ in range(8):
        total, _ = engine(batch, weights)
        engine.backward(total)
        engine.step()
        losses.append(float(total))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # the same batch 8 times: the loss must fall
