"""GPU-only checks (marker `gpu`, skipped without CUDA): bf16 objectives on CUDA, one ZeRO-3 bf16 engine
step."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def _batch(cfg, device):
    from tests.fake_batch import random_batch

    return random_batch(cfg, b=4, seq_len=16, device=device)


def _one_rank_environment() -> None:
    """What torch.distributed reads to form a one-rank group on a free loopback port."""
    from tests.integration.services import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")


def _losses(engine, batch, weights: dict, steps: int) -> list[float]:
    """The loss of each of ``steps`` engine steps on the same batch."""
    losses = []
    for _ in range(steps):
        total, _ = engine(batch, weights)
        engine.backward(total)
        engine.step()
        losses.append(float(total))
    return losses


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
    from trainer.loop import optimizer_groups
    from trainer.objectives import PretrainObjectives
    from trainer.zero3_external_params import register_external_parameters

    _one_rank_environment()
    cfg = load_config(None, ["scaling.num_workers=1", "train.global_micro_batches=1", "scaling.use_gpu=true",
                             "deepspeed.zero_stage=3"])
    ds_config = build_ds_config(cfg, 1, on_gpu=True)
    assert ds_config["bf16"] == {"enabled": True}
    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(cfg.model))
    register_external_parameters(module)
    groups = optimizer_groups(module.model, 0.01)
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
    batch = _batch(cfg, engine.device)
    losses = _losses(engine, batch, {"mlm_text": 1.0, "mim": 1.0, "itc": 1.0, "mlm_pair": 1.0}, 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # the same batch 8 times: the loss must fall


def test_zero3_whole_units_train_as_per_module_zero3_on_one_gpu():
    """trainer/zero3_units.py on CUDA in bf16, every parameter partitioned and every objective on: the same
    losses as ZeRO-3 hooked around every module (tests/trainer/test_zero3_units.py: bitwise on CPU)."""
    _whole_units_against_per_module("cuda")


def _whole_units_against_per_module(device: str) -> None:
    import deepspeed

    from model.unimo import UnimoModel
    from tests.trainer.test_objectives import ALL
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.objectives import PretrainObjectives

    _one_rank_environment()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    runs = {}
    for whole in (True, False):
        cfg = load_config(None, ["scaling.num_workers=1", "train.global_micro_batches=1",
                                 f"scaling.use_gpu={str(device == 'cuda').lower()}", "deepspeed.zero_stage=3",
                                 "deepspeed.param_persistence_threshold=1", "model.text.bos_token_id=2",
                                 "model.text.eos_token_id=3", "model.text.mask_token_id=4",
                                 f"deepspeed.zero3_whole_units={str(whole).lower()}"])
        torch.manual_seed(0)
        module = PretrainObjectives(UnimoModel(cfg.model))
        engine, _, _ = build_engine(cfg, module, 1, on_gpu=device == "cuda")
        runs[whole] = _losses(engine, _batch(cfg, engine.device), ALL, 4)
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=2e-3, atol=1e-3)
    assert runs[True][-1] < runs[True][0], runs


def test_a_checkpoint_s_rng_state_continues_the_gpu_s_stream():
    """ITM's negatives are drawn on the GPU: a same-world resume restores its generator with the CPU's
    (trainer/checkpointing/manager.py rng_state)."""
    from trainer.checkpointing.manager import rng_state, set_rng_state

    torch.cuda.manual_seed(5)
    torch.rand(4, device="cuda")  # CUDA in use, its stream somewhere past the seed
    blob = rng_state()
    expected = (torch.rand(8, device="cuda"), torch.rand(8))
    torch.cuda.manual_seed(5)  # what Trainer.build does before the restore
    torch.manual_seed(5)
    set_rng_state(blob)
    assert torch.equal(torch.rand(8, device="cuda"), expected[0]) and torch.equal(torch.rand(8), expected[1])


def test_a_universal_load_s_adam_step_goes_to_the_fused_optimizer_s_device():
    """DeepSpeed's universal checkpoint is loaded to the CPU; a fused AdamW keeps its step on the parameter's
    device and fails on a CPU one (trainer/zero_stage.py universal_load_fixed)."""
    from trainer.zero_stage import universal_load_fixed

    param = torch.nn.Parameter(torch.ones(4, device="cuda"))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones_like(param)
    optimizer.step()
    with universal_load_fixed(optimizer):  # what the load leaves: a step tensor on the CPU
        optimizer.state[param]["step"] = torch.tensor(1.0)
    assert optimizer.state[param]["step"].device == param.device
    optimizer.step()  # the fused kernel takes it
    assert float(optimizer.state[param]["step"]) == 2.0
