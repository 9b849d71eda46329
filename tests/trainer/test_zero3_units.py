"""deepspeed.zero3_whole_units (trainer/zero3_units.py): ZeRO-3 over two gloo ranks with every parameter
partitioned, every objective on (the caption objective runs the text encoder's blocks a second time, the
fusion's mixers run twice every step), activation checkpointing (blocks re-run inside backward) and two
micro-batches per step trains exactly as ZeRO-3 with DeepSpeed's hooks around every module. And the engine
build compiles every block when train.compile is set."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.gloo_ranks import run_on_gloo_ranks

STEPS = 3
ACCUMULATE = 2  # micro-batches per rank and optimizer step


def _train(rank: int, world: int, whole_units: bool) -> dict:
    from model.flavors import get_flavor
    from model.unimo import UnimoModel
    from tests.trainer.test_objectives import ALL, make_batch
    from tests.trainer.test_zero_stage import _gathered
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.objectives import PretrainObjectives

    cfg = load_config(None, ["deepspeed.zero_stage=3", f"scaling.num_workers={world}",
                             f"train.global_micro_batches={ACCUMULATE * world}", "optimizer.lr=0.01",
                             "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                             "deepspeed.param_persistence_threshold=1",  # every parameter partitioned
                             f"deepspeed.zero3_whole_units={str(whole_units).lower()}"])
    model_cfg = get_flavor("debug")
    model_cfg.text.bos_token_id, model_cfg.text.eos_token_id, model_cfg.text.mask_token_id = 2, 3, 4
    model_cfg.activation_checkpointing = True
    torch.manual_seed(0)  # same weights, dropout masks and ITM negatives both ways
    module = PretrainObjectives(UnimoModel(model_cfg), rank, world)
    engine, _, _ = build_engine(cfg, module, world, on_gpu=False)
    hooked = sum(hasattr(m, "ds_id") for m in module.modules())  # modules DeepSpeed put its hooks on
    losses = []
    for step in range(STEPS):
        for micro in range(ACCUMULATE):  # DeepSpeed steps the optimizer at the last micro-batch
            total, _ = engine(make_batch(seed=10 * step + ACCUMULATE * rank + micro), ALL)
            engine.backward(total)
            engine.step()
            losses.append(float(total))
    return {"losses": losses, "weights": _gathered(engine), "hooked": hooked}


def _compiled_blocks(world: int) -> tuple[int, int]:
    """train.compile=true: (blocks compiled in place by the engine build, blocks); compiled at first call,
    so nothing is compiled here."""
    from model.unimo import UnimoModel
    from tests.trainer.test_objectives import make_model
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.objectives import PretrainObjectives

    cfg = load_config(None, ["deepspeed.zero_stage=3", f"scaling.num_workers={world}",
                             f"train.global_micro_batches={world}", "train.compile=true"])
    model: UnimoModel = make_model()
    build_engine(cfg, PretrainObjectives(model, 0, world), world, on_gpu=False)
    blocks = [m for m in model.modules() if getattr(type(m), "compile_unit", False)]
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in blocks), len(blocks)


def _records(rank: int, world: int) -> dict:
    return {"units": _train(rank, world, True), "modules": _train(rank, world, False),
            "compiled": _compiled_blocks(world)}


def test_a_deepspeed_without_what_the_rewiring_needs_is_named_with_the_way_out():
    from trainer.zero3_units import reduce_gradients_per_parameter

    class OtherOptimizer:
        fp16_groups: list = []

    with pytest.raises(RuntimeError, match=r"OtherOptimizer\) lacks _leaf_module_hooks, _grad_acc_hooks, .*"
                                           r"deepspeed.zero3_whole_units=false"):
        reduce_gradients_per_parameter(OtherOptimizer())


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    return run_on_gloo_ranks(_records, tmp_path_factory.mktemp("zero3_units"))


@pytest.mark.integration  # two ranks over gloo in spawned processes
def test_whole_units_train_bitwise_as_per_module_zero3(record):
    units, modules = record["units"], record["modules"]
    assert units["hooked"] < modules["hooked"] / 3, (units["hooked"], modules["hooked"])
    assert units["losses"] == modules["losses"]
    assert units["losses"][-1] < units["losses"][0]  # it trains
    assert units["weights"].keys() == modules["weights"].keys()
    different = [n for n, w in units["weights"].items() if not torch.equal(w, modules["weights"][n])]
    assert different == []


@pytest.mark.integration
def test_train_compile_compiles_every_block_in_the_engine_build(record):
    compiled, blocks = record["compiled"]
    assert compiled == blocks > 0  # the option had been lost from the engine build in a refactor
