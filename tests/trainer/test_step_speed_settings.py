"""The trainer settings behind the CPU step-time figures: reduction mode and Linear flavour per world size,
aligned parameter groups, the fused optimizer. Each is cheap to get silently wrong and costly when it is
(docs/BENCHMARKS.md, trainer)."""

from __future__ import annotations

import pytest
import torch

from model.unimo import UnimoModel
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.loop import ALIGN_ELEMENTS, param_groups
from trainer.optim import build_adamw


@pytest.mark.parametrize("key", ["reduce_scatter", "memory_efficient_linear"])
def test_setting_only_with_several_ranks_unless_set(key):
    cfg = load_config(None, ["train.global_micro_batches=2", "deepspeed.zero_stage=3"])  # ZeRO-3 settings
    assert build_ds_config(cfg, 1, False)["zero_optimization"][key] is False
    assert build_ds_config(cfg, 2, False)["zero_optimization"][key] is True
    forced = load_config(None, ["train.global_micro_batches=2", "deepspeed.zero_stage=3",
                                f"deepspeed.{key}=true"])
    assert build_ds_config(forced, 1, False)["zero_optimization"][key] is True


def _flat_offsets(groups):
    """Element offset of each parameter when the groups are packed one after another, as ZeRO-3 does."""
    offset, out = 0, []
    for g in groups:
        for p in g["params"]:
            out.append((offset, p))
            offset += p.numel()
    return out


def test_param_groups_keep_every_large_weight_aligned():
    cfg = load_config(None, ["model.flavor=debug"])
    model = UnimoModel(cfg.model)
    groups = param_groups(model, 0.01)
    packed = _flat_offsets(groups)
    # The model has odd-sized parameters (the temperature, the ITM bias), so the test means something.
    assert any(p.numel() % ALIGN_ELEMENTS for _, p in packed)
    # Every even-sized weight starts on a boundary; only odd-sized ones (all packed at the end) may not.
    assert all(off % ALIGN_ELEMENTS == 0 for off, p in packed if p.numel() % ALIGN_ELEMENTS == 0)
    # Nothing lost or doubled, and every parameter of a group belongs to the module the group names (what a
    # stage's LR-0 freezing relies on), the trailing odd-sized groups included.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)
    owner = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    assert all(owner[id(p)] == g["module"] for g in groups for p in g["params"])


def test_optimizer_is_fused_adamw_and_steps_on_cpu():
    cfg = load_config(None, [])
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_adamw([{"params": [w], "weight_decay": 0.0}], cfg.optimizer)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.all(w < 1)  # moved against the gradient
