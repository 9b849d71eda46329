"""deepspeed.zero3_one_pass_grad_norm (trainer/zero3_lean.py): ZeRO-3 over two gloo ranks with every parameter
partitioned, every objective, clipping active and two micro-batches per step takes the same gradient norm as
DeepSpeed's per-group norm (to fp64 rounding) and trains to the same weights; a non-finite gradient still
skips the update; and where the one-pass norm does not apply, DeepSpeed's stays, with the reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from tests.integration.services import free_port

STEPS = 3
ACCUMULATE = 2  # micro-batches per rank and optimizer step


def _train(rank: int, world: int, one_pass: bool) -> dict:
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
                             "optimizer.grad_clip=0.5",  # below every step's norm: the clip is applied
                             "deepspeed.param_persistence_threshold=1",  # every parameter partitioned
                             f"deepspeed.zero3_one_pass_grad_norm={str(one_pass).lower()}"])
    model_cfg = get_flavor("debug")
    model_cfg.text.bos_token_id, model_cfg.text.eos_token_id, model_cfg.text.mask_token_id = 2, 3, 4
    torch.manual_seed(0)
    module = PretrainObjectives(UnimoModel(model_cfg), rank, world)
    engine, _, _ = build_engine(cfg, module, world, on_gpu=False)
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            total, _ = engine(make_batch(seed=10 * step + ACCUMULATE * rank + micro), ALL)
            engine.backward(total)
            engine.step()
            losses.append(float(total))
        norms.append(float(engine.get_global_grad_norm()))
    weights = _gathered(engine)
    # A non-finite gradient: DeepSpeed's step sees an invalid norm and skips the update, with either norm.
    total, _ = engine(make_batch(seed=99 + rank), ALL)
    engine.backward(total)
    engine.optimizer.grad_partitions_flat_buffer[0] = float("nan")
    for _ in range(ACCUMULATE - 1):
        total, _ = engine(make_batch(seed=98 + rank), ALL)
        engine.backward(total)
    engine.step()
    return {"losses": losses, "norms": norms, "weights": weights, "after_nan": _gathered(engine),
            "one_pass": "_get_norm_groups" in vars(engine.optimizer)}


def _run(rank: int, port: int, world: int, out: str) -> None:
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    record = {"one_pass": _train(rank, world, True), "deepspeed": _train(rank, world, False)}
    if rank == 0:
        torch.save(record, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3_lean") / "record.pt"
    mp.start_processes(_run, args=(free_port(), 2, str(out)), nprocs=2, join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.integration  # two ranks over gloo in spawned processes
def test_one_pass_norm_is_deepspeeds_norm_and_trains_to_the_same_weights(record):
    ours, theirs = record["one_pass"], record["deepspeed"]
    assert ours["one_pass"] and not theirs["one_pass"]  # the trainer's build did replace it, the switch works
    assert all(n > 0.5 for n in theirs["norms"])  # clipping was active on every step
    assert ours["norms"] == pytest.approx(theirs["norms"], rel=1e-12)
    assert ours["losses"] == theirs["losses"]
    assert ours["losses"][-1] < ours["losses"][0]
    far = {n: (w - theirs["weights"][n]).abs().max().item() for n, w in ours["weights"].items()
           if not torch.allclose(w, theirs["weights"][n], rtol=1e-6, atol=1e-7)}
    assert far == {}


@pytest.mark.integration
def test_a_non_finite_gradient_still_skips_the_update(record):
    for run in record.values():
        unchanged = [torch.equal(run["after_nan"][n], w) for n, w in run["weights"].items()]
        assert all(unchanged)


def _optimizer(**changes) -> SimpleNamespace:
    group = object()
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    for p in params:
        p.partition_numel = lambda: 4
    fields = {"grad_partitions_flat_buffer": torch.zeros(12), "fp16_groups": [params[:2], params[2:]],
              "model_parallel_group": None, "offload_optimizer": False,
              "_get_norm_groups": None, "_get_param_partition_group": lambda p: group}
    return SimpleNamespace(**{**fields, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"offload_optimizer": True}, "offload_optimizer"),
    ({"use_muon": True}, "Muon"),
    ({"model_parallel_group": object()}, "model parallelism"),
    ({"_get_param_partition_group": lambda p: object()}, "not all partitioned over one process group"),
    ({"grad_partitions_flat_buffer": torch.zeros(16)}, "one flat buffer"),
])
def test_where_the_one_pass_norm_does_not_apply_deepspeeds_stays_and_says_why(changes, reason):
    from trainer.zero3_lean import lighten_zero3_optimizer, why_not_lean

    optimizer = _optimizer(**changes)
    found = why_not_lean(optimizer)
    assert (found is None) if reason is None else (reason in found)
    assert lighten_zero3_optimizer(optimizer) is (reason is None)
    assert (optimizer._get_norm_groups is None) is (reason is not None)


def test_a_deepspeed_without_what_it_reads_keeps_its_own_norm():
    from trainer.zero3_lean import why_not_lean

    optimizer = _optimizer()
    del optimizer.grad_partitions_flat_buffer
    assert "lacks grad_partitions_flat_buffer" in why_not_lean(optimizer)


def test_a_frozen_parameter_keeps_deepspeeds_norm():
    from trainer.zero3_lean import why_not_lean

    optimizer = _optimizer()
    optimizer.fp16_groups[0][0].requires_grad_(False)
    assert "without gradients" in why_not_lean(optimizer)
